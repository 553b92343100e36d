"""DICOM SEG of a label mask on its CT series (highdicom), for viewers such as OHIF."""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from ..errors import InvalidInputError
from .series import CTGeometry

# CID 9580 "RT Segmentation Property Category" / CID 9534 "Radiotherapy Target"
RT_TARGET = Code("130041", "DCM", "RT Target")
CTV = Code("228792002", "SCT", "Clinical Target Volume")
AI_FAMILY = Code("113037", "DCM", "Pattern recognition")  # CID 7162 Artificial Intelligence
# Every DICOM object this server writes (SEG, RTSTRUCT) names it so: how its own output is recognised.
MANUFACTURER = "ctv-label"
MANUFACTURER_MODEL_NAME = "CTV auto-contouring (MONAI Label)"


def dicom_lab(rgb: Sequence[int]) -> list[int]:
    """sRGB (0-255) as the DICOM-scaled CIELab triple of RecommendedDisplayCIELabValue (D65 white)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    srgb_to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = srgb_to_xyz @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    lab = np.clip([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])], [0, -128, -128], [100, 127, 127])
    return list(hd.color.CIELabColor(*lab).value)


def write_seg(
    mask: np.ndarray,
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    path: str,
    labels: dict[str, int],
    model_version: str | None,
    software_version: str,
    series_description: str = "AUTO-GENERATED CTV, NOT APPROVED",
    colour: Sequence[int] = (255, 128, 0),
    comments: str = "",
) -> Dataset:
    """One binary segment per label (CTV coded as SCT 228792002 in the RT Target category).

    ``model_version`` names the model that drew it; None marks a clinician's (MANUAL) contour."""
    if tuple(mask.shape) != tuple(geometry.shape):
        raise InvalidInputError(f"mask shape {mask.shape} is not the CT series shape {geometry.shape}")
    if model_version is None:
        algorithm, algorithm_type = None, hd.seg.SegmentAlgorithmTypeValues.MANUAL
    else:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = hd.AlgorithmIdentificationSequence(
            name="ctv-label SE-DynUNet", version=model_version[:64], family=AI_FAMILY
        )
    descriptions, frames = [], []
    for number, (name, value) in enumerate(labels.items(), start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name.upper() if name.lower() == "ctv" else name,
            segmented_property_category=RT_TARGET,
            segmented_property_type=CTV,
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
        )
        description.RecommendedDisplayCIELabValue = dicom_lab(colour)
        descriptions.append(description)
        frames.append(np.moveaxis(mask == value, 2, 0).transpose(0, 2, 1))  # (k, i, j) -> (k, rows, cols)
    pixels = np.stack(frames, axis=-1).astype(np.uint8)  # (frames, rows, cols, segments)
    seg = hd.seg.Segmentation(
        source_images=list(headers),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=902,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=software_version,
        device_serial_number=(model_version or "manual")[:16],
        series_description=series_description,
        omit_empty_frames=False,
    )
    if comments:
        seg.ImageComments = comments  # LT: room for the full provenance (descriptions are 64 characters)
    seg.save_as(path)
    return seg


def read_seg_mask(path: str, headers: Sequence[Dataset], labels: dict[str, int]) -> np.ndarray:
    """A SEG on this CT series as a label mask (i, j, k); segments are matched to labels by label name."""
    seg = hd.seg.segread(path)
    uids = [str(h.SOPInstanceUID) for h in headers]
    mask = np.zeros((int(headers[0].Columns), int(headers[0].Rows), len(headers)), dtype=np.uint8)
    by_name = {k.lower(): v for k, v in labels.items()}
    for segment in seg.SegmentSequence:
        value = by_name.get(str(segment.SegmentLabel).lower())
        if value is None:
            continue
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[int(segment.SegmentNumber)],
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,  # frames a viewer left out are empty
        )[..., 0]
        mask[np.moveaxis(pixels, 0, 2).transpose(1, 0, 2) > 0] = value
    return mask
