"""A server training task outside the server (``ctv``, or ``--name hn``): the same pre-processing,
augmentation, loss, validation and publishing as ``POST /train/<name>``, data-parallel under torchrun.

    torchrun --standalone --nproc_per_node 2 -m ctv_train.server_train \\
        --studies datastore/demo --model runs/model/ctv.pt --param max_epochs=50

Each rank reads the same datastore and trains on its share of the labelled cases (gloo on CPU,
nccl on GPU; several nodes through torchrun's rendezvous). Rank 0 validates, keeps the resume
checkpoint and publishes to ``--model``, the file running servers serve and reload. Without
torchrun it trains in this one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time

import torch

from ctv_app.lib.configs import CONFIGS
from ctv_app.lib.datastore import CTVDatastore


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctv_train.server_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", required=True, help="a folder datastore with labels in labels/final/")
    parser.add_argument("--model", required=True, help="the served checkpoint to start from and publish to")
    parser.add_argument("--name", default="ctv", choices=sorted(CONFIGS), help="the model (default: %(default)s)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="as the server's --conf, e.g. --conf ctv_target_spacing [6,6,6]")  # fmt: skip
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a training request parameter, as in POST /train/ctv, e.g. max_epochs=50")  # fmt: skip
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")

    config = CONFIGS[args.name]()
    conf = {f"{args.name}_model": args.model, **dict(args.conf)}
    config.init(args.name, os.path.dirname(os.path.abspath(args.model)), conf, None)
    task = config.trainer()
    datastore = CTVDatastore(args.studies, structures=config.params.structure_list, auto_reload=False)

    request = copy.deepcopy(task._config)
    request.update({k: parse_value(v) for k, v in (p.split("=", 1) for p in args.param)})
    # One run id for all ranks: it names the run's cache folders.
    request["run_id"] = os.environ.get("TORCHELASTIC_RUN_ID") or time.strftime("%Y%m%d_%H%M%S")
    request["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    request["multi_gpu"] = world_size > 1
    request["distributed_backend"] = "nccl" if torch.cuda.is_available() else "gloo"
    request["distributed_url"] = "env://"
    request["world_size"] = world_size
    datalist = task.pre_process(request, datastore)
    try:
        task.train(rank, world_size, request, datalist)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
