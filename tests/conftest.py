"""Session fixtures: a temporary datastore and the real server serving it; a real Orthanc and the
server on it as a DICOMweb datastore."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel.client import MONAILabelClient

from ctv_app.lib.dicom.rtstruct import ROI, write_rtstruct
from ctv_app.lib.dicom.series import read_ct_geometry
from ctv_datastore.build import HELD_OUT_SEED_START, build
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .support import REAL_CT, REPO, SHARED_DATA, OrthancProcess, ServerProcess

# --- a test run leaves the repository as it found it --------------------------------------------------
GIT_STATUS_BEFORE = pytest.StashKey["str | None"]()


def git_status() -> str | None:
    """``git status`` of the repository (tracked changes and untracked files git does not ignore)."""
    try:
        run = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout if run.returncode == 0 else None  # not a git checkout (e.g. an sdist): nothing to check


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[GIT_STATUS_BEFORE] = git_status()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test or a tool it started wrote into the repository (a tracked file changed, or a
    file appeared that git does not ignore): tests write only to their temp folders."""
    before, after = session.config.stash.get(GIT_STATUS_BEFORE, None), git_status()
    if before is None or after is None or after == before:
        return
    changed = sorted(set(after.splitlines()) - set(before.splitlines()))
    print("\nthe test run changed the repository (git status):\n" + "\n".join(changed))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

HELD_OUT_SEEDS = list(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + 4))


DICOM_PHANTOM_SEED = HELD_OUT_SEEDS[0]


OWN_RTSTRUCT = "structure_sets/RS_auto.dcm"


def write_dicom_studies(folder: Path) -> None:
    """A held-out phantom also as a DICOM series folder (SYNTHETIC), and a gantry-tilted series."""
    phantom = make_phantom(DICOM_PHANTOM_SEED)
    series = folder / f"dicom_phantom_{DICOM_PHANTOM_SEED:05d}"
    write_ct_series(phantom.image, phantom.affine, str(series))
    # This server's own auto-contour of it, saved in the datastore: never a training label (issue 16 item 4).
    (folder / "structure_sets").mkdir()
    write_rtstruct([ROI("CTV", phantom.mask("CTV"))], *read_ct_geometry(str(series)), str(folder / OWN_RTSTRUCT))
    tilted = make_phantom(DICOM_PHANTOM_SEED + 100, shape=(48, 48, 24))
    shear = tilted.affine.copy()
    shear[1, 2] = 0.2 * shear[2, 2]  # each slice 0.2 slice-spacings further along y: a tilted gantry
    write_ct_series(tilted.image, shear, str(folder / "tilted_series"))
    for name, change in UNSAFE_SERIES.items():
        small = make_phantom(DICOM_PHANTOM_SEED + 101, shape=(64, 56, 24), spacing=(5.0, 5.0, 8.0))
        for k, path in enumerate(write_ct_series(small.image, small.affine, str(folder / name))):
            ds = pydicom.dcmread(path)
            change(k, ds)
            ds.save_as(path)


# Series a PACS export can produce that must not be contoured as given (issue 16 items 1 and 2).
UNSAFE_SERIES = {
    # One SeriesInstanceUID, two patients: the second half of the slices names another patient.
    "two_patients_one_series": lambda k, ds: setattr(ds, "PatientID", "ANOTHER_PATIENT") if k >= 12 else None,
    # Slices a DICOM result could not reference: one blank SOPInstanceUID.
    "blank_instance_uid": lambda k, ds: setattr(ds, "SOPInstanceUID", "") if k == 5 else None,
}


def write_bad_inputs(folder: Path) -> None:
    """Files a user might drop into a datastore by mistake."""
    (folder / "not_an_image.nii.gz").write_bytes(b"this is not a NIfTI file\n")
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), folder / "slice_2d.nii.gz")
    mr = np.random.default_rng(0).uniform(0, 255, (48, 48, 24)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mr, np.diag([1.0, 1.0, 3.0, 1.0])), folder / "mr_like.nii.gz")


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> Path:
    """Held-out phantoms (never seen in training), the real CT (linked, not copied) and bad files."""
    folder = tmp_path_factory.mktemp("studies")
    build(str(folder), HELD_OUT_SEEDS, labelled=set())
    if REAL_CT.exists():
        os.symlink(REAL_CT, folder / REAL_CT.name)
    write_bad_inputs(folder)
    write_dicom_studies(folder)
    return folder


@pytest.fixture(scope="session")
def truth_dir(tmp_path_factory) -> Path:
    """Phantom ground truth, kept outside the served datastore."""
    folder = tmp_path_factory.mktemp("truth")
    build(str(folder), HELD_OUT_SEEDS, labelled=set(HELD_OUT_SEEDS))
    return folder / "labels" / "final"


@pytest.fixture(scope="session")
def server(studies, tmp_path_factory):
    with ServerProcess(studies, tmp_path_factory.mktemp("server")) as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server, tmp_path_factory):
    from monailabel.client import MONAILabelClient

    # Own result folder: the server deletes its result file by name in the shared /tmp after replying.
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


# --- a real Orthanc and the server on it (DICOMweb and OHIF tests) ---------------------------------
VH = SHARED_DATA / "dicom" / "visible_human_4slice_rt"
LIVER = SHARED_DATA / "dicom" / "ct_3slice_liver"


def vh_voxels_in_air_outside_body(result_path: str | Path) -> int:
    """Voxels of a result on the Visible Human series in air (< -500 HU) outside the patient: outside
    the clinical BODY contour of its Varian RTSTRUCT (rasterised in ``Mask.nii.gz``)."""
    result, ct, body = (nib.load(p) for p in (result_path, VH / "Image.nii.gz", VH / "Mask.nii.gz"))
    assert result.shape == ct.shape and np.allclose(result.affine, ct.affine, atol=1e-3)  # the series' grid
    air_outside = (np.asarray(ct.dataobj) < -500) & (np.asarray(body.dataobj) == 0)
    return int((air_outside & (np.asarray(result.dataobj) > 0)).sum())


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("CT_*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    with OrthancProcess(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="session")
def uploaded(orthanc, tmp_path_factory) -> dict[str, str]:
    """Real CT series (Visible Human, GE liver) and SYNTHETIC phantom series, each in its own study, sent
    with STOW-RS. The Visible Human neck holds no CTV: OHIF shows and saves contours on ``phantom_ohif``."""
    phantoms = {}
    for name, seed in (("phantom", 9101), ("phantom_ohif", 9102)):
        phantom = make_phantom(seed)
        phantoms[name] = tmp_path_factory.mktemp(f"{name}_dicom")
        write_ct_series(phantom.image, phantom.affine, str(phantoms[name]), patient_id=f"PHANTOM_{seed}")
    orthanc.stow(sorted(VH.glob("CT_*.dcm")) + sorted(LIVER.glob("0*.dcm"))
                 + [p for folder in phantoms.values() for p in sorted(folder.glob("*.dcm"))])  # fmt: skip
    return {"visible_human": series_uid(VH), "liver": str(pydicom.dcmread(LIVER / "01.dcm").SeriesInstanceUID),
            **{name: series_uid(folder) for name, folder in phantoms.items()}}  # fmt: skip


# The DICOMweb server runs with access control on, as in docker/: its clients (MONAILabelClient as
# Slicer uses it, OHIF in Chromium with Basic credentials) log in as this annotator.
DICOMWEB_ANNOTATOR = ("dr_dicomweb", "annotator-token-for-tests-only")


def dicomweb_env(orthanc, workdir: Path) -> dict[str, str]:
    """The environment of a server on the test Orthanc: its credentials, a cache, access control on."""
    return {
        "MONAI_LABEL_DICOMWEB_USERNAME": orthanc.user,
        "MONAI_LABEL_DICOMWEB_PASSWORD": orthanc.password,
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(workdir / "cache"),
        "CTV_AUTH_TOKENS": "{}:annotator:{}".format(*DICOMWEB_ANNOTATOR),
    }


def annotator_client(server, tmpdir: str) -> MONAILabelClient:
    """Logged in as the Slicer plugin does: /auth/ says auth is on, /auth/token gives the bearer token."""
    client = MONAILabelClient(server.url, tmpdir=tmpdir)
    assert client.auth_enabled()
    client.update_auth(client.auth_token(*DICOMWEB_ANNOTATOR))
    return client


@pytest.fixture(scope="session")
def dicomweb_server(orthanc, uploaded, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dicomweb_server")
    with ServerProcess(orthanc.dicomweb_url, workdir, env=dicomweb_env(orthanc, workdir)) as server:
        yield server


@pytest.fixture(scope="session")
def dw_client(dicomweb_server, tmp_path_factory) -> MONAILabelClient:
    return annotator_client(dicomweb_server, str(tmp_path_factory.mktemp("dw_client")))
