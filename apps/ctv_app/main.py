"""MONAI Label app: radiotherapy structures on planning CT (the cervix model ``ctv``, the head-and-neck ``hn``).

monailabel start_server --app apps/ctv_app --studies datastore/demo [--conf models ctv,hn]
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

import monailabel
import torch
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.async_tasks.task import AsyncTask

from ctv_app.lib import web
from ctv_app.lib.admission import InferenceGate
from ctv_app.lib.api import install_api
from ctv_app.lib.audit import AuditLog
from ctv_app.lib.cases import CaseStore
from ctv_app.lib.commissioning import AcceptanceCriteria, CommissioningSet, commission, report_html, save_report
from ctv_app.lib.configs import CONFIGS, ContouringConfig
from ctv_app.lib.datastore import CTVDatastore
from ctv_app.lib.dicom.dicomweb import CTVDicomWebDatastore
from ctv_app.lib.dicom.results import RTConfig
from ctv_app.lib.errors import CTVError, ImageNotFoundError, InvalidInputError
from ctv_app.lib.monitoring import EditMonitor, MostEdited
from ctv_app.lib.params import as_bool, check_infer_request
from ctv_app.lib.provenance import software_versions
from ctv_app.lib.security import Users, configured_origins, trust_forwarded_headers_from, trusted_proxies
from ctv_app.lib.structures import Structure, Structures
from ctv_app.lib.transforms.labels import model_datalist
from ctv_app.lib.versions import ModelVersions
from ctv_app.lib.web import ContouringService

logger = logging.getLogger(__name__)


def data_dir(studies: str, conf: dict[str, str]) -> str:
    """Where the server keeps what it makes (model versions, commissioning): ``--conf data_dir``, else
    $CTV_DATA, else ``<studies>/.ctv`` beside a folder datastore (hidden: never scanned as images), else
    ``~/.ctv-label`` (a DICOMweb datastore has no folder of its own). Never the app's folder, which git tracks."""
    chosen = conf.get("data_dir") or os.environ.get("CTV_DATA")
    if not chosen:
        remote = studies.startswith(("http://", "https://"))
        chosen = os.path.join(os.path.expanduser("~"), ".ctv-label") if remote else os.path.join(studies, ".ctv")
    os.makedirs(chosen, exist_ok=True)
    return os.path.abspath(chosen)


class CTVApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        """``--conf models ctv,hn``: the models served (``configs.CONFIGS``; default ``ctv``), each one
        ``ContouringConfig``. The first is the default one: the page's and auto-training's, and its
        scoring methods and strategies keep their plain names (``uncertain``; the others' ``hn_uncertain``)."""
        conf = {**conf, "data_dir": data_dir(studies, conf)}
        names = list(dict.fromkeys(n.strip() for n in conf.get("models", "ctv").split(",") if n.strip()))
        unknown = [n for n in names if n not in CONFIGS]
        if unknown or not names:
            raise ValueError(f"unknown models {unknown or names}; available: {sorted(CONFIGS)}")
        self.models: dict[str, ContouringConfig] = {}
        for i, name in enumerate(names):
            config = CONFIGS[name]()
            config.init(name, os.path.join(app_dir, "model"), conf, None, primary=i == 0)
            self.models[name] = config
        self.commissioning = CommissioningSet(conf["data_dir"])
        self.criteria = AcceptanceCriteria.load(conf.get("acceptance_criteria"))
        self.monitor = EditMonitor(conf["data_dir"], self.criteria, window=int(conf.get("monitor_window", 10)))
        self.auto_train_after = int(conf.get("auto_train_after", 0))
        self._labels_since_training = 0
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CTV contouring",
            description="Radiotherapy structures on planning CT (models: "
            + ", ".join(f"{n}: {c.description}" for n, c in self.models.items())
            + "); learns from corrected contours",
            version=monailabel.__version__,
        )
        # Scores depend on the model: the uncertain strategy rescores lazily instead of after every call.
        self._auto_update_scoring = conf.get("auto_update_scoring", "false").lower() == "true"
        self.infer_gate = InferenceGate(
            workers=int(conf.get("infer_workers", 1)), max_waiting=int(conf.get("infer_max_waiting", 8))
        )
        self._mount_web(app_dir, conf)

    def _mount_web(self, app_dir: str, conf: dict[str, str]) -> None:
        """Access control, audit and API changes (``lib/api.py``) and the contouring page at /ctv/ (every
        served model; the first by default).

        ``--conf cases_path DIR`` keeps the page's uploads (default <app>/cases); ``--conf audit_log
        FILE`` (or CTV_AUDIT_LOG) the audit trail (default <app>/logs/audit.jsonl); CTV_MAX_UPLOAD_MB
        (or ``--conf max_upload_mb``) bounds request bodies (default 2048); ``--conf contour_max_pending N``
        the page's contours queued or running (default 16)."""
        server = sys.modules.get("monailabel.app")
        if server is None:  # a training or scoring subprocess: no web server here
            return
        audit_path = conf.get("audit_log") or os.environ.get("CTV_AUDIT_LOG")
        audit_path = audit_path or os.path.join(app_dir, "logs", "audit.jsonl")
        max_upload_mb = float(conf.get("max_upload_mb") or os.environ.get("CTV_MAX_UPLOAD_MB") or 2048)
        users = Users.configured()
        logger.info(f"access control {'on: ' + str(users.count) + ' users' if users else 'OFF (local demo)'}")
        origins, proxies = configured_origins(), trusted_proxies()
        trust_forwarded_headers_from(proxies)
        logger.info(f"other sites' pages allowed: {sorted(origins) or 'none'}; trusted proxies: {proxies or 'none'}")
        dicomweb = self.studies.startswith(("http://", "https://"))
        audit = AuditLog(audit_path)
        self.monitor.on_alarm = audit.record  # an alarm's start is audited
        install_api(server.app, users, audit, int(max_upload_mb * 2**20), dicomweb, origins)
        default, config = next(iter(self.models.items()))
        store = CaseStore(conf.get("cases_path") or os.path.join(app_dir, "cases"))
        self.contouring = ContouringService(
            store, self, default, config.params.window, config.rt_config,
            max_pending=int(conf.get("contour_max_pending", 16)),
            models={n: c.params.structure_list for n, c in self.models.items()},
        )  # fmt: skip
        # An annotation may hold any structure the datastore knows, in its values.
        web.mount(server.app, self.contouring, {0, *self.known_structures().labels.values()})

    # --- the clinical lifecycle: versions, commissioning, approval (docs/clinical.md) ---------------------
    def versions(self, model: str) -> ModelVersions:
        config = self.models.get(model)
        if config is None or config.versions is None:
            raise ImageNotFoundError(f"model '{model}' is not served here; available: {sorted(self.models)}")
        return config.versions

    def commission(self, model: str, version: str) -> dict[str, Any]:
        """Run the commissioning report of a version of ``model`` on the commissioning cases (lib/commissioning.py)."""
        versions, config = self.versions(model), self.models[model]
        sha = versions.resolve(version)
        datalist = model_datalist(self.datastore().datalist(), config.params.structure_list, self.known_structures(), model)
        cases = self.commissioning.select(datalist)
        approved_sha = versions.approved_version()
        approved = None
        if approved_sha and approved_sha != sha:
            approved = (approved_sha, config.task_for(versions.checkpoint_path(approved_sha)))
        task = config.task_for(versions.checkpoint_path(sha))
        report, comparisons = commission(model, sha, task, cases, self.criteria, approved,
                                         lambda case: logger.info(f"commissioning {model} {sha[:12]}: {case}"))  # fmt: skip
        html = report_html(report, comparisons, task.served("cpu").params.structure_list)
        summary = save_report(self.commissioning, report, html)
        versions.add_report(sha, summary)
        return {**summary, "version": sha, "structures": {n: s["passed"] for n, s in report["structures"].items()}}

    def info(self) -> dict[str, Any]:
        """MONAI Label's, with each model's mode, served version and monitoring alarms."""
        meta = super().info()
        meta["lifecycle"] = {
            name: {"mode": config.versions.mode, "served_version": config.versions.served_version(),
                   "alarms": self.monitor.alarms(name)}
            for name, config in self.models.items() if config.versions is not None
        }  # fmt: skip
        return meta

    def init_infers(self) -> dict[str, InferTask]:
        infers = {name: config.infer() for name, config in self.models.items()}
        for task in infers.values():
            task.on_prediction = self.monitor.remember
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers = {}
        for name, config in self.models.items():
            trainer = config.trainer()
            if trainer is not None:
                trainers[name] = trainer
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for config in self.models.values():
            strategies.update(config.strategy() or {})
            strategies[f"{config.task_prefix}most_edited"] = MostEdited(self.monitor, config.name)
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        methods: dict[str, ScoringMethod] = {}
        for config in self.models.values():
            methods.update(config.scoring_method() or {})
        return methods

    def known_structures(self) -> Structures:
        """The structures the datastore's labels may contain: the served models' together, in order
        (the first model's first), each once."""
        known: dict[str, Structure] = {}
        for config in self.models.values():
            for structure in config.params.structure_list:
                known.setdefault(structure.name, structure)
        return Structures(known.values())

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return self._init_dicomweb()
        return CTVDatastore(
            self.studies,
            structures=self.known_structures(),
            rt_config=RTConfig.from_conf(self.conf),
            recover="monailabel.app" in sys.modules,  # the server, not its training subprocess
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _readable_path(self, image: str) -> bool:
        """A path the server may read for a request: an upload of this request (MONAI Label writes
        it to the temp folder) or a case of the contouring page. Any other string is a datastore id,
        so a client cannot make the server read an arbitrary file."""
        if not os.path.exists(image):
            return False
        real = os.path.realpath(image)
        uploads = os.path.realpath(tempfile.gettempdir())
        if os.path.dirname(real) == uploads and os.path.basename(real).startswith("tmp"):
            return True
        contouring = getattr(self, "contouring", None)
        return contouring is not None and real.startswith(contouring.store.root + os.sep)

    def _init_dicomweb(self) -> Datastore:
        """A DICOMweb PACS (e.g. Orthanc); credentials from MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD."""
        self.studies = self.studies.rstrip("/")
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(
                settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
            )
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        return CTVDicomWebDatastore(
            client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            structures=self.known_structures(),
            cache_path=(settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None,
            software_version=software_versions()["ctv-label"],
        )

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        """Counts saved labels; with ``--conf auto_train_after N`` (N > 0) starts training every N of them
        (the first model served: with several, the others train on request, ``POST /train/<model>``)."""
        super().on_save_label(image_id, label_id)
        self._monitor_edit(image_id, label_id)
        self._labels_since_training += 1
        if 0 < self.auto_train_after <= self._labels_since_training:
            if AsyncTask.status("train", check_if_running=True)[0] is None:
                logger.info(f"{self._labels_since_training} new or changed labels: starting training")
                self._labels_since_training = 0
                return {"train": self.async_training(list(self.models)[0])}
        return {}

    def _monitor_edit(self, image_id: str, label_id: str) -> None:
        """Compare the saved final label with the served models' contours of the study (lib/monitoring.py);
        monitoring never fails a save."""
        try:
            store = self.datastore()
            path = store.get_label_uri(label_id, "final")
            if path:
                info = store.get_label_info(label_id, "final") or {}
                models = {n: c.infer().served("cpu").params.structure_list for n, c in self.models.items()
                          if os.path.exists(c.path)}  # fmt: skip
                self.monitor.record_edit(image_id, path, info, models)
        except Exception:
            logger.exception(f"monitoring: could not compare the label of {image_id} with the model's contours")

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(
                status_code=404, detail=f"strategy '{strategy}' does not exist; available: {sorted(self._strategies)}"
            )
        return super().next_sample(request)

    def batch_infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's batch inference; an unknown model is a 404, and without CUDA it runs on the CPU
        (MONAI Label's spreads the work over the GPUs it finds: none here)."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"model '{model}' is not served here; available: {sorted(self._infers)}"
            )
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False, "device": "cpu"}
        return super().batch_infer(request, datastore)

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's infer, with the caller's mistakes answered as 4xx instead of 500.

        ``store_result: true`` (DICOMweb datastore, DICOM result formats) sends the result to the
        PACS with STOW-RS; the result JSON then says what was stored under ``stored``. MONAI Label's
        ``save_label`` is refused: a label is saved with ``PUT /datastore/label`` (role, checks,
        history, audit and the auto-training count)."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"model '{model}' is not served here; available: {sorted(self._infers)}"
            )
        try:
            if request.get("save_label") not in (None, False, "false"):
                raise InvalidInputError("save_label is not served by /infer: save labels with PUT /datastore/label")
            check_infer_request(request)
            store = datastore or self.datastore()
            image = request.get("image")
            if isinstance(image, str) and not self._readable_path(image):
                uri = store.get_image_uri(image)
                if not uri:
                    raise ImageNotFoundError(f"image '{image}' is not in the datastore")
                if os.path.exists(image):  # an id that is also a relative path here: the id wins
                    request = {**request, "image": uri}
                request = {**request, "datastore_image": image}  # monitoring keeps the contours of a study
            else:
                request = {**request, "datastore_image": None}  # never the client's
            store_result = as_bool(request.get("store_result", False))
            if store_result:
                if not isinstance(store, CTVDicomWebDatastore):
                    raise InvalidInputError("store_result needs a DICOMweb datastore to store the result in")
                if str(request.get("result_format") or "nifti").lower() == "nifti":
                    raise InvalidInputError("store_result needs result_format 'dicom_seg' or 'rtstruct'")
            with self.infer_gate.slot():
                result = super().infer(request, datastore)
            if store_result:
                try:
                    result["params"]["stored"] = store.store_result(result["file"])
                except CTVError:
                    os.unlink(result["file"])
                    raise
            return result
        except CTVError as e:
            logger.warning(f"infer rejected: {e}")
            raise HTTPException(status_code=e.status_code, detail=str(e), headers=e.headers) from e
