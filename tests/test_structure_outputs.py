"""Structure sets in and out of DICOM, without a server (issue 17): every structure its own ROI / segment.

Overlapping structures written by ``write_dicom_result`` come back exactly, overlap voxels included,
through RTSTRUCT rasterised per ROI by plastimatch (an independent C++ reader) and through SEG read
by highdicom; clinical RTSTRUCTs whose ROIs are spelled as a planning system spells them become the
model's structures through the synonyms (``rtstruct.training_label``). The CT series and the masks
are SYNTHETIC (a phantom and shapes drawn on it); the Eclipse structure set is real.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ctv_app.lib.dicom.results import RTConfig, write_dicom_result
from ctv_app.lib.dicom.rtstruct import ROI, read_rtstruct, roi_mask, training_label, write_rtstruct
from ctv_app.lib.dicom.seg import ANATOMICAL_STRUCTURE, RT_TARGET, dicom_lab, read_seg, write_seg
from ctv_app.lib.dicom.series import SeriesRead, read_series_headers
from ctv_app.lib.errors import InvalidInputError
from ctv_app.lib.structures import CATALOGUE, CERVIX, Structure, Structures
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .test_dicom_io import ECLIPSE_RS, clinician_approved, plastimatch_masks

# Targets first, two nested PTVs, organs; Femur_Head_L is left empty (a structure the model did not find).
STRUCTURES = Structures(["PTV_5600", "PTV_7000", "CTV", "Bladder", "Rectum", "Femur_Head_L"])
PROVENANCE = {"model": {"sha256": "f" * 64}, "software": {"ctv-label": "test"}, "input": {"sha256": "0" * 64}}


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: tuple[float, float, float]) -> np.ndarray:
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((x - c) / r) ** 2 for x, c, r in zip((i, j, k), centre, radii)) <= 1


def overlapping_structures(tmp_path: Path) -> tuple[Path, SeriesRead, dict[str, np.ndarray]]:
    """A SYNTHETIC phantom series and masks of ``STRUCTURES`` on it: the phantom's CTV, a bladder that
    overlaps it by a few hundred voxels, PTV_7000 (the CTV grown by one voxel in-plane) inside PTV_5600
    (grown by three), a rectum behind, and no Femur_Head_L."""
    p = make_phantom(5, shape=(96, 84, 30), spacing=(3.5, 3.5, 6.0))
    folder = tmp_path / "ct"
    write_ct_series(p.image, p.affine, str(folder))
    ctv = p.mask("CTV")
    centre = np.argwhere(ctv).mean(axis=0)
    in_plane = np.ones((3, 3, 1), bool)
    masks = {
        "PTV_5600": ndimage.binary_dilation(ctv, in_plane, iterations=3),
        "PTV_7000": ndimage.binary_dilation(ctv, in_plane),
        "CTV": ctv,
        "Bladder": _ellipsoid(ctv.shape, centre + (0, 8, 0), (10, 7, 5)),
        "Rectum": _ellipsoid(ctv.shape, centre - (0, 10, 0), (4, 4, 5)),
        "Femur_Head_L": np.zeros(ctv.shape, bool),
    }
    overlap = int((masks["CTV"] & masks["Bladder"]).sum())
    assert 100 <= overlap <= 1000, overlap  # the CTV takes in part of the bladder wall
    assert (masks["PTV_7000"] & ~masks["PTV_5600"]).sum() == 0 and (masks["CTV"] & ~masks["PTV_7000"]).sum() == 0
    assert (masks["PTV_5600"] & masks["Rectum"]).any() and masks["CTV"].sum() > 1000
    return folder, read_series_headers(str(folder)), masks


def test_overlapping_structures_round_trip_exactly_through_rtstruct(tmp_path):
    """One ROI per structure (name, type, colour from the structure), each rasterised back alone by
    plastimatch (voxel centres, even-odd) equal to what was written, overlap voxels included; the empty
    structure is an ROI without contours."""
    folder, series, masks = overlapping_structures(tmp_path)
    bitmask = STRUCTURES.pack([masks[name] for name in STRUCTURES.names])
    path, info = write_dicom_result("rtstruct", bitmask, STRUCTURES, series, RTConfig(), PROVENANCE)
    assert info["structures"] == STRUCTURES.names and info["empty"] == ["Femur_Head_L"]
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == STRUCTURES.names
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == [s.roi_type for s in STRUCTURES]
    assert [tuple(c.ROIDisplayColor) for c in ds.ROIContourSequence] == [s.colour for s in STRUCTURES]
    assert "ContourSequence" not in ds.ROIContourSequence[STRUCTURES.names.index("Femur_Head_L")]
    assert "Not approved for treatment planning" in ds.StructureSetDescription
    assert f"model sha256 {'f' * 64}" in ds.StructureSetDescription

    theirs = plastimatch_masks(Path(path), folder, tmp_path / "plastimatch")
    structure_set = read_rtstruct(path)
    for name, written in masks.items():
        np.testing.assert_array_equal(theirs.get(name, np.zeros_like(written)), written, err_msg=f"plastimatch {name}")
        ours, off_series = roi_mask(structure_set.roi(name), series.geometry)
        np.testing.assert_array_equal(ours, written, err_msg=f"our reader {name}")
        assert off_series == 0
    overlap = masks["CTV"] & masks["Bladder"]
    assert (theirs["CTV"] & theirs["Bladder"]).sum() == overlap.sum() > 0
    Path(path).unlink()


def test_overlapping_structures_round_trip_exactly_through_seg(tmp_path):
    """One BINARY segment per structure, read by highdicom segment by segment equal to what was written
    (overlap voxels in each segment), coded and coloured from the structure; ``read_seg`` gives the same."""
    _, series, masks = overlapping_structures(tmp_path)
    bitmask = STRUCTURES.pack([masks[name] for name in STRUCTURES.names])
    path, info = write_dicom_result("dicom_seg", bitmask, STRUCTURES, series, RTConfig(), PROVENANCE)
    assert info["structures"] == STRUCTURES.names and info["empty"] == ["Femur_Head_L"]
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY" and "Not approved for treatment planning" in seg.ImageComments
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == STRUCTURES.names
    for segment, structure in zip(seg.SegmentSequence, STRUCTURES):
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        expected = RT_TARGET if structure.is_target else ANATOMICAL_STRUCTURE
        assert (category.CodeValue, category.CodingSchemeDesignator) == (expected.value, expected.scheme_designator)
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodeMeaning, kind.CodingSchemeDesignator) == (*structure.code, "SCT")
        assert list(segment.RecommendedDisplayCIELabValue) == dicom_lab(structure.colour)
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[int(segment.SegmentNumber)])[..., 0]
        np.testing.assert_array_equal(pixels.transpose(2, 1, 0) > 0, masks[structure.name], err_msg=structure.name)
    back = read_seg(path, series.headers, STRUCTURES)
    assert list(back) == STRUCTURES.names  # the empty segment too: the SEG contains that structure
    for name, written in masks.items():
        np.testing.assert_array_equal(back[name], written, err_msg=name)
    assert (back["CTV"] & back["Bladder"]).sum() == (masks["CTV"] & masks["Bladder"]).sum() > 0
    Path(path).unlink()


def test_read_seg_matches_segments_to_structures_through_synonyms(tmp_path):
    """A SEG whose segments are labelled as another system labels them: each becomes the structure it
    means (two CTV segments: their union), a segment meaning none is left out."""
    _, series, masks = overlapping_structures(tmp_path)
    low = masks["CTV"].copy()
    low[:, :, : low.shape[2] // 2] = False
    high = masks["CTV"] & ~low
    theirs = [
        (Structure("CTV_45Gy", "CTV", (255, 0, 0)), low),
        (Structure("CTV_High", "CTV", (255, 0, 0)), high),
        (Structure("BLADDER", "ORGAN", (255, 255, 0)), masks["Bladder"]),
        (Structure("Couch", "ORGAN", (90, 90, 90)), masks["PTV_5600"]),
    ]
    write_seg(theirs, series.geometry, series.headers, str(tmp_path / "seg.dcm"), None, "other system")
    back = read_seg(str(tmp_path / "seg.dcm"), series.headers, Structures(CERVIX))
    assert list(back) == ["CTV", "Bladder"]
    np.testing.assert_array_equal(back["CTV"], masks["CTV"])
    np.testing.assert_array_equal(back["Bladder"], masks["Bladder"])


def test_rtstruct_spelled_by_a_planning_system_becomes_the_right_structures(tmp_path):
    """ROIs named as a TPS names them (``BLADDER``, ``Femoral Head R``, ``CTV_45Gy`` and ``CTV_High``)
    become Bladder, Femur_Head_R and CTV (the union of the two CTV ROIs), each whole where they overlap;
    BODY means none of the cervix structures and is ignored; an ROI named but never drawn leaves its
    structure out of the label (not contoured is not absent)."""
    folder, series, masks = overlapping_structures(tmp_path)
    geometry, headers = series.geometry, series.headers
    femur = _ellipsoid(geometry.shape, np.array(geometry.shape) * (0.25, 0.5, 0.5), (4, 4, 2))
    low = masks["CTV"].copy()
    low[:, :, : low.shape[2] // 2] = False
    body = ndimage.binary_dilation(masks["PTV_5600"] | masks["Bladder"] | femur, iterations=2)
    rois = [
        ROI("BODY", body, (0, 255, 0), "EXTERNAL"),
        ROI("CTV_45Gy", masks["CTV"] & ~low, (255, 0, 0), "CTV"),
        ROI("CTV_High", low, (255, 128, 0), "CTV"),
        ROI("BLADDER", masks["Bladder"], (255, 255, 0), "ORGAN"),
        ROI("Femoral Head R", femur, (0, 0, 255), "ORGAN"),
        ROI("Rectum", np.zeros(geometry.shape, bool), (150, 75, 0), "ORGAN"),  # named in the template only
    ]
    path = tmp_path / "RS_tps.dcm"
    write_rtstruct(rois, geometry, headers, str(path))
    clinician_approved(path)
    label, used = training_label(read_rtstruct(str(path)), geometry, headers, Structures(CERVIX))
    assert list(label) == ["CTV", "Bladder", "Femur_Head_R"]  # the model's order
    np.testing.assert_array_equal(label["CTV"], masks["CTV"])
    np.testing.assert_array_equal(label["Bladder"], masks["Bladder"])
    np.testing.assert_array_equal(label["Femur_Head_R"], femur)
    assert (label["CTV"] & label["Bladder"]).sum() == (masks["CTV"] & masks["Bladder"]).sum() > 0
    assert used == {
        "rois": {"CTV_45Gy": "CTV", "CTV_High": "CTV", "BLADDER": "Bladder", "Femoral Head R": "Femur_Head_R"},
        "ignored": ["BODY"],
        "not_contoured": ["Rectum"],
        "voxels": {name: int(mask.sum()) for name, mask in label.items()},
    }


def test_rtstruct_with_no_roi_meaning_a_structure_is_refused_naming_its_rois(tmp_path):
    _, series, masks = overlapping_structures(tmp_path)
    rois = [ROI("BODY", masks["PTV_5600"], (0, 255, 0), "EXTERNAL"), ROI("optBladder", masks["Bladder"])]
    path = tmp_path / "RS_other.dcm"
    write_rtstruct(rois, series.geometry, series.headers, str(path))
    clinician_approved(path)
    with pytest.raises(InvalidInputError, match=r"no ROI means one of the structures \['CTV', .*'BODY', 'optBladder'"):
        training_label(read_rtstruct(str(path)), series.geometry, series.headers, Structures(CERVIX))


@pytest.mark.skipif(not ECLIPSE_RS.exists(), reason="../shared/data/rtstruct is not present")
def test_eclipse_roi_names_mean_the_cervix_structures():
    """The real Eclipse prostate set's 16 ROI names, read through the cervix model's synonyms."""
    cervix = Structures(CERVIX)
    meaning = {roi.name: getattr(cervix.find(roi.name), "name", None) for roi in read_rtstruct(str(ECLIPSE_RS)).rois}
    assert {roi: name for roi, name in meaning.items() if name} == {
        "Bladder": "Bladder", "CTV": "CTV", "Femoral Head Lt": "Femur_Head_L", "Femoral Head RT": "Femur_Head_R",
        "Rectum": "Rectum",
    }  # fmt: skip
    assert meaning["optBladder"] is None and meaning["PTV"] is None and meaning["BODY"] is None


def test_roi_of_a_structure_and_removed_settings():
    mask = np.zeros((2, 2, 2), bool)
    roi = ROI.of(CATALOGUE["Bladder"], mask)
    assert (roi.name, roi.colour, roi.interpreted_type) == ("Bladder", CATALOGUE["Bladder"].colour, "ORGAN")
    assert RTConfig.from_conf({"rt_structure_set_label": "CERVIX_AUTO"}).structure_set_label == "CERVIX_AUTO"
    with pytest.raises(ValueError, match="rt_roi_labels no longer exist"):
        RTConfig.from_conf({"rt_roi_labels": '{"CTV": 1}'})
