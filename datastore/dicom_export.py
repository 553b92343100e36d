"""Write a HU volume as a single-frame DICOM CT series (one file per slice).

For test and demo data: the synthetic phantoms, or a real NIfTI CT, become a series a PACS or
Orthanc accepts. The headers carry exactly the geometry of ``affine`` (RAS, NIfTI layout
``volume[i, j, k]``), so reading the series back must give the same volume and affine.

    python -m ctv_datastore.dicom_export --phantom 9100 --out /tmp/phantom_9100_dicom
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_ct_series(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    out_dir: str,
    patient_id: str = "SYNTHETIC",
    patient_name: str = "SYNTHETIC^PHANTOM",
    series_description: str = "SYNTHETIC phantom CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    body_part: str = "PELVIS",
) -> list[str]:
    """Write ``volume_hu`` (int16-range HU, indexed i, j, k) as CT slices; returns the file paths.

    The headers pass dciodvfy (tests/test_dicom_conformance.py); ``body_part`` is an unpaired one."""
    os.makedirs(out_dir, exist_ok=True)
    lps = LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)
    spacing_i, spacing_j = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / spacing_i, lps[:3, 1] / spacing_j
    slice_step = lps[:3, 2]
    thickness = float(abs(slice_step @ np.cross(row_dir, col_dir)))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.now()
    stored = np.clip(np.round(np.asarray(volume_hu, dtype=np.float64)) + 1024, 0, 65535).astype(np.uint16)

    paths = []
    for k in range(volume_hu.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = patient_name, patient_id, "F", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, k + 1
        ds.SeriesDescription, ds.Manufacturer = series_description, "ctv-label synthetic"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = body_part  # unpaired: no Laterality
        ds.PatientPosition = ds.AcquisitionNumber = ""  # type 2: present, unknown
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * slice_step]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing_j:.6f}", f"{spacing_i:.6f}"]
        ds.SliceThickness = f"{thickness:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume_hu.shape[1]), int(volume_hu.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.KVP = "120"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # [rows, cols]
        path = os.path.join(out_dir, f"CT_{k + 1:04d}.dcm")
        ds.save_as(path, write_like_original=False)  # a valid Part 10 file: WADO-RS serves it back
        paths.append(path)
    return paths


def main() -> None:
    from .phantom import make_phantom

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantom", type=int, required=True, help="phantom seed (SYNTHETIC data)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    p = make_phantom(args.phantom)
    write_ct_series(p.image, p.affine, args.out, patient_id=f"PHANTOM_{args.phantom}")
    print(args.out)


if __name__ == "__main__":
    main()
