"""The `ctv` command against the running server: a batch, a resumed batch, and a failure exit code; every
structure of a multi-structure model written (label map, bitmask, RTSTRUCT, SEG, volumes). And MONAI Label's
own client (as Slicer uses it) getting the label map with every structure named."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import requests
from monailabel.client import MONAILabelClient

from ctv_app.lib.structures import Structures

from . import structure_sets
from .conftest import DICOM_PHANTOM_SEED, HELD_OUT_SEEDS

# The multi-structure test model and its server (fixtures).
structures_model, structures_server = structure_sets.structures_model, structure_sets.structures_server

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
    third = ctv(server, "infer", str(changed), str(nifti[1]), "--out", str(out), "--format", "nifti,rtstruct,seg")
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


def model_labels(server) -> dict[str, int]:
    return requests.get(f"{server.url}/info/", timeout=60).json()["models"]["ctv"]["labels"]


def test_client_writes_every_structure(structures_server, studies, tmp_path):
    """A model of several overlapping structures: by default the label map and the bitmask, each holding
    every structure (the bitmask each whole); RTSTRUCT and SEG one ROI / segment per structure; the
    manifest and OUT/structures.csv each structure's volume."""
    labels = model_labels(structures_server)
    names = sorted(labels, key=labels.get)
    assert len(names) > 1
    nifti = studies / f"phantom_{HELD_OUT_SEEDS[1]:05d}.nii.gz"
    dicom = studies / f"dicom_phantom_{DICOM_PHANTOM_SEED:05d}"
    out = tmp_path / "out"
    every = ("--format", "nifti,bitmask,rtstruct,seg")
    run = ctv(structures_server, "infer", str(dicom), "--out", str(out), *every, "--quiet")
    assert run.returncode == 0, run.stdout + run.stderr
    run = ctv(structures_server, "infer", str(nifti), str(dicom), "--out", str(out), "--quiet")  # the default formats
    assert run.returncode == 0 and "1 contoured, 1 already done, 0 failed" in run.stdout, run.stdout + run.stderr
    assert f"structure volumes: {out / 'structures.csv'}" in run.stdout
    volumes = list(csv.DictReader((out / "structures.csv").open()))

    for case in (nifti.name.removesuffix(".nii.gz"), dicom.name):
        manifest = json.loads((out / case / "manifest.json").read_text())
        structures = manifest["structures"]
        assert [(s["name"], s["value"]) for s in structures] == [(n, labels[n]) for n in names]
        assert all(s["voxels"] > 0 and s["volume_ml"] > 0 for s in structures), structures
        files = manifest["files"]
        bitmask_image, labelmap_image = (nib.load(out / case / files[f]) for f in ("nifti_bitmask", "nifti"))
        bitmask, labelmap = np.asarray(bitmask_image.dataobj), np.asarray(labelmap_image.dataobj)
        model = Structures([{k: s[k] for k in ("name", "roi_type", "colour")} for s in structures])
        # The bitmask: each structure whole, its bit (value - 1); overlaps kept.
        assert [int(np.count_nonzero(model.mask(bitmask, n))) for n in names] == [s["voxels"] for s in structures]
        assert np.count_nonzero([model.mask(bitmask, n) for n in names], axis=0).max() > 1
        # The label map: each voxel the value of the first-listed structure it is in.
        np.testing.assert_array_equal(labelmap, model.labelmap(bitmask))
        for image, encoding in ((bitmask_image, "bitmask"), (labelmap_image, "labelmap")):
            header = json.loads(image.header.extensions[0].get_content())
            assert header["encoding"] == encoding and [s["name"] for s in header["structures"]] == names
        rows = [r for r in volumes if r["case"] == case]
        assert [(r["structure"], int(r["value"]), int(r["voxels"]), float(r["volume_ml"])) for r in rows] == [
            (s["name"], s["value"], s["voxels"], s["volume_ml"]) for s in structures
        ]

    manifest = json.loads((out / dicom.name / "manifest.json").read_text())
    rs = pydicom.dcmread(out / dicom.name / manifest["files"]["rtstruct"])
    assert [r.ROIName for r in rs.StructureSetROISequence] == names
    seg = pydicom.dcmread(out / dicom.name / manifest["files"]["dicom_seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names


def test_monailabel_client_gets_every_structure_named(structures_server, tmp_path):
    """MONAI Label's client, as Slicer uses it: the label map, and ``label_names`` naming every structure
    with its value in that map."""
    client = MONAILabelClient(structures_server.url, tmpdir=str(tmp_path))
    labels = client.info()["models"]["ctv"]["labels"]
    assert len(labels) > 1
    path, result = client.infer("ctv", f"phantom_{HELD_OUT_SEEDS[0]:05d}", {})
    assert result["label_names"] == labels and result["label_encoding"] == "labelmap"
    assert [s["name"] for s in result["structures"]] == sorted(labels, key=labels.get)
    values = set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())
    assert values <= {0, *labels.values()} and len(values) > 2, values
