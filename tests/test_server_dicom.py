"""Result formats on the API, for a DICOM series in the folder datastore and for a NIfTI study."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from monailabel.client.client import MONAILabelClientException

from ctv_app.lib.dicom.rtstruct import rasterise, read_rtstruct
from ctv_app.lib.dicom.series import read_ct_geometry
from ctv_app.lib.metrics import dice

from .conftest import DICOM_PHANTOM_SEED, OWN_RTSTRUCT
from .test_page import wait_done

DICOM_ID = f"dicom_phantom_{DICOM_PHANTOM_SEED:05d}"
NIFTI_ID = f"phantom_{DICOM_PHANTOM_SEED:05d}"


def test_dicom_series_is_contoured_like_its_nifti_twin(client, studies):
    dicom_file, dicom_result = client.infer("ctv", DICOM_ID, {})
    nifti_file, _ = client.infer("ctv", NIFTI_ID, {})
    from_dicom, from_nifti = nib.load(dicom_file), nib.load(nifti_file)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    a, b = np.asarray(from_dicom.dataobj) > 0, np.asarray(from_nifti.dataobj) > 0
    assert dice(a, b) >= 0.99
    assert dicom_result["provenance"]["input"]["image"] == DICOM_ID


@pytest.mark.parametrize("fmt", ["dicom_seg", "rtstruct"])
def test_dicom_result_formats_reference_the_source_series(client, studies, fmt):
    nifti_file, _ = client.infer("ctv", DICOM_ID, {})
    mask = (np.asarray(nib.load(nifti_file).dataobj) == 1).astype(np.uint8)  # the CTV: first-listed, wins overlaps
    result_file, result = client.infer("ctv", DICOM_ID, {"result_format": fmt})
    folder = studies / DICOM_ID
    geometry, headers = read_ct_geometry(str(folder))
    ds = pydicom.dcmread(result_file)
    assert result["dicom"]["referenced_series"] == headers[0].SeriesInstanceUID
    assert ds.StudyInstanceUID == headers[0].StudyInstanceUID and ds.PatientID == headers[0].PatientID
    if fmt == "rtstruct":
        back, _ = rasterise(read_rtstruct(ds), geometry, headers, {"CTV": 1})
    else:
        seg = hd.seg.segread(result_file)
        uids = [str(h.SOPInstanceUID) for h in headers]
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
        back = np.moveaxis(pixels, 0, 2).transpose(1, 0, 2)
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize("fmt", ["dicom_seg", "rtstruct"])
def test_nifti_study_cannot_get_a_dicom_result(client, fmt):
    with pytest.raises(MONAILabelClientException) as err:
        client.infer("ctv", NIFTI_ID, {"result_format": fmt})
    assert "Status: 422" in str(err.value) and "needs a DICOM CT series as input" in str(err.value)


def test_tilted_series_is_refused_with_the_angle(client):
    with pytest.raises(MONAILabelClientException) as err:
        client.infer("ctv", "tilted_series", {})
    assert "Status: 422" in str(err.value) and "gantry-tilted" in str(err.value)


@pytest.mark.parametrize("fmt, modality", [("rtstruct", "RTSTRUCT"), ("dicom_seg", "SEG"), ("nifti", None)])
def test_output_image_comes_back_in_the_requested_format(server, fmt, modality):
    r = requests.post(
        f"{server.url}/infer/ctv?image={DICOM_ID}&output=image",
        files={"params": (None, json.dumps({"result_format": fmt}))},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    if modality is None:
        assert nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).shape == (112, 96, 64)
    else:
        assert r.content[128:132] == b"DICM" and r.headers["content-type"] == "application/dicom"
        assert pydicom.dcmread(io.BytesIO(r.content)).Modality == modality


def series_zip(folder) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.glob("*.dcm")):
            z.write(f, f"series/{f.name}")
    return archive.getvalue()


def test_one_series_of_two_patients_is_refused_from_the_datastore_and_the_page(server, studies):
    """Issue 16 item 1: slices of one SeriesInstanceUID naming two patients are never one volume."""
    r = requests.post(f"{server.url}/infer/ctv", params={"image": "two_patients_one_series", "output": "json"},
                      timeout=300)  # fmt: skip
    assert r.status_code == 422 and "slices differ in PatientID" in r.json()["detail"], r.text
    page = requests.post(f"{server.url}/ctv/api/cases",
                         files={"file": ("mixed.zip", series_zip(studies / "two_patients_one_series"))},
                         headers={"X-CTV-Owner": "mixed-series-" + "m" * 32}, timeout=300)  # fmt: skip
    assert page.status_code == 422 and "slices differ in PatientID" in page.json()["detail"], page.text


@pytest.mark.parametrize("fmt", ["rtstruct", "dicom_seg"])
def test_dicom_result_of_a_series_without_instance_uids_is_refused_before_the_model_runs(server, fmt):
    """Issue 16 item 2: a 422 naming the blank SOPInstanceUID, with no model time spent; NIfTI still works."""

    def inferences() -> int:  # MONAI Label logs this line as it hands the image to the network
        return server.log_path.read_text(errors="replace").count("Inferer:: ")

    def infer(params: dict) -> requests.Response:
        return requests.post(f"{server.url}/infer/ctv?image=blank_instance_uid&output=json",
                             files={"params": (None, json.dumps(params))}, timeout=300)  # fmt: skip

    before = inferences()
    r = infer({"result_format": fmt})
    assert r.status_code == 422 and "1 slice has no SOPInstanceUID" in r.json()["detail"], r.text
    assert inferences() == before
    nifti = infer({"result_format": "nifti"})
    assert nifti.status_code == 200, nifti.text
    assert inferences() == before + 1  # the count sees an inference that ran


def test_own_auto_contour_in_the_datastore_is_listed_as_skipped_not_imported(server):
    """Our RTSTRUCT of the DICOM phantom lies in the datastore: not its label, and the listing says why."""
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()
    [entry] = [s for s in listing["skipped_structure_sets"] if s["file"] == OWN_RTSTRUCT]
    assert "written by this server" in entry["reason"]
    image = listing["objects"][DICOM_ID]
    assert entry["referenced_series"] == image["image"]["info"]["SeriesInstanceUID"]
    final = image["labels"].get("final") or {}
    assert (final.get("info") or {}).get("source_rtstruct") != entry["sop_instance_uid"]


def test_page_gives_nifti_only_for_a_series_without_instance_uids(server, studies):
    """Issue 16 item 2 on the page: the contour is kept as NIfTI, and the result says why there is no DICOM."""
    s = requests.Session()
    s.headers["X-CTV-Owner"] = "blank-uid-" + "b" * 32
    r = s.post(f"{server.url}/ctv/api/cases", files={"file": ("blank.zip", series_zip(studies / "blank_instance_uid"))},
               timeout=300)  # fmt: skip
    assert r.status_code == 201, r.text
    case = wait_done(s, server.url, r.json()["case"]["id"], r.json()["result"]["id"])
    result = case["results"][0]
    assert set(result["files"]) == {"nifti", "nifti_bitmask"}, result  # NIfTI only: the label map and the bitmask
    assert "1 slice has no SOPInstanceUID" in result["dicom_refused"], result
