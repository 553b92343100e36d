"""The server on a DICOMweb datastore: a real Orthanc, real CT series sent with STOW-RS.

QIDO lists the series, /infer/ctv contours one and returns NIfTI, DICOM SEG or RTSTRUCT, and
with ``store_result`` the result lands back in Orthanc; a corrected label is stored as a SEG.
"""

from __future__ import annotations

import time

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from monailabel.client.client import MONAILabelClientException

from ctv_app.lib.dicom.rtstruct import rasterise, read_rtstruct
from ctv_app.lib.dicom.series import read_ct_geometry

from .conftest import DICOMWEB_ANNOTATOR, vh_voxels_in_air_outside_body
from .support import SHARED_DATA

VH = SHARED_DATA / "dicom" / "visible_human_4slice_rt"

pytestmark = pytest.mark.skipif(not VH.exists(), reason="../shared/data/dicom is not present")


def test_orthanc_refuses_anonymous_requests(orthanc):
    assert requests.get(f"{orthanc.dicomweb_url}/studies", timeout=5).status_code == 401


def test_qido_lists_the_uploaded_series(dicomweb_server, uploaded):
    assert requests.get(f"{dicomweb_server.url}/datastore/?output=all", timeout=30).status_code == 401
    listed = requests.get(f"{dicomweb_server.url}/datastore/?output=all", auth=DICOMWEB_ANNOTATOR, timeout=30)
    listed = listed.json()["objects"]
    assert set(listed) == set(uploaded.values())  # the CT series; nothing else was uploaded yet


def test_infer_rtstruct_on_real_series_stored_back_via_stow(dw_client, orthanc, uploaded, tmp_path):
    """The full round trip on the real Visible Human series: QIDO, WADO-RS, infer, RTSTRUCT, STOW-RS."""
    start = time.monotonic()
    result_file, result = dw_client.infer(
        "ctv", uploaded["visible_human"], {"result_format": "rtstruct", "store_result": True}
    )
    seconds = time.monotonic() - start
    print(f"DICOMweb round trip (Visible Human, 4 slices 512x512, RTSTRUCT, stored): {seconds:.1f} s")
    rs = pydicom.dcmread(result_file)
    assert rs.Modality == "RTSTRUCT" and rs.ApprovalStatus == "UNAPPROVED"
    assert result["result_format"] == "rtstruct" and result["dicom"]["referenced_series"] == uploaded["visible_human"]
    assert result["provenance"]["model"]["sha256"][:12] in rs.SeriesDescription
    stored = result["stored"]
    assert stored["SOPInstanceUID"] == rs.SOPInstanceUID
    # Orthanc now holds it, in the CT's study, referencing the CT series.
    found = orthanc.client().search_for_series(search_filters={"Modality": "RTSTRUCT"})
    assert rs.SeriesInstanceUID in {s["0020000E"]["Value"][0] for s in found}
    back = orthanc.client().retrieve_instance(rs.StudyInstanceUID, rs.SeriesInstanceUID, rs.SOPInstanceUID)
    ref = back.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == uploaded["visible_human"] and len(ref.ContourImageSequence) == 4


def test_contours_on_the_real_neck_stay_inside_the_patient(dw_client, uploaded):
    """The model (trained on pelvic phantoms) once put a blob in the air beside the Visible Human
    neck, and later drew Bag_Bowel on a low-density haze (-315 to -565 HU) touching the shoulder that the
    clinical BODY leaves out. Every result is confined to the body, NIfTI and DICOM SEG alike."""
    nifti_file, nifti_result = dw_client.infer("ctv", uploaded["visible_human"], {"label_encoding": "bitmask"})
    assert vh_voxels_in_air_outside_body(nifti_file) == 0  # any structure's voxel (any bit set)
    seg_file, seg_result = dw_client.infer("ctv", uploaded["visible_human"], {"result_format": "dicom_seg"})
    assert seg_result["structures"] == nifti_result["structures"]  # each structure's voxels, both formats


def test_infer_dicom_seg_matches_nifti_and_lands_in_orthanc(dw_client, orthanc, uploaded, tmp_path):
    phantom = uploaded["phantom"]
    nifti_file, nifti_result = dw_client.infer("ctv", phantom, {})
    mask = np.asarray(nib.load(nifti_file).dataobj)
    assert mask.sum() > 1000  # the phantom's CTV is found
    seg_file, seg_result = dw_client.infer("ctv", phantom, {"result_format": "dicom_seg", "store_result": True})
    seg = hd.seg.segread(seg_file)
    assert seg.SegmentSequence[0].SegmentLabel == "CTV"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    # Same contour in both formats.
    sop_uids = [r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    pixels = seg.get_pixels_by_source_instance(sop_uids, segment_numbers=[1], ignore_spatial_locations=True)[..., 0]
    assert int(pixels.sum()) == int((mask == 1).sum())  # the CTV: value 1, first-listed, wins any overlap
    assert seg_result["provenance"]["input"]["sha256"] == nifti_result["provenance"]["input"]["sha256"]
    found = orthanc.client().search_for_series(search_filters={"Modality": "SEG"})
    assert seg.SeriesInstanceUID in {s["0020000E"]["Value"][0] for s in found}


def test_rtstruct_from_server_reads_back_to_the_nifti_mask(dw_client, orthanc, uploaded, tmp_path):
    phantom = uploaded["phantom"]
    nifti_file, result = dw_client.infer("ctv", phantom, {})
    rs_file, _ = dw_client.infer("ctv", phantom, {"result_format": "rtstruct"})
    series_dir = tmp_path / "series"
    series_dir.mkdir()
    study = pydicom.dcmread(rs_file).StudyInstanceUID
    for ds in orthanc.client().retrieve_series(study, phantom):
        ds.save_as(series_dir / f"{ds.SOPInstanceUID}.dcm", write_like_original=False)
    geometry, headers = read_ct_geometry(str(series_dir))
    # every ROI, the first-listed structure painted last (rasterise: later wins), as our label map does
    back, _ = rasterise(read_rtstruct(rs_file), geometry, headers, dict(reversed(result["label_names"].items())))
    np.testing.assert_array_equal(back, np.asarray(nib.load(nifti_file).dataobj))


def test_saved_label_is_checked_then_stored_as_seg(dw_client, orthanc, uploaded, tmp_path):
    phantom = uploaded["phantom"]
    nifti_file, _ = dw_client.infer("ctv", phantom, {})
    corrected = nib.load(nifti_file)
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), wrong)
    before = len(orthanc.client().search_for_series(search_filters={"Modality": "SEG"}))
    with pytest.raises(MONAILabelClientException) as err:
        dw_client.save_label(phantom, str(wrong), tag="final", params={"annotator": "dr_test"})
    assert "422" in str(err.value) or "does not match" in str(err.value)
    assert len(orthanc.client().search_for_series(search_filters={"Modality": "SEG"})) == before

    edited = np.asarray(corrected.dataobj).copy()
    edited[:, :, : edited.shape[2] // 2] = 0  # the clinician removes the caudal half
    path = tmp_path / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(edited, corrected.affine), path)
    dw_client.save_label(phantom, str(path), tag="final", params={"annotator": "dr_test"})
    segs = orthanc.client().search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == before + 1
    descriptions = {s.get("0008103E", {}).get("Value", [""])[0] for s in segs}
    # the structures the label holds, by who logged in (not the name the client sent)
    assert any(d.startswith("CTV, ") and d.endswith(f" by {DICOMWEB_ANNOTATOR[0]}") for d in descriptions), descriptions
    # Training reads the label back from the PACS: the SEG, on the series' grid.
    datalist = requests.get(f"{dw_client._server_url}/datastore/?output=train", auth=DICOMWEB_ANNOTATOR, timeout=120).json()
    item = next(d for d in datalist if phantom in d["image"])
    np.testing.assert_array_equal(np.asarray(nib.load(item["label"]).dataobj), edited)


def test_dicom_errors_are_4xx_through_dicomweb(dw_client, uploaded):
    with pytest.raises(MONAILabelClientException) as err:  # 3 slices: too few for a 3-D contour
        dw_client.infer("ctv", uploaded["liver"], {})
    assert "422" in str(err.value)
    for missing in ("1.2.3.4.5.6.7.8.9", "../../etc"):  # not in the PACS; not a UID (never a path)
        with pytest.raises(MONAILabelClientException) as err:
            dw_client.infer("ctv", missing, {})
        assert "404" in str(err.value)
    with pytest.raises(MONAILabelClientException) as err:
        dw_client.infer("ctv", uploaded["phantom"], {"result_format": "stl"})
    assert "422" in str(err.value)
