"""Every DICOM object the server writes passes the standard's validator, and other readers read it alike.

``dciodvfy`` (Debian dicom3tools, David Clunie's IOD validator) checks each object against the
modules its IOD requires; a line starting ``Error`` is a violation, ``Warning`` lines are printed.
Our RTSTRUCT is also read back by two independent readers, ``rt-utils`` (OpenCV fillPoly) and
``dicompyler-core`` (its own parser, matplotlib point-in-polygon as in its DVH code), and each
must agree with the masks we wrote and with the other. (plastimatch is tests/test_dicom_io.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicompylercore import dicomparser, dvhcalc
from rt_utils import RTStructBuilder
from scipy import ndimage

from ctv_app.lib.dicom.results import RTConfig, write_dicom_result
from ctv_app.lib.dicom.rtstruct import ROI, write_rtstruct
from ctv_app.lib.dicom.seg import write_seg
from ctv_app.lib.dicom.series import read_ct_geometry
from ctv_app.lib.metrics import dice
from ctv_app.lib.structures import CATALOGUE
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .conftest import DICOM_PHANTOM_SEED
from .test_structure_outputs import PROVENANCE, STRUCTURES, overlapping_structures

DICOM_ID = f"dicom_phantom_{DICOM_PHANTOM_SEED:05d}"


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """The validator's error and warning lines for one file."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    print(f"dciodvfy {Path(path).name}: {len(errors)} errors, {len(warnings)} warnings", *errors, *warnings, sep="\n  ")
    return errors, warnings



def two_overlapping_structures(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A SYNTHETIC phantom series, its CTV and a PTV (the CTV grown by 2 mm in-plane): they overlap.

    Square slices at 1 mm, as planning CTs are: rt-utils indexes its masks (Columns, Rows), which is
    only right for square images, and its fillPoly adds about half a voxel all round (rtstruct.py)."""
    p = make_phantom(11, shape=(384, 384, 20), spacing=(1.0, 1.0, 5.0))
    folder = tmp_path / "ct"
    write_ct_series(p.image, p.affine, str(folder))
    ctv = p.mask("CTV")
    ptv = ndimage.binary_dilation(ctv, structure=np.ones((5, 5, 1), bool))  # 2 voxels each way
    assert ctv.any() and (ptv & ctv).sum() == ctv.sum() < ptv.sum()
    return folder, {"CTV": ctv, "PTV": ptv}


def write_two_structure_rtstruct(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    folder, masks = two_overlapping_structures(tmp_path)
    geometry, headers = read_ct_geometry(str(folder))
    rois = [ROI("CTV", masks["CTV"], (255, 128, 0), "CTV"), ROI("PTV", masks["PTV"], (255, 0, 0), "PTV")]
    path = tmp_path / "rs_two.dcm"
    write_rtstruct(rois, geometry, headers, str(path))
    return folder, path, masks


# --- what the real server writes ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["rtstruct", "dicom_seg"])
def test_server_dicom_results_pass_dciodvfy(client, fmt):
    result_file, _ = client.infer("ctv", DICOM_ID, {"result_format": fmt})
    assert pydicom.dcmread(result_file).Modality == {"rtstruct": "RTSTRUCT", "dicom_seg": "SEG"}[fmt]
    errors, _ = dciodvfy(result_file)
    assert errors == []


# --- the writers, with more than one structure --------------------------------------------------------
@pytest.mark.parametrize("fmt", ["rtstruct", "dicom_seg"])
def test_structure_set_results_pass_dciodvfy(tmp_path, fmt):
    """A result of six structures that overlap (two nested PTVs, a CTV into the bladder), one of them
    empty: an ROI without contours, an empty segment. No error, no warning."""
    _, series, masks = overlapping_structures(tmp_path)
    bitmask = STRUCTURES.pack([masks[name] for name in STRUCTURES.names])
    path, info = write_dicom_result(fmt, bitmask, STRUCTURES, series, RTConfig(), PROVENANCE)
    ds = pydicom.dcmread(path)
    items = ds.StructureSetROISequence if fmt == "rtstruct" else ds.SegmentSequence
    assert [str(item.get("ROIName", item.get("SegmentLabel"))) for item in items] == STRUCTURES.names
    assert info["empty"] == ["Femur_Head_L"]
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    Path(path).unlink()


def test_manual_seg_passes_dciodvfy(tmp_path):
    """The SEG of a clinician's saved final label sent to the PACS (MANUAL): two overlapping segments."""
    folder, masks = two_overlapping_structures(tmp_path)
    geometry, headers = read_ct_geometry(str(folder))
    structures = [(CATALOGUE["PTV_7000"], masks["PTV"]), (CATALOGUE["CTV"], masks["CTV"])]
    path = tmp_path / "seg.dcm"
    write_seg(structures, geometry, headers, str(path), None, "0.1.0")
    assert [s.SegmentAlgorithmType for s in pydicom.dcmread(path).SegmentSequence] == ["MANUAL", "MANUAL"]
    errors, _ = dciodvfy(path)
    assert errors == []


def test_synthetic_ct_series_passes_dciodvfy(tmp_path):
    """The demo and test series (ctv_datastore.dicom_export; the server writes no image series)."""
    folder, _ = two_overlapping_structures(tmp_path)
    errors, _ = dciodvfy(sorted(folder.glob("*.dcm"))[0])
    assert errors == []


# --- two independent readers ---------------------------------------------------------------------------
def rt_utils_masks(ct_folder: Path, rtstruct: Path, headers) -> dict[str, np.ndarray]:
    """rt-utils' masks, [row, column, its slice order], moved onto our (i, j, k) grid by SOPInstanceUID."""
    rt = RTStructBuilder.create_from(str(ct_folder), str(rtstruct))
    order = [[str(h.SOPInstanceUID) for h in headers].index(str(s.SOPInstanceUID)) for s in rt.series_data]
    masks = {}
    for name in rt.get_roi_names():
        theirs = rt.get_roi_mask_by_name(name)
        ours = np.zeros((theirs.shape[1], theirs.shape[0], theirs.shape[2]), bool)
        ours[:, :, order] = theirs.transpose(1, 0, 2)
        masks[name] = ours
    return masks


def dicompyler_masks(rtstruct: Path, headers) -> dict[str, np.ndarray]:
    """dicompyler-core's structures filled at each slice's pixel centres (its LUT), holes by XOR as in its DVH."""
    rs = dicomparser.DicomParser(str(rtstruct))
    slices = [dicomparser.DicomParser(h) for h in headers]
    x_lut, y_lut = slices[0].GetPatientToPixelLUT()
    grid = {"lut": (x_lut, y_lut), "rows": len(y_lut), "columns": len(x_lut), "x_lut_index": 0}
    xx, yy = np.meshgrid(x_lut, y_lut)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    z_to_k = {round(float(h.ImagePositionPatient[2]), 2): k for k, h in enumerate(headers)}
    masks = {}
    for number, structure in rs.GetStructures().items():
        mask = np.zeros((len(x_lut), len(y_lut), len(headers)), bool)
        for z, plane in rs.GetStructureCoordinates(number).items():
            k = z_to_k[round(float(z), 2)]
            filled = np.zeros((len(y_lut), len(x_lut)), bool)
            for contour in plane:
                inside = dvhcalc.get_contour_mask(grid, number, points, [p[:2] for p in contour["data"]])
                filled ^= inside
            mask[:, :, k] = filled.T  # (rows, cols) -> (i, j)
        masks[structure["name"]] = mask
    return masks


def test_rtstruct_read_back_by_rt_utils_and_dicompyler_core(tmp_path):
    folder, path, written = write_two_structure_rtstruct(tmp_path)
    _, headers = read_ct_geometry(str(folder))
    readers = {"rt-utils": rt_utils_masks(folder, path, headers), "dicompyler-core": dicompyler_masks(path, headers)}
    scores = {}
    for reader, masks in readers.items():
        assert set(masks) == set(written), reader
        for name, truth in written.items():
            scores[f"{reader} vs written {name}"] = dice(masks[name], truth)
    for name in written:
        both = [readers["rt-utils"][name], readers["dicompyler-core"][name]]
        scores[f"rt-utils vs dicompyler-core {name}"] = dice(*both)
    print("RTSTRUCT read back, Dice:", {k: round(v, 4) for k, v in scores.items()})
    assert min(scores.values()) >= 0.95, scores
