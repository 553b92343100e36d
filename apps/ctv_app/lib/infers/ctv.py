"""The contouring infer task (every model's: ``ctv``, ``hn``): MONAI Label's BasicInferTask with its hooks filled in."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import nibabel as nib
import nrrd
import numpy as np
import torch
from monai.inferers import Inferer
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import name_to_device

from ..checkpoint import load_checkpoint
from ..dicom.results import RTConfig, check_result_format, write_dicom_result
from ..engines import ENGINES_BY_VERSION, Engine, EngineSettings, choose_engine
from ..errors import InvalidInputError, ModelUnavailableError
from ..inferers import build_inferer
from ..params import CTVParams, as_bool
from ..provenance import InputRead, model_record, software_versions
from ..structures import ENCODINGS, Structures
from ..transforms import post_transforms, pre_transforms

logger = logging.getLogger(__name__)


def write_nrrd(mask: np.ndarray, affine: np.ndarray, compress: bool = True) -> str:
    """The label volume as NRRD in LPS space; voxel order as in the NIfTI (first index fastest)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip" if compress else "raw",
    }
    fd, path = tempfile.mkstemp(suffix=".nrrd")
    os.close(fd)
    nrrd.write(path, mask, header, index_order="F")
    return path


def write_nifti(mask: np.ndarray, affine: np.ndarray, provenance: dict[str, Any], labels: dict[str, Any]) -> str:
    """The label volume as NIfTI carrying its provenance: input and model sha256 in ``descrip``, and the
    whole record with the structures it holds (``labels``: encoding and structures) as JSON in a header
    extension (comment), so the file names where it came from and what its values mean."""
    out = nib.Nifti1Image(mask, affine)
    out.header.set_xyzt_units("mm")
    model = (provenance.get("model") or {}).get("sha256") or ""
    out.header["descrip"] = f"{labels['encoding']} in {str(provenance['input']['sha256'])[:16]} model {model[:16]}".encode()[:79]
    summary = {k: v for k, v in provenance.items() if k != "model"} | {"model": _model_summary(provenance)}
    text = json.dumps(summary | labels)
    out.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text.encode()))
    fd, path = tempfile.mkstemp(suffix=".nii.gz")
    os.close(fd)
    nib.save(out, path)
    return path


def _model_summary(provenance: dict[str, Any]) -> dict[str, Any]:
    model = provenance.get("model") or {}
    return {k: model.get(k) for k in ("name", "sha256", "trained", "epoch", "val_dice", "train_labels_sha256")}


@dataclass(frozen=True)
class ServedModel:
    """One loaded checkpoint: its network, the engine that runs it (``lib/engines.py``: chosen for this
    version on this machine), the parameters its results are computed with (the checkpoint's own, then the
    ``--conf`` overrides), its provenance record (which names those parameters) and its QAM. A request
    holds one of these from pre-processing to writing, so a swap never mixes two models."""

    network: torch.nn.Module
    engine: Engine
    params: CTVParams
    record: dict[str, Any]
    qam: dict[str, Any] | None
    mtime: float


class CTVInfer(BasicInferTask):
    """Whole-volume CTV segmentation; the result keeps the input's exact shape and affine."""

    def __init__(
        self,
        path: str,
        network: torch.nn.Module,
        params: CTVParams,
        name: str = "ctv",
        rt_config: RTConfig | None = None,
        overrides: dict[str, Any] | None = None,
        defaults: CTVParams | None = None,
        description: str = "Cervical-cancer CTV on planning CT (residual SE-DynUNet)",
        missing: str | None = None,
        engine_settings: EngineSettings | None = None,
        **kwargs,
    ):
        """``params``: those of the checkpoint at start, with ``overrides`` (``--conf <name>_<param>``)
        applied; ``overrides`` apply again to every checkpoint swapped in later. ``defaults``: the model's
        parameters for a checkpoint that records none (default ``CTVParams()``). ``missing``: what a
        request is told while there are no weights at ``path`` (default: train or give some).
        ``engine_settings``: how each loaded version's engine is chosen (default: measured, ``auto``)."""
        self.name = name
        self.engine_settings = engine_settings or EngineSettings()
        self.missing = missing
        # Called with (model, image id, bitmask, structures, affine, version) for each result on a datastore
        # study (the request's ``datastore_image``, set by the app): monitoring keeps it.
        self.on_prediction: Callable[..., None] | None = None
        self.params = params
        self.overrides = overrides or {}
        self.defaults = defaults or CTVParams()
        self.rt_config = rt_config or RTConfig()
        self._loaded: dict[str, ServedModel] = {}  # device -> the model served there
        self._request = threading.local()  # .model: the ServedModel of the request this thread runs
        super().__init__(
            path=path,
            network=network,
            type=InferType.SEGMENTATION,
            labels=params.labels,
            dimension=3,
            description=description,
            config={"flip_tta": params.flip_tta, "threshold": params.threshold},
            **kwargs,
        )
        self.name = name

    def __call__(self, request: dict[str, Any], callbacks=None):
        # Refuse a result format the input cannot have before spending model time on it.
        request["result_format"] = check_result_format(request.get("result_format"), request.get("image"))
        request["label_encoding"] = check_encoding(request.get("label_encoding"))
        served = self.served(name_to_device(request.get("device", "cuda")))
        # The request's own settings, else the served model's (not those of the model served at start).
        request = {"flip_tta": served.params.flip_tta, "threshold": served.params.threshold, **request}
        returned = returned_structures(served.params.structure_list, request.get("structures"))
        self._request.model = served
        try:
            path, result = super().__call__(request, callbacks)
        finally:
            self._request.model = None
        if isinstance(result, dict):
            result["label_names"] = returned.labels  # MONAI Label's key, for the structures returned
        return path, result

    def config(self) -> dict[str, Any]:
        """The request defaults /info shows: those of the model served now (a swapped-in model brings its own)."""
        try:
            params = self.served().params
        except ModelUnavailableError:  # no weights yet: the start-up parameters
            params = self.params
        return {**self._config, "flip_tta": params.flip_tta, "threshold": params.threshold}

    def info(self) -> dict[str, Any]:
        """MONAI Label's, with the engine serving the model now and how it was chosen."""
        try:
            engine = self.served().engine.record
        except ModelUnavailableError:
            engine = None
        return {**super().info(), "engine": engine}

    def _model(self) -> ServedModel:
        """The model of the request this thread runs; outside a request, the one served now."""
        return getattr(self._request, "model", None) or self.served()

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return pre_transforms(self._model().params, keep_input=True)

    def inferer(self, data=None) -> Inferer:
        params = self._model().params
        if not data:
            return build_inferer(params)
        data["flip_tta"] = as_bool(data.get("flip_tta", params.flip_tta))  # the writer reports it
        return build_inferer(params, device=data.get("device"), flip_tta=data["flip_tta"])

    def post_transforms(self, data=None) -> Sequence[Callable]:
        params = self._model().params
        if data and "threshold" in data:
            params = params.updated({"threshold": float(data["threshold"])})
        return post_transforms(params)

    def _get_network(self, device, data):
        served = getattr(self._request, "model", None) or self.served(device)
        if data is not None:
            data["model_record"] = served.record
        return served.engine.network

    def served(self, device: str | None = None) -> ServedModel:
        """The served model, reloaded when the checkpoint file changes (a training run published one, or
        ``PUT /model`` replaced it), with the parameters it was trained with.

        The file is read once and hashed from the same bytes, so the model version a result names is
        the model that made it. A new file that cannot be loaded is refused and the previous model
        keeps serving.
        """
        device = str(name_to_device(device))  # None: the GPU if there is one
        path = self.get_path()
        if not path:
            raise ModelUnavailableError(
                self.missing
                or f"no {self.name} weights at {self.path[-1]} yet: train a model first (POST /train/{self.name})"
                f" or give one (--conf {self.name}_model <checkpoint>)"
            )
        mtime = os.stat(path).st_mtime
        cached = self._loaded.get(device)
        if cached is None or cached.mtime != mtime:
            try:
                self._loaded[device] = self._load(path, device, mtime)
                logger.info(f"serving {self.name} model {self._loaded[device].record['sha256'][:12]} from {path}")
            except Exception as e:
                if cached is None:
                    raise ModelUnavailableError(f"cannot load {self.name} weights {path}: {e}") from e
                logger.error(
                    f"refusing new {self.name} weights {path} ({e}); still serving {cached.record['sha256'][:12]}"
                )
                self._loaded[device] = replace(cached, mtime=mtime)
        return self._loaded[device]

    def check_weights(self, path: str) -> dict[str, Any]:
        """The provenance record of weights this task would serve; raises if it cannot load them."""
        return self._load(path, "cpu", os.stat(path).st_mtime, choose=False).record

    def _load(self, path: str, device: str, mtime: float, choose: bool = True) -> ServedModel:
        """``choose``: pick its engine (measured; cached by the version's sha256), else PyTorch."""
        with open(path, "rb") as f:
            blob = f.read()
        checkpoint = load_checkpoint(io.BytesIO(blob), map_location=device)
        trained = checkpoint.get("params")
        own = CTVParams.from_dict(trained) if trained is not None else self.defaults
        params = own.updated(self.overrides)
        if own.structure_list.names != params.structure_list.names:
            raise ValueError(
                f"it contours {own.structure_list.names}; --conf {self.name}_structures asks for "
                f"{params.structure_list.names}"
            )
        if params.labels != self.params.labels:
            raise ValueError(f"it contours {params.structure_list.names}, this server serves {self.params.structure_list.names}")
        if params.network_key() != self.params.network_key():
            raise ValueError(
                f"it was trained as {params.network_key()}, this server builds {self.params.network_key()}"
            )
        network = copy.deepcopy(self.network).to(torch.device(device))
        network.load_state_dict(checkpoint["model"], strict=True)
        network.eval()
        record = model_record(self.name, path, checkpoint, hashlib.sha256(blob).hexdigest(), params)
        engine = Engine(network, "torch", "f32")
        if choose:
            inferer = build_inferer(params, device=device, flip_tta=False)
            engine = ENGINES_BY_VERSION.get(record["sha256"], device, self.engine_settings,
                                            lambda: choose_engine(network, params, device, self.engine_settings, inferer))  # fmt: skip
        return ServedModel(network, engine, params, record, checkpoint.get("meta", {}).get("qam"), mtime)

    def model_record(self) -> dict[str, Any]:
        """Provenance of the model now served (loading it if needed)."""
        return self.served().record

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        """Write the mask in the requested ``result_format``: NIfTI with the affine the loader read
        from the input, bit for bit (NRRD when a viewer asks ``result_extension: .nrrd``, as OHIF's
        MONAI Label panel does), or DICOM SEG / RTSTRUCT referencing the source series.

        The input's sha256 and the DICOM headers are those the loader read (``image_read``): the path
        is not read again, so a file replaced meanwhile changes neither what a result names nor what it
        references."""
        image = data["image"]
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        structures = self._model().params.structure_list
        bitmask = np.asarray(data["pred"])  # post_transforms: one bit per structure, on the input grid
        if self.on_prediction is not None and data.get("datastore_image"):
            record = data.get("model_record") or {}
            self.on_prediction(self.name, data["datastore_image"], bitmask, structures, affine, record.get("sha256"))
        returned = returned_structures(structures, data.get("structures"))
        if returned != structures:  # a subset: renumbered, so values and bits follow the list returned
            bitmask = returned.pack([structures.mask(bitmask, s.name) for s in returned])
        encoding = check_encoding(data.get("label_encoding"))
        volume = returned.labelmap(bitmask) if encoding == "labelmap" else bitmask
        source = data.get("image_path")
        read: InputRead | None = data.get("image_read")  # LoadCTImaged(keep_read=True)
        result = dict(data.get(self.output_json_key, {}))
        result["provenance"] = {
            "input": {
                "image": os.path.basename(str(source)) if source else None,
                "sha256": read.sha256 if read else None,
                "shape": [int(s) for s in bitmask.shape],
                "affine": affine.tolist(),
            },
            "model": data.get("model_record"),
            "engine": self._model().engine.record,
            "software": software_versions(),
            "request": {
                "flip_tta": data.get("flip_tta", self.params.flip_tta),
                "threshold": float(data.get("threshold", self.params.threshold)),
            },
        }
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
        result["label_encoding"] = encoding
        result["structures"] = []
        for value, structure in enumerate(returned, start=1):
            voxels = int(np.count_nonzero(bitmask & bitmask.dtype.type(1 << (value - 1))))
            result["structures"].append(
                {"name": structure.name, "value": value, "roi_type": structure.roi_type,
                 "colour": list(structure.colour), "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3)}
            )  # fmt: skip
        labels = {"encoding": encoding, "structures": [{k: s[k] for k in ("name", "value", "roi_type", "colour")}
                                                       for s in result["structures"]]}  # fmt: skip
        if str(data.get("result_extension", "")).endswith(".nrrd"):
            path = write_nrrd(volume, affine, compress=as_bool(data.get("result_compress", True)))
        else:
            path = write_nifti(volume, affine, result["provenance"], labels)
        fmt = data.get("result_format", "nifti")
        result["result_format"] = fmt
        if fmt != "nifti":
            os.unlink(path)
            path, result["dicom"] = write_dicom_result(
                fmt, bitmask, returned, read.series, self.rt_config, result["provenance"]
            )
        return path, result


def returned_structures(structures: Structures, requested: Any) -> Structures:
    """The structures a request asks for (``structures``: names or synonyms), in the model's order; all
    of them by default. A 422 names any the model does not contour."""
    if requested is None:
        return structures
    if isinstance(requested, str):
        requested = [n for n in requested.split(",") if n.strip()]
    if not isinstance(requested, (list, tuple)) or not requested or not all(isinstance(n, str) for n in requested):
        raise InvalidInputError(f"structures must be a non-empty list of structure names, got {requested!r}")
    try:
        return Structures(structures.subset(requested))
    except ValueError as e:
        raise InvalidInputError(str(e)) from e


def check_encoding(encoding: Any) -> str:
    """The request's ``label_encoding``: ``labelmap`` (default; viewers) or ``bitmask`` (lossless)."""
    encoding = str(encoding or "labelmap").lower()
    if encoding not in ENCODINGS:
        raise InvalidInputError(f"label_encoding must be one of {ENCODINGS}, got {encoding!r}")
    return encoding
