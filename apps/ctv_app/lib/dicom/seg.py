"""DICOM SEG of structures on their CT series (highdicom), for viewers such as OHIF and as the PACS's labels.

One BINARY segment per structure, each from its own mask, so segments may overlap (a PTV holds its
CTV, a CTV touches the bladder wall). A segment is described by its ``Structure``
(``lib/structures.py``): label = TG-263 name, segmented property category RT Target (DCM 130041)
for targets (CTV, PTV, GTV) and Anatomical Structure (SCT 123037004, CID 7150) for the others,
segmented property type = the structure's SNOMED CT code, display colour = its colour as CIELab.
A structure with no voxels keeps its (empty) segment: every frame is written (``omit_empty_frames``
False), so the SEG says the structure was looked for."""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..errors import InvalidInputError
from ..structures import Structure, Structures
from .series import CTGeometry

RT_TARGET = Code("130041", "DCM", "RT Target")  # CID 9502/9503: the category of CTV, PTV, GTV
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")  # CID 7150: organs, the body
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


def segment_codes(structure: Structure) -> tuple[Code, Code]:
    """(segmented property category, type) of a structure's segment. A structure described without a
    SNOMED CT code (a department's own) is typed by its RT ROI type: CID 9534's CTV/PTV/GTV, or the
    generic Anatomical Structure."""
    category = RT_TARGET if structure.is_target else ANATOMICAL_STRUCTURE
    value, meaning = structure.code
    if value:
        return category, Code(value, "SCT", meaning or structure.name)
    return category, getattr(codes.SCT, structure.roi_type) if structure.is_target else ANATOMICAL_STRUCTURE


def write_seg(
    masks: Sequence[tuple[Structure, np.ndarray]],
    geometry: CTGeometry,
    headers: Sequence[Dataset],
    path: str,
    model_version: str | None,
    software_version: str,
    series_description: str = "AUTO-GENERATED CONTOURS, NOT APPROVED",
    comments: str = "",
) -> Dataset:
    """One BINARY segment per (structure, boolean (i, j, k) mask), in that order (module doc).

    ``model_version`` names the model that drew them; None marks a clinician's (MANUAL) contours."""
    if not masks:
        raise InvalidInputError("a SEG needs at least one structure")
    for structure, mask in masks:
        if tuple(mask.shape) != tuple(geometry.shape):
            raise InvalidInputError(f"{structure.name}: mask shape {mask.shape}, series shape {geometry.shape}")
    if model_version is None:
        algorithm, algorithm_type = None, hd.seg.SegmentAlgorithmTypeValues.MANUAL
    else:
        algorithm_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = hd.AlgorithmIdentificationSequence(
            name="ctv-label SE-DynUNet", version=model_version[:64], family=AI_FAMILY
        )
    columns, rows, slices = geometry.shape
    pixels = np.empty((slices, rows, columns, len(masks)), dtype=bool)  # (frames, rows, cols, segments)
    descriptions = []
    for number, (structure, mask) in enumerate(masks, start=1):
        category, property_type = segment_codes(structure)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=structure.name,
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=algorithm_type,
            algorithm_identification=algorithm,
        )
        description.RecommendedDisplayCIELabValue = dicom_lab(structure.colour)
        descriptions.append(description)
        pixels[..., number - 1] = np.asarray(mask, dtype=bool).transpose(2, 1, 0)  # (i, j, k) -> (k, rows, cols)
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
        series_description=series_description[:64],
        omit_empty_frames=False,
    )
    if comments:
        seg.ImageComments = comments  # LT: room for the full provenance (descriptions are 64 characters)
    seg.save_as(path)
    return seg


def read_seg(path: str, headers: Sequence[Dataset], structures: Structures) -> dict[str, np.ndarray]:
    """A SEG on this CT series as structure name -> boolean (i, j, k) mask, in ``structures``' order.

    Segments are matched to structures by their label (``structures.find``: TG-263 name or synonym,
    any case); several segments meaning one structure give their union; segments meaning none are
    left out, and so is a structure no segment means. A segment that is present but empty is kept
    (empty): the SEG contains that structure."""
    seg = hd.seg.segread(path)
    numbers: dict[int, str] = {}
    for segment in seg.SegmentSequence:
        structure = structures.find(str(segment.SegmentLabel))
        if structure is not None:
            numbers[int(segment.SegmentNumber)] = structure.name
    if not numbers:
        return {}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(h.SOPInstanceUID) for h in headers],
        segment_numbers=list(numbers),
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,  # frames a viewer left out are empty
    )  # (slices, rows, cols, segments)
    masks: dict[str, np.ndarray] = {}
    for index, name in enumerate(numbers.values()):
        mask = pixels[..., index].transpose(2, 1, 0) > 0  # -> (i, j, k)
        masks[name] = masks[name] | mask if name in masks else mask
    return {name: masks[name] for name in structures.names if name in masks}
