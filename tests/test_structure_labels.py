"""Labels of structure sets through the real server: a viewer's label map (MONAI Label's ``label_names``,
3D Slicer's ``label_info``, or the model's own values), the lossless bitmask, and a clinical RTSTRUCT
in the folder datastore; the datastore records which structures each label contains and the training
datalist carries them. All images are SYNTHETIC phantoms."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from monailabel.client import MONAILabelClient
from pydicom.dataset import Dataset

from ctv_app.lib.dicom.dicomweb import CTVDicomWebDatastore
from ctv_app.lib.dicom.rtstruct import ROI, write_rtstruct
from ctv_app.lib.dicom.series import read_ct_geometry
from ctv_app.lib.structures import Structures, decode_label
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .support import ServerProcess

# What this server's datastore knows (pinned: the tests name values of these).
KNOWN = ["CTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R"]
SHAPE = (40, 36, 16)
IMAGES = ["names", "slicer", "model_values", "partial", "bitmask", "refused"]
TPS_ROIS = {"CTV_45Gy": "CTV", "BLADDER": "Bladder", "Femoral Head R": "Femur_Head_R"}


def boxes(shape: tuple[int, ...] = SHAPE) -> dict[str, np.ndarray]:
    """Structures as boxes; CTV and Bladder overlap (as a CTV touches the bladder wall)."""
    out = {name: np.zeros(shape, bool) for name in KNOWN}
    out["CTV"][10:24, 10:24, 4:12] = True
    out["Bladder"][18:30, 12:22, 5:11] = True
    out["Rectum"][12:20, 26:32, 3:13] = True
    out["Femur_Head_L"][2:8, 14:22, 6:10] = True
    out["Femur_Head_R"][32:38, 14:22, 6:10] = True
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("structure_studies")
    for seed, name in enumerate(IMAGES):
        phantom = make_phantom(9000 + seed, shape=SHAPE)
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), folder / f"{name}.nii.gz")
    # A DICOM series and its clinical RTSTRUCT, ROIs named as a planning system exports them.
    phantom = make_phantom(9100, shape=SHAPE)
    series = folder / "planning_ct"
    write_ct_series(phantom.image, phantom.affine, str(series))
    geometry, headers = read_ct_geometry(str(series))
    masks = boxes(geometry.shape)
    rois = [ROI(roi, masks[name]) for roi, name in TPS_ROIS.items()] + [ROI("Couch", masks["Rectum"])]
    path = series / "RS_clinical.dcm"
    write_rtstruct(rois, geometry, headers, str(path))
    ds = pydicom.dcmread(path)  # as the planning system exports it once a clinician has drawn it
    ds.Manufacturer, ds.ApprovalStatus = "a planning system", "APPROVED"
    for item in ds.StructureSetROISequence:
        item.ROIGenerationAlgorithm = "MANUAL"
    ds.save_as(path)
    return folder


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    work = tmp_path_factory.mktemp("structure_server")
    conf = {
        "ctv_model": str(work / "no_weights.pt"),
        "ctv_structures": json.dumps(KNOWN, separators=(",", ":")),
    }  # no spaces: one argument
    with ServerProcess(studies, work, conf=conf) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server, tmp_path_factory) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("structure_client")))


def label_file(studies: Path, image: str, data: np.ndarray, folder: Path) -> Path:
    path = folder / f"{image}_label.nii.gz"
    nib.save(nib.Nifti1Image(data, nib.load(studies / f"{image}.nii.gz").affine), path)
    return path


def labelmap(values: dict[str, int]) -> np.ndarray:
    """The named structures' boxes painted in order (later ones over earlier ones)."""
    out = np.zeros(SHAPE, np.uint8)
    for name, value in values.items():
        out[boxes()[name]] = value
    return out


def label_info(server: ServerProcess, image: str) -> dict:
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()
    return listing["objects"][image]["labels"]["final"]["info"]


def test_label_map_with_label_names_records_its_structures_and_is_stored_as_uploaded(server, client, studies, tmp_path):
    data = labelmap({"CTV": 3, "Bladder": 5})  # the file's own values, named by synonyms in any case
    path = label_file(studies, "names", data, tmp_path)
    client.save_label(
        "names", str(path), tag="final", params={"label_names": {"background": 0, "ctv": 3, "BLADDER": 5}}
    )
    info = label_info(server, "names")
    assert info["encoding"] == "labelmap" and info["structures"] == {"CTV": 3, "Bladder": 5}
    assert "label_names" not in info  # the names are recorded once: as the structures they mean
    stored = requests.get(f"{server.url}/datastore/label", params={"label": "names", "tag": "final"}, timeout=30)
    assert stored.status_code == 200 and stored.content == path.read_bytes()  # byte-identical
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_slicer_label_info_names_the_structures(server, client, studies, tmp_path):
    """3D Slicer's save: params {"label_info": [{"name": segment name, "idx": its value}]}."""
    data = labelmap({"Femur_Head_R": 1, "Rectum": 2})
    path = label_file(studies, "slicer", data, tmp_path)
    slicer = [{"name": "Femoral Head R", "idx": 1}, {"name": "Rectum", "idx": 2}]
    client.save_label("slicer", str(path), tag="final", params={"label_info": slicer})
    info = label_info(server, "slicer")
    assert info["encoding"] == "labelmap" and info["structures"] == {"Rectum": 2, "Femur_Head_R": 1}


def test_label_map_without_names_contains_the_structures_whose_values_occur(server, client, studies, tmp_path):
    values = {name: KNOWN.index(name) + 1 for name in KNOWN}  # the model's own values
    path = label_file(studies, "model_values", labelmap(values), tmp_path)
    client.save_label("model_values", str(path), tag="final")
    assert label_info(server, "model_values")["structures"] == values
    # A partial label: only CTV and Bladder were contoured; it contains exactly those.
    partial = labelmap({"CTV": 1, "Bladder": 2})
    client.save_label("partial", str(label_file(studies, "partial", partial, tmp_path)), tag="final")
    info = label_info(server, "partial")
    assert info["encoding"] == "labelmap" and info["structures"] == {"CTV": 1, "Bladder": 2}


def test_bitmask_keeps_overlapping_structures_and_the_datalist_says_how_to_read_it(server, client, studies, tmp_path):
    masks = boxes()
    assert (masks["CTV"] & masks["Bladder"]).any()  # they overlap
    data = np.zeros(SHAPE, np.uint8)
    data[masks["CTV"]] |= 1 << 0
    data[masks["Bladder"]] |= 1 << 1
    data[masks["Rectum"]] |= 1 << 3  # bit value 4, named below
    path = label_file(studies, "bitmask", data, tmp_path)
    names = {"CTV": 1, "Bladder": 2, "Rectum": 4}
    client.save_label("bitmask", str(path), tag="final", params={"encoding": "bitmask", "label_names": names})
    info = label_info(server, "bitmask")
    assert info["encoding"] == "bitmask" and info["structures"] == names

    datalist = requests.get(f"{server.url}/datastore/?output=train", timeout=30).json()
    entry = next(d for d in datalist if d["image"].endswith("bitmask.nii.gz"))
    assert entry["label_encoding"] == "bitmask" and entry["label_structures"] == names
    # What the trainer decodes (transforms.labels.StructureChannelsd): every structure whole, overlap kept.
    stored = np.asarray(nib.load(entry["label"]).dataobj)
    channels, contained = decode_label(stored, Structures(KNOWN), entry["label_encoding"], entry["label_structures"])
    assert contained.tolist() == [True, True, True, False, False]
    for name in names:
        np.testing.assert_array_equal(channels[KNOWN.index(name)] > 0, masks[name])
    by_image = {Path(d["image"]).name: d for d in datalist}
    assert by_image["partial.nii.gz"]["label_structures"] == {"CTV": 1, "Bladder": 2}


def save_refused(server: ServerProcess, path: Path, params: dict | None = None) -> str:
    """PUT /datastore/label as MONAI Label's clients send it; the 422's message."""
    with open(path, "rb") as f:
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": "refused", "tag": "final"},
            data={"params": json.dumps(params or {})},
            files={"label": (path.name, f)},
            timeout=60,
        )
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def test_labels_of_unknown_structures_or_values_are_422_naming_them(server, studies, tmp_path):
    two = label_file(studies, "refused", labelmap({"CTV": 1, "Bladder": 2}), tmp_path)
    assert "'Liver'" in save_refused(server, two, {"label_names": {"CTV": 1, "Liver": 2}})
    # In the catalogue, but no served model contours it: unknown here.
    assert "'Parotid_L'" in save_refused(server, two, {"label_names": {"CTV": 1, "Parotid_L": 2}})
    assert "values [2]" in save_refused(server, two, {"label_names": {"CTV": 1}})  # value 2 is named by none
    seven = label_file(studies, "refused", labelmap({"CTV": 1, "Bladder": 7}), tmp_path)
    assert "values [7]" in save_refused(server, seven)  # no known structure has value 7
    # A bitmask: bit value 3 set, named by no structure; and a bitmask without names.
    bits = label_file(studies, "refused", np.where(boxes()["CTV"], 0b101, 0).astype(np.uint8), tmp_path)
    assert "bit value [3]" in save_refused(server, bits, {"encoding": "bitmask", "label_names": {"CTV": 1}})
    assert "needs label_names" in save_refused(server, bits, {"encoding": "bitmask"})
    # The recorded structures are the server's to compute.
    assert "'structures'" in save_refused(server, two, {"structures": {"CTV": 1, "Bladder": 2}})
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()
    assert not listing["objects"]["refused"]["labels"]  # nothing was saved


def test_recorded_structures_cannot_be_changed_through_label_info(server):
    for field in ({"structures": {"CTV": 1}}, {"encoding": "bitmask"}):
        r = requests.put(
            f"{server.url}/datastore/label/info",
            params={"label": "names", "tag": "final"},
            data={"info": json.dumps(field)},
            timeout=30,
        )
        assert r.status_code == 422 and next(iter(field)) in r.text, r.text
    assert label_info(server, "names")["structures"] == {"CTV": 3, "Bladder": 5}


def test_clinical_rtstruct_with_tps_roi_names_imports_as_their_structures(server, studies):
    """ROI names as a planning system spells them: CTV_45Gy, BLADDER, Femoral Head R (and a Couch, no
    structure): a bitmask label of CTV, Bladder and Femur_Head_R, overlap kept."""
    series = str(pydicom.dcmread(studies / "planning_ct" / "RS_clinical.dcm").ReferencedFrameOfReferenceSequence[0]
                 .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID)  # fmt: skip
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()
    assert listing["skipped_structure_sets"] == []
    [(image, obj)] = [
        (k, v) for k, v in listing["objects"].items() if v["image"]["info"].get("SeriesInstanceUID") == series
    ]
    info = obj["labels"]["final"]["info"]
    assert info["encoding"] == "bitmask"
    assert info["structures"] == {"CTV": 1, "Bladder": 2, "Femur_Head_R": 5}  # their values in the known list
    assert info["source_rtstruct"] and info["raster_rule"] == "centre"
    assert info["rois"] == TPS_ROIS  # the ROIs used, as named, and the structure each means
    datalist = requests.get(f"{server.url}/datastore/?output=train", timeout=30).json()
    entry = next(d for d in datalist if d["label"].endswith(f"{image}.nii.gz"))
    assert entry["label_encoding"] == "bitmask" and entry["label_structures"] == info["structures"]
    stored = np.asarray(nib.load(entry["label"]).dataobj)
    geometry, _ = read_ct_geometry(str(studies / "planning_ct"))
    masks = boxes(geometry.shape)
    for name in ("CTV", "Bladder", "Femur_Head_R"):  # rasterised back exactly (centre rule), overlap included
        np.testing.assert_array_equal((stored & (1 << (KNOWN.index(name)))) != 0, masks[name])
    assert not (stored & ~np.uint8(0b10011)).any()  # no other structure (the Couch is none)


# --- DICOMweb datastore: a real Orthanc ---------------------------------------------------------------
def test_dicomweb_label_is_a_seg_of_its_structures_and_trains_as_them(orthanc, tmp_path):
    """A saved label is stored in the PACS as a SEG with one segment per structure it contains, and
    training reads it back as a label of those structures: a bitmask where they overlap, else a label
    map in the known structures' values."""
    known = Structures(KNOWN)
    store = CTVDicomWebDatastore(orthanc.client(), {"Modality": "CT"}, known, cache_path=str(tmp_path / "cache"))
    uids = {}
    for seed, name in ((9200, "overlapping"), (9201, "apart")):
        folder = tmp_path / name
        phantom = make_phantom(seed, shape=SHAPE)
        write_ct_series(phantom.image, phantom.affine, str(folder), patient_id=f"PHANTOM_{seed}")
        orthanc.stow(sorted(folder.glob("*.dcm")))
        uids[name] = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        assert uids[name] in store.list_images()  # a series sent to the PACS is seen at once, not after a cache expiry
    geometry, _ = read_ct_geometry(store.get_image_uri(uids["overlapping"]))
    masks = boxes(geometry.shape)

    bitmask = known.pack([masks["CTV"], masks["Bladder"], None, None, None])
    path = tmp_path / "bitmask.nii.gz"
    nib.save(nib.Nifti1Image(bitmask, geometry.affine), path)
    names = {"CTV": 1, "Bladder": 2}
    info = {"annotator": "dr_a", "encoding": "bitmask", "label_names": names}
    store.save_label(uids["overlapping"], str(path), "final", info)
    seg_uid = store.get_label_info(uids["overlapping"], "final")["SeriesInstanceUID"]
    [seg] = [
        Dataset.from_json(s) for s in orthanc.client().search_for_series(search_filters={"SeriesInstanceUID": seg_uid})
    ]
    seg = hd.seg.Segmentation.from_dataset(orthanc.client().retrieve_series(str(seg.StudyInstanceUID), seg_uid)[0])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["CTV", "Bladder"]
    assert str(seg.SeriesDescription) == "CTV, Bladder by dr_a"

    apart = labelmap({"Rectum": 7, "Femur_Head_L": 9})  # the viewer's own values, named
    path = tmp_path / "apart.nii.gz"
    nib.save(nib.Nifti1Image(apart, read_ct_geometry(store.get_image_uri(uids["apart"]))[0].affine), path)
    store.save_label(
        uids["apart"], str(path), "final", {"annotator": "dr_b", "label_names": {"Rectum": 7, "FemurHead_L": 9}}
    )

    by_image = {Path(d["image"]).name: d for d in store.datalist()}
    entry = by_image[uids["overlapping"]]
    assert entry["label_encoding"] == "bitmask" and entry["label_structures"] == names
    np.testing.assert_array_equal(np.asarray(nib.load(entry["label"]).dataobj), bitmask)  # overlap kept
    entry = by_image[uids["apart"]]
    assert entry["label_encoding"] == "labelmap" and entry["label_structures"] == {"Rectum": 3, "Femur_Head_L": 4}
    np.testing.assert_array_equal(
        np.asarray(nib.load(entry["label"]).dataobj), labelmap({"Rectum": 3, "Femur_Head_L": 4})
    )
