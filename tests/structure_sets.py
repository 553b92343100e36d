"""A multi-structure model made for the tests, and a server serving it (for the page, client and viewer tests).

The checkpoint holds the cervix model's structures (``structures.CERVIX``) with seeded random weights: its
structures are large, blotchy and overlap a lot, which is what format and viewer tests need (every
structure present, overlaps to keep), never a measure of accuracy. It works on a 12 mm grid: fast,
and its blotches are coarse enough that an RTSTRUCT of them is written in seconds. It is written to a
temp folder: the tracked ``apps/ctv_app/model/ctv.pt`` is never touched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import ServerProcess


def write_structures_checkpoint(path: Path, seed: int = 0, structures: tuple[str, ...] | None = None) -> Path:
    """Seeded random weights on the 12 mm grid; ``structures`` default: the cervix set (e.g. ``HEAD_AND_NECK``
    for a test ``hn`` model)."""
    import torch

    from ctv_app.lib.checkpoint import save_checkpoint
    from ctv_app.lib.networks import network_for
    from ctv_app.lib.params import CTVParams

    torch.manual_seed(seed)
    params = CTVParams(target_spacing=(12.0, 12.0, 12.0))  # the default structures: the cervix set
    if structures is not None:
        params = params.updated({"structures": list(structures)})
    meta = {"epoch": 0, "note": "random weights, for tests"}
    save_checkpoint(str(path), network_for(params).state_dict(), params, meta)
    return path


@pytest.fixture(scope="session")
def structures_model(tmp_path_factory) -> Path:
    return write_structures_checkpoint(tmp_path_factory.mktemp("structures_model") / "ctv.pt")


# The servers live for one test module each: a full run does not hold them beside the others throughout.
@pytest.fixture(scope="module")
def structures_server(studies, structures_model, tmp_path_factory):
    """The real server on the test datastore, serving the multi-structure test model."""
    workdir = tmp_path_factory.mktemp("structures_server")
    with ServerProcess(studies, workdir, conf={"ctv_model": str(structures_model)}) as proc:
        yield proc


@pytest.fixture(scope="module")
def structures_dicomweb_server(orthanc, uploaded, structures_model, tmp_path_factory):
    """The server on the test Orthanc (as ``dicomweb_server``: access control on), serving the test model."""
    from .conftest import dicomweb_env

    workdir = tmp_path_factory.mktemp("structures_dicomweb_server")
    conf = {"ctv_model": str(structures_model)}
    with ServerProcess(orthanc.dicomweb_url, workdir, conf=conf, env=dicomweb_env(orthanc, workdir)) as server:
        yield server


@pytest.fixture(scope="module")
def structures_dw_client(structures_dicomweb_server, tmp_path_factory):
    """MONAI Label's client on it, logged in as the Slicer plugin does."""
    from .conftest import annotator_client

    return annotator_client(structures_dicomweb_server, str(tmp_path_factory.mktemp("structures_dw_client")))
