"""DICOM in and RT out, without a server: series geometry, codecs, RTSTRUCT and SEG.

The RTSTRUCT checks use plastimatch (Debian), an independent C++ implementation, as the
rasteriser of what we write; the real CT slices and the clinical RTSTRUCT come from ../shared.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel.tasks.infer.basic_infer import CallBackTypes
from pydicom.uid import generate_uid

from ctv_app.lib.datastore import CTVDatastore
from ctv_app.lib.dicom.results import check_result_format
from ctv_app.lib.dicom.rtstruct import ROI, rasterise, read_rtstruct, write_rtstruct
from ctv_app.lib.dicom.seg import write_seg
from ctv_app.lib.dicom.series import read_ct_geometry, read_ct_series
from ctv_app.lib.errors import InvalidInputError
from ctv_app.lib.metrics import dice
from ctv_app.lib.provenance import input_sha256
from ctv_app.lib.structures import CATALOGUE
from ctv_datastore.dicom_export import write_ct_series
from ctv_datastore.phantom import make_phantom

from .conftest import series_uid
from .support import APP_DIR, SHARED_DATA

DICOM = SHARED_DATA / "dicom"
VH = DICOM / "visible_human_4slice_rt"
LIVER = DICOM / "ct_3slice_liver"
ECLIPSE_RS = SHARED_DATA / "rtstruct" / "EclipseProstatePhantom_RS.dcm"
TRANSFER_SYNTAXES = {  # gdcmconv flag -> transfer syntax UID (all lossless)
    "--j2k": "1.2.840.10008.1.2.4.90",
    "--jpegls": "1.2.840.10008.1.2.4.80",
    "--rle": "1.2.840.10008.1.2.5",
    "--jpeg": "1.2.840.10008.1.2.4.70",
}

pytestmark = pytest.mark.skipif(not VH.exists(), reason="../shared/data/dicom is not present")



def ct_only(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.dcm")):
        if pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT":
            shutil.copy(f, dest / f.name)
    return dest


def plastimatch_masks(rtstruct: Path, ct_dir: Path, out: Path, xor: bool = True) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation of each ROI, as (i, j, k) arrays on the CT grid (NIfTI output)."""
    cmd = ["plastimatch", "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_dir)]
    cmd += ["--output-prefix", str(out), "--prefix-format", "nii.gz"] + (["--xor-contours"] if xor else [])
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return {Path(p).name[: -len(".nii.gz")]: np.asarray(nib.load(p).dataobj) > 0 for p in glob.glob(f"{out}/*.nii.gz")}


def phantom_series(tmp_path: Path, seed: int = 5, shape=(64, 56, 24)) -> tuple[Path, np.ndarray, np.ndarray]:
    """A SYNTHETIC phantom as a DICOM series: its folder, HU volume and CTV mask."""
    p = make_phantom(seed, shape=shape, spacing=(5.0, 5.0, 8.0))
    folder = tmp_path / f"phantom_{seed}"
    write_ct_series(p.image, p.affine, str(folder))
    return folder, p.image, p.mask("CTV")


# --- series geometry -------------------------------------------------------------------------------
def test_series_sorted_by_position_matches_reference_volume():
    """The Visible Human files are not in slice order; the volume and affine match the reference NIfTI."""
    files = sorted(VH.glob("CT_*.dcm"))
    z_in_file_order = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z_in_file_order != sorted(z_in_file_order)
    series = read_ct_series(str(VH))  # the folder also holds an RTSTRUCT and NIfTI files
    reference = nib.load(VH / "Image.nii.gz")
    np.testing.assert_array_equal(series.volume, reference.get_fdata())
    np.testing.assert_allclose(series.affine, reference.affine, atol=1e-6)


def test_spacing_from_positions_and_rescale_to_hu():
    series = read_ct_series(str(LIVER))
    first = pydicom.dcmread(LIVER / "01.dcm")
    assert float(first.SliceThickness) == 1.25
    assert series.geometry.spacing[2] == pytest.approx(1.0, abs=1e-4)  # from ImagePositionPatient
    assert series.geometry.spacing[0] == pytest.approx(float(first.PixelSpacing[1]))
    stored = first.pixel_array
    hu = stored * float(first.RescaleSlope) + float(first.RescaleIntercept)
    k = int(np.argmin(np.abs(series.geometry.positions_mm - float(first.ImagePositionPatient[2]))))
    real = stored != first.PixelPaddingValue
    np.testing.assert_array_equal(series.volume[:, :, k].T[real], hu[real])
    assert series.volume[:, :, k].T[~real].max() == -1024.0  # padding is air, not -3024 HU


@pytest.mark.parametrize("orientation", ["feet_first", "oblique"])
def test_orientation_from_image_orientation_patient(tmp_path, orientation):
    p = make_phantom(7, shape=(40, 36, 20), spacing=(6.0, 6.0, 8.0))
    affine = p.affine.copy()
    if orientation == "feet_first":  # slices written from head to feet
        affine[:3, 2] *= -1
    else:  # rotated 20 degrees in the axial plane
        t = np.radians(20)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3]
    write_ct_series(p.image, affine, str(tmp_path / "s"))
    series = read_ct_series(str(tmp_path / "s"))
    # Same voxels at the same places in the patient, whatever order the reader chose.
    ours = nib.as_closest_canonical(nib.Nifti1Image(series.volume, series.affine))
    truth = nib.as_closest_canonical(nib.Nifti1Image(p.image.astype(np.float32), affine))
    np.testing.assert_allclose(ours.affine, truth.affine, atol=1e-3)  # DS strings hold 6 decimals
    np.testing.assert_array_equal(ours.get_fdata(), truth.get_fdata())


@pytest.mark.parametrize("flag", list(TRANSFER_SYNTAXES))
def test_compressed_transfer_syntaxes_decode_exactly(tmp_path, flag):
    """Real CT slices re-encoded by GDCM (an independent encoder) read back to the same HU."""
    for src in (VH, LIVER):
        folder = tmp_path / src.name
        folder.mkdir()
        for f in ct_only(src, tmp_path / f"{src.name}_plain").glob("*.dcm"):
            subprocess.run(["gdcmconv", flag, str(f), str(folder / f.name)], check=True, timeout=60)
            assert pydicom.dcmread(folder / f.name).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[flag]
        np.testing.assert_array_equal(read_ct_series(str(folder)).volume, read_ct_series(str(src)).volume)


def _edit(folder: Path, change) -> None:
    for i, f in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        if change(i, ds) is False:
            f.unlink()
        else:
            ds.save_as(f)


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("tilt", lambda i, ds: setattr(ds, "ImagePositionPatient", [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + 1.4 * i, ds.ImagePositionPatient[2]]), "gantry-tilted: slices are offset 9.9 degrees"),  # noqa: E501
        ("uneven", lambda i, ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + (3.0 if i >= 10 else 0.0)]), "not uniformly spaced: a gap of 11.00 mm"),  # noqa: E501
        ("missing", lambda i, ds: False if i in (10, 11) else None, "missing slices: a gap of 24.00 mm"),
        ("modality", lambda i, ds: setattr(ds, "Modality", "MR"), r"no CT series \(modality MR\)"),
        ("duplicate", lambda i, ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], -100.0]) if i in (3, 4) else None, "two slices at the same position"),  # noqa: E501
    ],
)
def test_series_the_model_would_misread_is_refused(tmp_path, case, change, message):
    folder, _, _ = phantom_series(tmp_path)
    _edit(folder, change)
    with pytest.raises(InvalidInputError, match=message):
        read_ct_series(str(folder))


def test_two_ct_series_in_one_folder_is_ambiguous(tmp_path):
    a, _, _ = phantom_series(tmp_path, seed=1)
    b, _, _ = phantom_series(tmp_path, seed=2)
    for f in b.glob("*.dcm"):
        shutil.copy(f, a / f"b_{f.name}")
    with pytest.raises(InvalidInputError, match="holds 2 CT series, so which one to contour is ambiguous") as e:
        read_ct_series(str(a))
    assert e.value.status_code == 422


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID", "FrameOfReferenceUID"])
def test_one_series_of_two_patients_is_refused(tmp_path, keyword):
    """One SeriesInstanceUID whose slices name two patients, studies or frames of reference is not one CT."""
    folder, _, _ = phantom_series(tmp_path)
    other = "ANOTHER_PATIENT" if keyword == "PatientID" else generate_uid()
    _edit(folder, lambda i, ds: setattr(ds, keyword, other) if i >= 12 else None)
    message = rf"slices differ in {keyword} \(2 values, on 12 and 12 slices\)"
    for read in (read_ct_series, read_ct_geometry):
        with pytest.raises(InvalidInputError, match=message) as e:
            read(str(folder))
        assert e.value.status_code == 422 and other not in str(e.value)  # no patient data in the message


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("blank", lambda i, ds: setattr(ds, "SOPInstanceUID", "") if i == 5 else None, "1 slice has no SOPInstanceUID"),
        ("duplicate", lambda i, ds: setattr(ds, "SOPInstanceUID", "1.2.3.4") if i in (4, 9) else None,
         "2 slices share the SOPInstanceUID 1.2.3.4"),
        ("no frame", lambda i, ds: delattr(ds, "FrameOfReferenceUID"), "has no FrameOfReferenceUID"),
    ],
)
def test_dicom_results_need_instance_uids_and_a_frame_of_reference(tmp_path, case, change, message):
    """A DICOM result references every slice by SOPInstanceUID, in one frame of reference: refused up front
    when it could not; the NIfTI result of the same series stays possible."""
    folder, _, _ = phantom_series(tmp_path)
    _edit(folder, change)
    for fmt in ("rtstruct", "dicom_seg"):
        with pytest.raises(InvalidInputError, match=message) as e:
            check_result_format(fmt, str(folder))
        assert e.value.status_code == 422 and "result_format 'nifti'" in str(e.value)
    assert check_result_format("nifti", str(folder)) == "nifti"
    assert read_ct_series(str(folder)).volume.shape == (64, 56, 24)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_bits_above_bits_stored_are_not_hu(tmp_path, signed):
    """BitsStored 12 in 16 allocated bits: whatever bits 12-15 hold (overlays, garbage) is not data, and a
    signed value takes its sign from bit 11."""
    folder, image, _ = phantom_series(tmp_path)
    rng = np.random.default_rng(0)

    def to_12_bits(i, ds):
        value = ds.pixel_array.astype(np.int64) - (1024 if signed else 0)  # written as HU + 1024
        assert value.min() >= (-2048 if signed else 0) and value.max() < (2048 if signed else 4096)
        garbage = rng.integers(0, 16, value.shape) << 12
        ds.PixelData = ((value & 0xFFF) | garbage).astype(np.uint16).tobytes()
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.RescaleIntercept = "0" if signed else "-1024"

    _edit(folder, to_12_bits)
    np.testing.assert_array_equal(read_ct_series(str(folder)).volume, image.astype(np.float32))


# --- RTSTRUCT ------------------------------------------------------------------------------------
def _shapes_with_holes(shape: tuple[int, int, int]) -> np.ndarray:
    """A ring with an island in its hole, and a second separate blob, on every slice."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(i - shape[0] * 0.4, j - shape[1] * 0.45)
    ring = (r < shape[0] * 0.2) & ((r > shape[0] * 0.12) | (r < shape[0] * 0.05))
    blob = np.hypot(i - shape[0] * 0.8, j - shape[1] * 0.8) < shape[0] * 0.06
    return np.repeat((ring | blob)[:, :, None], shape[2], axis=2).astype(np.uint8)


def test_rtstruct_of_real_masks_rasterised_by_plastimatch(tmp_path):
    """Our RTSTRUCT of the real CT slices' masks, read back by plastimatch: Dice >= 0.95 per ROI."""
    results = {}
    vh_ct = ct_only(VH, tmp_path / "vh_ct")
    geometry, headers = read_ct_geometry(str(vh_ct))
    mask = np.asarray(nib.load(VH / "Mask.nii.gz").dataobj)  # 1 SpinalCord, 2 BODY without the cord
    body, cord = mask == 2, mask == 1  # BODY drawn without the cord
    cases = {
        "vh": (vh_ct, [ROI("BODY", body, (0, 255, 0), "EXTERNAL"), ROI("SpinalCord", cord, (255, 0, 0), "ORGAN")]),
        "holes": (vh_ct, [ROI("CTV", _shapes_with_holes(geometry.shape) > 0)]),
    }
    liver_ct = ct_only(LIVER, tmp_path / "liver_ct")
    seg = hd.seg.segread(str(LIVER / "liver_SEG.dcm"))
    liver_geometry, liver_headers = read_ct_geometry(str(liver_ct))
    uids = [str(h.SOPInstanceUID) for h in liver_headers]
    liver = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )[..., 0]
    liver = np.moveaxis(liver, 0, 2).transpose(1, 0, 2)
    cases["liver"] = (liver_ct, [ROI("Liver", liver > 0, (150, 80, 60), "ORGAN")])
    for name, (ct_dir, rois) in cases.items():
        g, h = read_ct_geometry(str(ct_dir))
        rs = tmp_path / f"RS_{name}.dcm"
        write_rtstruct(rois, g, h, str(rs))
        theirs = plastimatch_masks(rs, ct_dir, tmp_path / f"plastimatch_{name}")
        for roi in rois:
            assert roi.mask.sum() > 0
            results[f"{name}/{roi.name}"] = dice(theirs[roi.name], roi.mask)
    print("RTSTRUCT -> plastimatch Dice:", {k: round(v, 4) for k, v in results.items()})
    assert min(results.values()) >= 0.95, results
    assert results["holes/CTV"] >= 0.99  # holes and islands survive (even-odd rule)


def test_our_rtstruct_round_trip_is_exact_with_holes_and_islands(tmp_path):
    vh_ct = ct_only(VH, tmp_path / "vh_ct")
    geometry, headers = read_ct_geometry(str(vh_ct))
    truth = _shapes_with_holes(geometry.shape)
    write_rtstruct([ROI("CTV", truth == 1)], geometry, headers, str(tmp_path / "rs.dcm"))
    back, used = rasterise(read_rtstruct(str(tmp_path / "rs.dcm")), geometry, headers, {"CTV": 1})
    np.testing.assert_array_equal(back, truth)
    assert used == {"rois": {"CTV": 1}, "ignored": [], "voxels": {"CTV": int(truth.sum())}, "off_series": {}}


def test_rtstruct_references_and_labels(tmp_path):
    folder, image, label = phantom_series(tmp_path)
    geometry, headers = read_ct_geometry(str(folder))
    path = tmp_path / "rs.dcm"
    ctv = CATALOGUE["CTV"]
    write_rtstruct(
        [ROI.of(ctv, label)], geometry, headers, str(path),
        description="model sha256 abc", series_description="AUTO CTV model abc123 UNAPPROVED",
    )  # fmt: skip
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.ApprovalStatus == "UNAPPROVED" and ds.StructureSetLabel == "AUTO_CONTOUR"
    assert "abc123" in ds.SeriesDescription and ds.StudyInstanceUID == headers[0].StudyInstanceUID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    series_ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert {c.ReferencedSOPInstanceUID for c in series_ref.ContourImageSequence} == {h.SOPInstanceUID for h in headers}
    roi = ds.StructureSetROISequence[0]
    assert roi.ROIName == "CTV" and roi.ReferencedFrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "CTV"
    contours = ds.ROIContourSequence[0]
    assert list(contours.ROIDisplayColor) == list(ctv.colour)
    sop_by_z = {round(float(h.ImagePositionPatient[2]), 2): h.SOPInstanceUID for h in headers}
    slices_with_ctv = {k for k in range(label.shape[2]) if label[:, :, k].any()}
    assert len({c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in contours.ContourSequence}) == len(
        slices_with_ctv
    )
    for c in contours.ContourSequence:
        assert c.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == c.NumberOfContourPoints and np.ptp(points[:, 2]) < 1e-3  # planar
        assert sop_by_z[round(points[0, 2], 2)] == c.ContourImageSequence[0].ReferencedSOPInstanceUID


def test_clinical_rtstruct_read_matches_reference_mask():
    """The Varian RTSTRUCT read onto its CT: Dice >= 0.95 per ROI against Mask.nii.gz.

    Mask.nii.gz marks every voxel a contour touches, so it is compared with the ``touch`` rule; the
    default ``centre`` rule is compared with plastimatch, which also fills by voxel centre.
    """
    geometry, headers = read_ct_geometry(str(VH))
    reference = np.asarray(nib.load(VH / "Mask.nii.gz").dataobj)
    truth = {"BODY": reference > 0, "SpinalCord": reference == 1}  # the BODY label excludes the cord
    structure_set = read_rtstruct(str(VH / "RS_Body_SpinalCord.dcm"))
    scores = {}
    for name, expected in truth.items():
        mask, _ = rasterise(structure_set, geometry, headers, {name: 1}, rule="touch")
        scores[name] = dice(mask, expected)
    print("clinical RTSTRUCT vs Mask.nii.gz Dice (touch rule):", scores)
    assert min(scores.values()) >= 0.95


def test_centre_rule_agrees_with_plastimatch(tmp_path):
    ct_dir = ct_only(VH, tmp_path / "ct")
    geometry, headers = read_ct_geometry(str(ct_dir))
    theirs = plastimatch_masks(VH / "RS_Body_SpinalCord.dcm", ct_dir, tmp_path / "p", xor=False)
    structure_set = read_rtstruct(str(VH / "RS_Body_SpinalCord.dcm"))
    for name in ("BODY", "SpinalCord"):
        ours, _ = rasterise(structure_set, geometry, headers, {name: 1})
        assert dice(ours, theirs[name]) >= 0.99, name


def test_eclipse_rtstruct_rois_names_and_colours():
    structure_set = read_rtstruct(str(ECLIPSE_RS))
    rois = {r.name: r for r in structure_set.rois}
    assert len(rois) == 16
    assert (rois["BODY"].colour, rois["BODY"].interpreted_type, len(rois["BODY"].contours)) == ((0, 255, 0), "EXTERNAL", 92)
    assert (rois["Bladder"].colour, rois["Bladder"].interpreted_type, len(rois["Bladder"].contours)) == ((192, 192, 254), "AVOIDANCE", 21)  # noqa: E501
    assert (rois["Rectum"].colour, len(rois["Rectum"].contours)) == ((128, 64, 64), 40)
    assert (rois["PTV"].interpreted_type, len(rois["PTV"].contours)) == ("PTV", 20)
    assert rois["CTV"].interpreted_type == "CTV" and rois["CTV"].contours == []  # named but never drawn
    z = np.concatenate([c[:, 2] for c in rois["BODY"].contours])
    assert z.min() == pytest.approx(-122.5) and z.max() == pytest.approx(105.0)


# --- DICOM SEG -----------------------------------------------------------------------------------
def test_dicom_seg_readable_by_highdicom(tmp_path):
    folder, _, label = phantom_series(tmp_path)
    geometry, headers = read_ct_geometry(str(folder))
    write_seg([(CATALOGUE["CTV"], label)], geometry, headers, str(tmp_path / "seg.dcm"), "f" * 64, "0.1.0")
    seg = hd.seg.segread(str(tmp_path / "seg.dcm"))
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "CTV" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "228792002"  # SCT Clinical Target Volume
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "130041"  # DCM RT Target
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    uids = [str(h.SOPInstanceUID) for h in headers]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(np.moveaxis(pixels, 0, 2).transpose(1, 0, 2), label)


def test_result_format_needs_a_dicom_source(tmp_path):
    folder, _, _ = phantom_series(tmp_path)
    assert check_result_format("rtstruct", str(folder)) == "rtstruct"
    assert check_result_format(None, "x.nii.gz") == "nifti"
    with pytest.raises(InvalidInputError, match="needs a DICOM CT series as input"):
        check_result_format("dicom_seg", str(tmp_path / "ct.nii.gz"))
    with pytest.raises(InvalidInputError, match="is not one of"):
        check_result_format("stl", str(folder))


# --- what a result names: the input the model read ------------------------------------------------
@pytest.fixture(scope="module")
def ctv_task(tmp_path_factory):
    """The served CTV infer task, in-process, on a copy of the shipped weights."""
    from ctv_app.lib.configs.ctv import CTVConfig

    model = tmp_path_factory.mktemp("model") / "ctv.pt"
    shutil.copy(APP_DIR / "model" / "ctv.pt", model)
    config = CTVConfig()
    config.init("ctv", str(model.parent), {"ctv_model": str(model)}, None)
    return config.infer()


@pytest.mark.parametrize("fmt", ["nifti", "rtstruct"])
def test_result_names_the_input_the_model_read_when_the_file_is_replaced(tmp_path, ctv_task, fmt):
    """Another input replaces the image after the model read it and before the result is written: the
    result still names the sha256 of the bytes contoured, and an RTSTRUCT references the slices read."""
    read_folder, read_image, _ = phantom_series(tmp_path / "read", seed=11)
    other_folder, other_image, _ = phantom_series(tmp_path / "other", seed=12)
    if fmt == "nifti":
        p = make_phantom(11, shape=(64, 56, 24), spacing=(5.0, 5.0, 8.0))
        source, other = tmp_path / "ct.nii.gz", tmp_path / "other.nii.gz"
        nib.save(nib.Nifti1Image(read_image, p.affine), source)
        nib.save(nib.Nifti1Image(other_image, p.affine), other)
    else:
        source, other = read_folder, other_folder
    read_sha256 = input_sha256(str(source))
    read_headers = read_ct_geometry(str(read_folder))[1]

    def replace_input(data):  # runs after the model, before the writer
        if source.is_dir():
            shutil.rmtree(source)
            shutil.copytree(other, source)
        else:
            shutil.copy(other, source)
        return data

    request = {"image": str(source), "result_format": fmt, "device": "cpu"}
    path, result = ctv_task(request, callbacks={CallBackTypes.INFERER: replace_input})
    assert input_sha256(str(source)) != read_sha256  # the file was replaced in between
    assert result["provenance"]["input"]["sha256"] == read_sha256
    if fmt == "rtstruct":
        ds = pydicom.dcmread(path)
        series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == read_headers[0].SeriesInstanceUID
        assert {c.ReferencedSOPInstanceUID for c in series.ContourImageSequence} == {
            h.SOPInstanceUID for h in read_headers
        }
        assert ds.StudyInstanceUID == read_headers[0].StudyInstanceUID and f"input sha256 {read_sha256}" in str(
            ds.StructureSetDescription
        )
    else:
        assert json.loads(nib.load(path).header.extensions[0].get_content())["input"]["sha256"] == read_sha256
    os.unlink(path)


# --- folder datastore ----------------------------------------------------------------------------
def test_folder_datastore_finds_series_and_imports_clinical_rtstruct(tmp_path):
    root = tmp_path / "studies"
    root.mkdir()
    shutil.copytree(VH, root / "visible_human")  # a series folder with its RTSTRUCT and NIfTI files
    staging = tmp_path / "staging"
    a, _, _ = phantom_series(staging, seed=1)
    b, _, _ = phantom_series(staging, seed=2)
    for src, prefix in ((a, "a"), (b, "b")):  # two series' files loose in one folder
        for f in src.glob("*.dcm"):
            shutil.copy(f, root / f"{prefix}_{f.name}")
    c, _, c_label = phantom_series(root / "export", seed=3)  # a study export: two CT series and an RTSTRUCT
    phantom_series(root / "export", seed=4)
    g, h = read_ct_geometry(str(c))
    write_rtstruct([ROI("CTV_High", c_label)], g, h, str(root / "export" / "RS_clinical.dcm"))
    clinician_approved(root / "export" / "RS_clinical.dcm")
    uid = {folder: str(pydicom.dcmread(next(folder.glob("*.dcm"))).SeriesInstanceUID) for folder in (a, b, c)}

    store = CTVDatastore(str(root), ["CTV"], auto_reload=False)
    images = set(store.list_images())
    assert {"visible_human", uid[a], uid[b], uid[c]} <= images and len(images) == 5
    assert os.path.isdir(store.get_image_uri(uid[a]))
    assert read_ct_series(store.get_image_uri(uid[a])).volume.shape == (64, 56, 24)
    # The clinical RTSTRUCT (ROI "CTV_High", a CTV synonym) is now the series' final label.
    info = store.get_label_info(uid[c], "final")
    assert info["annotator"].startswith("rtstruct:") and info["rois"] == {"CTV_High": "CTV"}
    np.testing.assert_array_equal(np.asarray(nib.load(store.get_label_uri(uid[c], "final")).dataobj), c_label)
    assert not store.get_label_by_image_id("visible_human", "final")  # BODY/SpinalCord do not mean CTV
    # A label on the wrong grid for a DICOM image is refused.
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), wrong)
    with pytest.raises(InvalidInputError, match="does not match image"):
        store.save_label(uid[a], str(wrong), "final", {})


# --- which structure sets may become training labels (issue 16 item 4) ----------------------------------
VARIAN_RS = VH / "RS_Body_SpinalCord.dcm"
CORD_ONLY = ["SpinalCord"]  # the structures of these stores: the Varian set's cord stands in for a clinical CTV


def _set_all(ds: pydicom.Dataset, sequence: str, keyword: str, value) -> None:
    for item in ds[sequence].value:
        setattr(item, keyword, value)


def clinician_approved(path: Path) -> None:
    """Our RTSTRUCT as a planning system exports it once a clinician has edited and approved it."""
    ds = pydicom.dcmread(path)
    ds.Manufacturer, ds.ApprovalStatus = "a planning system", "APPROVED"
    _set_all(ds, "StructureSetROISequence", "ROIGenerationAlgorithm", "MANUAL")
    ds.save_as(path)


def _without_frame_of_reference(ds: pydicom.Dataset) -> None:
    for item in ds.ReferencedFrameOfReferenceSequence:
        del item.FrameOfReferenceUID
    for item in ds.StructureSetROISequence:
        del item.ReferencedFrameOfReferenceUID
    if "FrameOfReferenceUID" in ds:
        del ds.FrameOfReferenceUID


def _cord_contours(ds: pydicom.Dataset) -> pydicom.Dataset:
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == "SpinalCord")
    return next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)


def _cord_moved(ds: pydicom.Dataset, mm: tuple[float, float, float]) -> None:
    for contour in _cord_contours(ds).ContourSequence:
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + mm
        contour.ContourData = [f"{v:.3f}" for v in points.ravel()]


def _cord_without_contours(ds: pydicom.Dataset) -> None:  # as a planning template leaves an ROI
    del _cord_contours(ds).ContourSequence


REFUSED_STRUCTURE_SETS = {  # case: (change to the real Varian RTSTRUCT, words the reason must contain)
    "automatic": (lambda ds: _set_all(ds, "StructureSetROISequence", "ROIGenerationAlgorithm", "AUTOMATIC"),
                  "AUTOMATIC"),
    "rejected": (lambda ds: setattr(ds, "ApprovalStatus", "REJECTED"), "REJECTED"),
    "no_frame_of_reference": (_without_frame_of_reference, "no frame of reference"),
    "roi_without_contours": (_cord_without_contours, "'SpinalCord' has no contours"),
    "contours_off_the_series": (lambda ds: _cord_moved(ds, (0.0, 0.0, 50.0)), "lie on no slice"),  # 4 slices, 1 mm
    "contours_beside_the_image": (lambda ds: _cord_moved(ds, (1000.0, 0.0, 0.0)), "covers no voxel"),
}  # fmt: skip


def _series_with(tmp_path: Path, rtstruct: pydicom.Dataset | None = None) -> Path:
    """A datastore holding the Visible Human CT series (and ``rtstruct`` beside it)."""
    root = tmp_path / "studies"
    ct_only(VH, root / "visible_human")
    if rtstruct is not None:
        rtstruct.save_as(root / "visible_human" / "RS.dcm")
    return root


def _skipped(store: CTVDatastore) -> list[dict]:
    return store.json()["skipped_structure_sets"]


@pytest.mark.parametrize("case", REFUSED_STRUCTURE_SETS)
def test_structure_set_that_is_not_a_clinical_label_is_skipped_with_its_reason(tmp_path, caplog, case):
    change, reason = REFUSED_STRUCTURE_SETS[case]
    ds = pydicom.dcmread(VARIAN_RS)
    change(ds)
    store = CTVDatastore(str(_series_with(tmp_path, ds)), CORD_ONLY, auto_reload=False)
    assert not store.get_label_by_image_id("visible_human", "final")
    [skipped] = _skipped(store)
    assert skipped["file"] == "visible_human/RS.dcm" and reason in skipped["reason"], skipped
    assert skipped["referenced_series"] == series_uid(VH)
    assert any(reason in r.getMessage() and "RS.dcm" in r.getMessage() for r in caplog.records)  # the server log


def test_our_own_auto_contour_is_not_imported_as_a_clinical_label(tmp_path):
    """The server's RTSTRUCT saved beside its CT (AUTOMATIC, UNAPPROVED, Manufacturer ctv-label)."""
    root = _series_with(tmp_path)
    geometry, headers = read_ct_geometry(str(root / "visible_human"))
    cord = np.asarray(nib.load(VH / "Mask.nii.gz").dataobj) == 1
    write_rtstruct([ROI("CTV", cord)], geometry, headers, str(root / "visible_human" / "RS_auto.dcm"))
    store = CTVDatastore(str(root), ["CTV"], auto_reload=False)
    assert not store.get_label_by_image_id("visible_human", "final")
    [skipped] = _skipped(store)
    assert skipped["file"] == "visible_human/RS_auto.dcm" and "written by this server" in skipped["reason"]


@pytest.mark.parametrize("approved", [False, True], ids=["clinician_made", "approved_automatic"])
def test_clinical_structure_set_is_still_imported(tmp_path, approved):
    """The real Varian set (MANUAL ROIs, UNAPPROVED): a clinician's contours. An AUTOMATIC set is imported
    once a clinician has APPROVED it."""
    ds = pydicom.dcmread(VARIAN_RS)
    if approved:
        _set_all(ds, "StructureSetROISequence", "ROIGenerationAlgorithm", "AUTOMATIC")
        ds.ApprovalStatus, ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = "APPROVED", "20260101", "120000", "Dr^A"
    store = CTVDatastore(str(_series_with(tmp_path, ds)), CORD_ONLY, auto_reload=False)
    info = store.get_label_info("visible_human", "final")
    assert info["rois"] == {"SpinalCord": "SpinalCord"} and info["source_rtstruct"] == ds.SOPInstanceUID
    label = np.asarray(nib.load(store.get_label_uri("visible_human", "final")).dataobj)
    assert dice(label, np.asarray(nib.load(VH / "Mask.nii.gz").dataobj) == 1) >= 0.85  # Mask: touch rule
    assert _skipped(store) == []
