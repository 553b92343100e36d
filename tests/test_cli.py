"""The `ctv` command against the running server: a batch, a resumed batch, and a failure exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from .conftest import DICOM_PHANTOM_SEED, HELD_OUT_SEEDS

CTV = str(Path(sys.executable).parent / "ctv")


def ctv(server, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([CTV, "--server", server.url, *args], capture_output=True, text=True, timeout=timeout)


def test_batch_of_three_then_resume(server, studies, tmp_path):
    nifti = [studies / f"phantom_{s:05d}.nii.gz" for s in HELD_OUT_SEEDS[1:3]]
    dicom = studies / f"dicom_phantom_{DICOM_PHANTOM_SEED:05d}"
    out = tmp_path / "out"
    run = ctv(server, "infer", *map(str, nifti), str(dicom), "--out", str(out), "--format", "nifti,rtstruct,seg")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 contoured, 0 already done, 0 failed" in run.stdout
    assert "case/s" in run.stderr or "%" in run.stderr  # the progress bar
    for path in nifti:
        manifest = json.loads((out / path.name.removesuffix(".nii.gz") / "manifest.json").read_text())
        assert set(manifest["files"]) == {"nifti"} and set(manifest["not_available"]) == {"rtstruct", "dicom_seg"}
        result = nib.load(out / path.name.removesuffix(".nii.gz") / manifest["files"]["nifti"])
        assert np.allclose(result.affine, nib.load(path).affine)
        assert json.loads(result.header.extensions[0].get_content())["input"]["sha256"] == manifest["input_sha256"]
    manifest = json.loads((out / dicom.name / "manifest.json").read_text())
    assert set(manifest["files"]) == {"nifti", "rtstruct", "dicom_seg"}
    rs = pydicom.dcmread(out / dicom.name / manifest["files"]["rtstruct"])
    assert rs.Modality == "RTSTRUCT" and manifest["model_sha256"] in rs.StructureSetDescription

    again = ctv(server, "infer", *map(str, nifti), str(dicom), "--out", str(out), "--format", "nifti,rtstruct,seg")
    assert again.returncode == 0 and "0 contoured, 3 already done, 0 failed" in again.stdout

    # A changed input is contoured again, the others are still skipped.
    changed = tmp_path / nifti[0].name
    image = nib.load(nifti[0])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), changed)  # same name, new bytes
    third = ctv(server, "infer", str(changed), str(nifti[1]), "--out", str(out))
    assert third.returncode == 0 and "1 contoured, 1 already done, 0 failed" in third.stdout, third.stdout


def test_failure_exits_non_zero_with_a_summary(server, studies, tmp_path):
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a CT")
    good = studies / f"phantom_{HELD_OUT_SEEDS[3]:05d}.nii.gz"
    run = ctv(server, "infer", str(corrupt), str(good), "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 1
    assert "1 contoured, 0 already done, 1 failed" in run.stdout
    assert f"FAILED {corrupt}: 422" in run.stdout and "not a readable" in run.stdout
    only_rt = ctv(server, "infer", str(good), "--out", str(tmp_path / "rt"), "--format", "rtstruct", "--quiet")
    assert only_rt.returncode == 1 and "need a DICOM input" in only_rt.stdout


def test_datastore_study_status_and_next(server, tmp_path):
    run = ctv(server, "infer", f"phantom_{HELD_OUT_SEEDS[0]:05d}", "--out", str(tmp_path), "--quiet")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / f"phantom_{HELD_OUT_SEEDS[0]:05d}" / "ctv.nii.gz").exists()
    status = ctv(server, "status")
    assert status.returncode == 0 and "ctv" in json.loads(status.stdout)["models"]
    nxt = ctv(server, "next", "--strategy", "first")
    assert nxt.returncode == 0 and json.loads(nxt.stdout)["id"]
