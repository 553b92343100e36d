"""The SYNTHETIC phantom's label map: the cervix model's structures, disjoint, where its rules put them,
each on the patient's correct side (RAS: +x is the patient's right; DICOM LPS: +x is the left)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctv_app.lib.dicom.rtstruct import ROI, read_rtstruct, write_rtstruct
from ctv_app.lib.dicom.series import read_ct_geometry
from ctv_app.lib.structures import CATALOGUE, CERVIX
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import SMALL_SHAPE, SMALL_SPACING, STRUCTURES, make_phantom, save_nifti

from .support import SHARED_DATA

ECLIPSE_RS = SHARED_DATA / "rtstruct" / "EclipseProstatePhantom_RS.dcm"


def centroid_ras(phantom, name: str) -> np.ndarray:
    ijk = np.argwhere(phantom.mask(name)).mean(axis=0)
    return (phantom.affine @ np.append(ijk, 1.0))[:3]


def test_label_map_values_are_the_cervix_models():
    assert STRUCTURES.names == list(CERVIX) and STRUCTURES.labels["CTV"] == 1
    p = make_phantom(42)
    assert p.label.dtype == np.uint8
    assert set(np.unique(p.label).tolist()) == {0, *STRUCTURES.labels.values()}


@pytest.mark.parametrize("shape, spacing", [(SMALL_SHAPE, SMALL_SPACING), ((128, 120, 40), (3.0, 3.0, 8.0))])
def test_structures_sit_where_their_rules_put_them(shape, spacing):
    p = make_phantom(1000, shape, spacing)
    c = {name: centroid_ras(p, name) for name in CERVIX}
    assert c["Femur_Head_R"][0] > 60 > -60 > c["Femur_Head_L"][0]  # the patient's left is -x in RAS
    assert c["Colon_Sigmoid"][0] < c["Rectum"][0] and c["Colon_Sigmoid"][2] > c["Rectum"][2]  # left of it
    assert c["Bag_Bowel"][2] > c["Colon_Sigmoid"][2] > c["CTV"][2]
    hu = {name: float(np.median(p.image[p.mask(name)])) for name in CERVIX}
    assert hu["Femur_Head_L"] > 200 and hu["Femur_Head_R"] > 200  # bone
    assert -40 < hu["Bladder"] < 60  # urine
    ml = {name: p.mask(name).sum() * np.prod(spacing) / 1000 for name in CERVIX}
    assert 50 < ml["Femur_Head_L"] < 65 and 50 < ml["Femur_Head_R"] < 65  # a 24 mm sphere: 57.9 ml


@pytest.mark.parametrize("seed", [1000, 9000, 9002])
def test_the_patients_left_is_minus_x_in_the_nifti(tmp_path, seed):
    """Read back as nibabel reads any CT (world coordinates are RAS: +x is the patient's right): the left
    femoral head and the sigmoid (left iliac fossa) lie at -x, the right femoral head at +x."""
    save_nifti(make_phantom(seed), str(tmp_path / "ct.nii.gz"), str(tmp_path / "label.nii.gz"))
    label = nib.load(tmp_path / "label.nii.gz")
    data = np.asarray(label.dataobj)
    world = {
        name: nib.affines.apply_affine(label.affine, np.argwhere(data == STRUCTURES.value(name)).mean(axis=0))
        for name in CERVIX
    }
    assert world["Femur_Head_L"][0] < -60 and world["Femur_Head_R"][0] > 60
    assert world["Colon_Sigmoid"][0] < world["Rectum"][0] - 10


def _mean_lps_x(structure_set, name: str) -> float:
    return float(np.concatenate(structure_set.roi(name).contours)[:, 0].mean())


def test_exported_rtstruct_has_the_left_femoral_head_at_plus_x_lps_like_a_clinical_one(tmp_path):
    """The phantom as a DICOM CT series and an RTSTRUCT of its femoral heads and sigmoid: in DICOM's LPS
    the patient's left is +x, so Femur_Head_L (and the sigmoid) has a positive x, as "Femoral Head Lt"
    has in the clinical Eclipse structure set (x +77.5 mm; "Femoral Head RT" -82.5 mm)."""
    p = make_phantom(9002, shape=(64, 56, 24), spacing=(6.0, 6.0, 10.0))
    folder = tmp_path / "ct"
    write_ct_series(p.image, p.affine, str(folder))
    geometry, headers = read_ct_geometry(str(folder))
    names = ("Femur_Head_L", "Femur_Head_R", "Rectum", "Colon_Sigmoid")
    write_rtstruct([ROI.of(CATALOGUE[n], p.mask(n)) for n in names], geometry, headers, str(tmp_path / "rs.dcm"))
    assert pydicom.dcmread(tmp_path / "rs.dcm").Modality == "RTSTRUCT"
    ours = read_rtstruct(str(tmp_path / "rs.dcm"))
    assert _mean_lps_x(ours, "Femur_Head_L") > 60 and _mean_lps_x(ours, "Femur_Head_R") < -60
    assert _mean_lps_x(ours, "Colon_Sigmoid") > _mean_lps_x(ours, "Rectum") + 10
    if not Path(ECLIPSE_RS).exists():
        pytest.skip("../shared/data/rtstruct is not present: the clinical cross-check is skipped")
    clinical = read_rtstruct(str(ECLIPSE_RS))
    assert _mean_lps_x(clinical, "Femoral Head Lt") > 60 and _mean_lps_x(clinical, "Femoral Head RT") < -60
