"""The SYNTHETIC phantom's label map: the cervix model's structures, disjoint, where its rules put them."""

from __future__ import annotations

import numpy as np
import pytest

from ctv_app.lib.structures import CERVIX
from ctv_datastore.phantom import SMALL_SHAPE, SMALL_SPACING, STRUCTURES, make_phantom


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
    assert c["Femur_Head_L"][0] > 60 > -60 > c["Femur_Head_R"][0]  # the patient's left is +x in RAS
    assert c["Colon_Sigmoid"][0] > c["Rectum"][0] and c["Colon_Sigmoid"][2] > c["Rectum"][2]
    assert c["Bag_Bowel"][2] > c["Colon_Sigmoid"][2] > c["CTV"][2]
    hu = {name: float(np.median(p.image[p.mask(name)])) for name in CERVIX}
    assert hu["Femur_Head_L"] > 200 and hu["Femur_Head_R"] > 200  # bone
    assert -40 < hu["Bladder"] < 60  # urine
    ml = {name: p.mask(name).sum() * np.prod(spacing) / 1000 for name in CERVIX}
    assert 50 < ml["Femur_Head_L"] < 65 and 50 < ml["Femur_Head_R"] < 65  # a 24 mm sphere: 57.9 ml
