"""The contouring train task (every model's: ``ctv``, ``hn``): MONAI Label's BasicTrainTask with its hooks filled in.

MONAI Label runs it in a subprocess (POST /train/<model>), so training never blocks inference. It trains
on the datastore's final labels that contain any of the model's structures (``model_datalist``): on a
server of several models, a label of cervix structures trains ``ctv`` and is skipped by ``hn``. Every
epoch it validates, and when the validation Dice beats the best so far (at the start: the served
model's Dice on the same split) it keeps the weights. In research mode it publishes them at once: a new
model version (``lib/versions.py``) and the served file, by atomic rename, which the running infer task
serves from the next request. In clinical mode the served file is never touched: the run's best weights
become one candidate version when the run ends, for commissioning and a physicist's approval. A resume
checkpoint is written every epoch; a killed run continues from it.

Commissioning cases (``lib/commissioning.py``) are never trained or validated on: ``pre_process`` drops
them from the datalist before the split.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import partition_dataset
from monai.handlers import MeanDice, from_engine
from monai.inferers import Inferer
from monai.transforms import Activationsd, AsDiscreted, Lambdad
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from ..checkpoint import load_checkpoint, save_checkpoint, weights_digest
from ..commissioning import CommissioningSet, case_id
from ..inferers import build_inferer
from ..losses import DeepSupervisionLoss
from ..networks import network_for
from ..params import CTVParams, as_bool
from ..provenance import file_sha256, labels_record
from ..quality import QualityAwarenessModule, QualityWeightedLoss
from ..transforms import pre_transforms, train_transforms, val_transforms
from ..transforms.labels import model_datalist
from ..versions import ModelVersions

logger = logging.getLogger(__name__)


def contained_only(output) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(pred, label) per case with the structures a case does not contain emptied in both: MeanDice
    (``ignore_empty``) then leaves them out of its mean instead of scoring them."""
    preds, labels = from_engine(["pred", "label"])(output)
    out_p, out_l = [], []
    for pred, label in zip(preds, labels):
        known = (label >= 0).reshape(label.shape[0], -1).all(dim=1).reshape(-1, *[1] * (label.dim() - 1))
        out_p.append(pred * known)
        out_l.append(label.clamp(min=0) * known)
    return out_p, out_l


def _main_head(pred: torch.Tensor) -> torch.Tensor:
    """Training output stacks deep-supervision heads first ([heads, C, ...]); metrics use the full-resolution one."""
    return pred[0] if pred.dim() == 5 else pred


class CTVTrain(BasicTrainTask):
    """Request params (POST /train/ctv): max_epochs, val_split, learning_rate, train_batch_size,
    patches_per_volume, pretrained, resume, amp, seed, threads, name, device; quality_weighting (QAM+OCM),
    ocm_lambda, qam_lr."""

    def __init__(self, served_path: str, params: CTVParams, name: str = "ctv", description: str = "the CTV model",
                 versions: ModelVersions | None = None):  # fmt: skip
        """``versions``: the model's versions (None: no data folder; training publishes to ``served_path``)."""
        self.served_path = served_path
        self.params = params
        self.name = name
        self.versions = versions
        self._annotators: dict[str, str | None] = {}
        super().__init__(
            model_dir=os.path.join(os.path.dirname(os.path.abspath(served_path)), "train"),
            description=f"Train {name} ({description}) on the datastore's final (corrected) labels of its structures",
            config={
                "max_epochs": 50,
                "val_split": 0.2,
                "learning_rate": 1e-4,
                "train_batch_size": 2,
                "val_batch_size": 1,
                "patches_per_volume": 2,
                "pretrained": True,
                "resume": True,
                "amp": False,
                "seed": 0,
                "threads": 0,
                "quality_weighting": False,
                "ocm_lambda": 2.0,
                "qam_lr": 1e-4,
                "dataset": "CacheDataset",
                "dataloader": "DataLoader",
                "tracking": "None",  # MONAI Label's default is MLflow, which is not installed
            },
            tracking=None,
            amp=False,
            publish_path=None,  # publishing is PublishBestModel's job (atomic, with metadata)
            n_saved=1,
            labels=params.labels,
        )

    # --- hooks -------------------------------------------------------------------------------------
    def network(self, context: Context) -> torch.nn.Module:
        net = network_for(self.params)
        if as_bool(context.request.get("pretrained", True)) and os.path.exists(self.served_path):
            ckpt = load_checkpoint(self.served_path)
            net.load_state_dict(ckpt["model"], strict=True)
            context.started_from = file_sha256(self.served_path)
            logger.info(f"starting from the served model {context.started_from[:12]}")
        else:
            context.started_from = None
            logger.info("starting from random initialisation")
        return net

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        groups = [{"params": context.network.parameters(), "lr": float(context.request.get("learning_rate", 1e-4))}]
        context.quality = None
        if as_bool(context.request.get("quality_weighting", False)):
            qam = QualityAwarenessModule(3, in_channels=1 + len(self.params.labels))
            ocm = float(context.request.get("ocm_lambda", 2.0))
            context.quality = QualityWeightedLoss(qam, ocm).to(context.device)
            groups.append({"params": context.quality.parameters(), "lr": float(context.request.get("qam_lr", 1e-4))})
        context.quality_loss = (
            BatchQualityLoss(DeepSupervisionLoss(self.params.loss, reduction="none"), context.quality)
            if context.quality is not None
            else None
        )
        return torch.optim.Adam(groups)

    def loss_function(self, context: Context) -> torch.nn.Module:
        return context.quality_loss if context.quality_loss is not None else DeepSupervisionLoss(self.params.loss)

    def train_pre_transforms(self, context: Context) -> list:
        samples = int(context.request.get("patches_per_volume", 2))
        return pre_transforms(self.params, with_label=True) + train_transforms(self.params, samples)

    def train_post_transforms(self, context: Context) -> list:
        return [
            Lambdad(keys="pred", func=_main_head),
            Activationsd(keys="pred", sigmoid=True),
            AsDiscreted(keys="pred", threshold=self.params.threshold),
        ]

    def val_pre_transforms(self, context: Context) -> list:
        return val_transforms(self.params)

    def val_post_transforms(self, context: Context) -> list:
        return [
            Activationsd(keys="pred", sigmoid=True),
            AsDiscreted(keys="pred", threshold=self.params.threshold),
        ]

    def val_inferer(self, context: Context) -> Inferer:
        return build_inferer(self.params, flip_tta=False)

    def train_key_metric(self, context: Context) -> dict:
        # Every channel is a structure, none is "background"; uncontoured ones are left out (NaN).
        return {self.TRAIN_METRIC_MEAN_DICE: MeanDice(output_transform=contained_only)}

    def val_key_metric(self, context: Context) -> dict:
        return {self.VAL_METRIC_MEAN_DICE: MeanDice(output_transform=contained_only)}

    def train_handlers(self, context: Context) -> list:
        handlers = super().train_handlers(context)
        if context.quality_loss is not None:
            handlers.append(context.quality_loss)  # binds the trainer, whose state holds the batch's images
        if context.local_rank == 0:
            handlers.append(PublishBestModel(self, context))
        if context.multi_gpu:
            handlers.append(ReportRankWeights(context))
        return handlers

    def load_path(self, output_dir, pretrained=True):
        return None  # network() loads the served weights strictly; PublishBestModel resumes

    def partition_datalist(self, context: Context, shuffle: bool = False):
        """A seeded random split (MONAI Label's default takes the datalist's tail, which is sorted by id)."""
        val_split = float(context.request.get("val_split", 0.2))
        datalist = context.datalist
        if len(datalist) < 2:
            raise ValueError(
                f"training needs at least 2 labelled images, the datastore has {len(datalist)} with structures of "
                f"model {self.name} ({self.params.structure_list.names})"
            )
        if val_split <= 0:
            return datalist, []
        n_val = min(max(1, round(len(datalist) * val_split)), len(datalist) - 1)
        train, val = partition_dataset(
            datalist,
            ratios=[len(datalist) - n_val, n_val],
            shuffle=True,
            seed=int(context.request.get("seed", 0)),
        )
        logger.info(f"training on {len(train)} labelled images, validating on {len(val)}")
        return train, val

    def _device(self, context: Context) -> torch.device:
        """Under torchrun: this process's own GPU (LOCAL_RANK, right on several nodes too), or the
        CPU for gloo ranks. MONAI Label's own multi-GPU path assumes one node of GPUs."""
        if not context.multi_gpu:
            return super()._device(context)
        if torch.cuda.is_available():
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', context.local_rank))}")
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _create_network_and_optimizer(self, context: Context):
        if not (context.multi_gpu and context.device.type == "cpu"):
            return super()._create_network_and_optimizer(context)
        network = self.network(context)
        context.network = network
        optimizer = self.optimizer(context)
        ddp = torch.nn.parallel.DistributedDataParallel(network, find_unused_parameters=self._find_unused_parameters)
        return ddp, optimizer

    def pre_process(self, request: dict, datastore: Datastore) -> list[dict[str, Any]]:
        """The datastore's labelled pairs that contain any of this model's structures (``model_datalist``),
        less the commissioning cases; who annotated each label is noted for the version's record."""
        known = getattr(datastore, "structures", None) or self.params.structure_list
        datalist = model_datalist(datastore.datalist(), self.params.structure_list, known, self.name)
        if self.versions is not None:
            datalist = CommissioningSet.of(self.versions).exclude(datalist)
        for entry in datalist:
            info = datastore.get_label_info(case_id(entry), "final") if hasattr(datastore, "get_label_info") else {}
            self._annotators[os.path.basename(str(entry["label"]))] = (info or {}).get("annotator")
        return datalist

    def train(self, rank, world_size, request, datalist):
        if as_bool(request.get("quality_weighting", False)):
            volumes, patches = int(request["train_batch_size"]), int(request.get("patches_per_volume", 2))
            if volumes < 2 or volumes * patches < 4:
                raise ValueError(
                    "quality_weighting compares samples within a batch: it needs train_batch_size >= 2 and >= 4"
                    f" patches per batch, got {volumes} x {patches}"
                )
        # Mixed precision only where it helps and is supported: CUDA.
        self._amp = as_bool(request.get("amp", False)) and torch.cuda.is_available()
        threads = int(request.get("threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(int(request.get("seed", 0)))
        return super().train(rank, world_size, request, datalist)


class BatchQualityLoss(torch.nn.Module):
    """QAM+OCM-weighted per-sample loss for the ignite trainer, whose loss signature is (pred, label):
    the batch's images are read from the trainer's state, where the iteration put them."""

    def __init__(self, per_sample_loss: torch.nn.Module, weighting: QualityWeightedLoss):
        super().__init__()
        self.per_sample_loss = per_sample_loss
        self.weighting = weighting
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        image = self.engine.state.output["image"]
        return self.weighting(self.per_sample_loss(pred, label), image, label)


class ReportRankWeights:
    """Trainer handler under torchrun: each rank logs the digest of its weights at the end
    (DDP keeps them bit-identical; the tests check that it did)."""

    def __init__(self, context: Context):
        self.context = context

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: Engine) -> None:
        rank, world = self.context.local_rank, self.context.world_size
        logger.info(f"rank {rank}/{world} weights sha256 {weights_digest(self.context.network)}")


class PublishBestModel:
    """Trainer handler: resume at start; after each epoch's validation, save the resume state and
    publish the weights when they beat the best validation Dice so far."""

    def __init__(self, task: CTVTrain, context: Context):
        self.task = task
        self.context = context
        self.resume_path = os.path.join(task._model_dir, context.request["name"], "resume.pt")
        self.best = -1.0
        self.history: list[dict[str, Any]] = []
        self.labels = labels_record([str(d["label"]) for d in context.train_datalist], task._annotators)
        self.epoch_start = time.time()
        # Clinical mode: the run's best weights wait here until the run ends, then become a candidate version.
        self.candidate_path = os.path.join(task._model_dir, context.request["name"], "candidate.pt")
        self.clinical = task.versions is not None and task.versions.mode == "clinical"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    @property
    def net(self) -> torch.nn.Module:
        net = self.context.network
        return net.module if hasattr(net, "module") else net

    def started(self, engine: Engine) -> None:
        request = self.context.request
        if as_bool(request.get("resume", True)) and os.path.exists(self.resume_path):
            ckpt = load_checkpoint(self.resume_path, map_location=str(self.context.device))
            if ckpt["params"] == self.task.params.to_dict():
                self.net.load_state_dict(ckpt["model"])
                self.context.optimizer.load_state_dict(ckpt["meta"]["optimizer"])
                engine.state.epoch = ckpt["meta"]["epoch"]
                engine.state.iteration = engine.state.epoch * engine.state.epoch_length
                self.best = ckpt["meta"]["best_val_dice"]
                self.history = ckpt["meta"]["history"]
                logger.info(f"resumed at epoch {engine.state.epoch} from {self.resume_path}; best Dice {self.best:.4f}")
                return
            logger.warning(f"ignoring {self.resume_path}: it was trained with other parameters")
        if not self.clinical and os.path.exists(self.task.served_path) and self.context.evaluator is not None:
            # A new model replaces the served one only if it is better on this run's validation split. (In
            # clinical mode the run's best epoch is the candidate: the commissioning set judges it.)
            served = self._served_dice()
            if served is not None:
                self.best = served
                logger.info(f"served model's validation Dice {served:.4f}: publishing only above it")

    def _served_dice(self) -> float | None:
        ckpt = load_checkpoint(self.task.served_path, map_location=str(self.context.device))
        if ckpt.get("params") and CTVParams.from_dict(ckpt["params"]).network_key() != self.task.params.network_key():
            return None
        current = {k: v.clone() for k, v in self.net.state_dict().items()}
        self.net.load_state_dict(ckpt["model"])
        self.context.evaluator.run()
        self.net.load_state_dict(current)
        return float(self.context.evaluator.state.metrics[self.task.VAL_METRIC_MEAN_DICE])

    def epoch_started(self, engine: Engine) -> None:
        self.epoch_start = time.time()

    def epoch_completed(self, engine: Engine) -> None:
        epoch, max_epochs = engine.state.epoch, engine.state.max_epochs
        evaluator = self.context.evaluator
        val_dice = float(evaluator.state.metrics[self.task.VAL_METRIC_MEAN_DICE]) if evaluator else None
        loss = engine.state.output[0]["loss"] if isinstance(engine.state.output, list) else None
        self.history.append(
            {
                "epoch": epoch,
                "val_dice": val_dice,
                "loss": float(loss) if loss is not None else None,
                "seconds": time.time() - self.epoch_start,
            }
        )
        meta = {
            "epoch": epoch,
            "val_dice": val_dice,
            **self.labels,
            "val_labels": [os.path.basename(str(d["label"])) for d in self.context.val_datalist],
            "started_from": self.context.started_from,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_config": {
                k: v for k, v in self.context.request.items() if isinstance(v, (str, int, float, bool, type(None)))
            },
        }
        if getattr(self.context, "quality", None) is not None:
            meta["qam"] = self.context.quality.state_dict()  # scores labelled cases for review
        published = ""
        score = val_dice if val_dice is not None else -1.0
        if val_dice is None or score > self.best:
            self.best = max(score, self.best)
            if self.clinical:
                sha = save_checkpoint(self.candidate_path, self.net.state_dict(), self.task.params, meta)
                published = f"; best so far {sha[:12]} (a candidate when the run ends)"
            else:
                sha = save_checkpoint(self.task.served_path, self.net.state_dict(), self.task.params, meta)
                if self.task.versions is not None:
                    self.task.versions.publish(self.task.served_path, "trained")
                published = f"; published {sha[:12]}"
        save_checkpoint(
            self.resume_path,
            self.net.state_dict(),
            self.task.params,
            {
                **meta,
                "best_val_dice": self.best,
                "history": self.history,
                "optimizer": self.context.optimizer.state_dict(),
            },
        )
        dice_txt = f"{val_dice:.4f}" if val_dice is not None else "n/a"
        logger.info(
            f"{self.task.name} epoch {epoch}/{max_epochs} val_dice {dice_txt} best {self.best:.4f}"
            f" ({self.history[-1]['seconds']:.1f}s){published}"
        )

    def completed(self, engine: Engine) -> None:
        if self.clinical and os.path.exists(self.candidate_path):
            record = self.task.versions.add(self.candidate_path, "trained")
            os.unlink(self.candidate_path)
            logger.info(f"{self.task.name}: candidate version {record['sha256'][:12]} for commissioning; "
                        f"the served version is unchanged")  # fmt: skip
        if engine.state.epoch >= engine.state.max_epochs and os.path.exists(self.resume_path):
            os.unlink(self.resume_path)  # finished: nothing to resume
