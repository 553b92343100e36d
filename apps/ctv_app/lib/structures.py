"""Structures: the one description of what a model contours, read by every stage.

A ``Structure`` is a TG-263 name, its RT ROI interpreted type, display colour, post-processing rule,
SNOMED CT code (for DICOM SEG) and the synonyms under which clinical RTSTRUCTs name it. A model's
``Structures`` is an ordered list of them: a structure's label value is its position (1-based), its
network output channel is value - 1. The network (one sigmoid channel each), the loss, the
post-processing, the writers (NIfTI, RTSTRUCT, SEG), the datastore's label import, ``/info``, the
page and the client all read this one list; none of them lists names, colours or types again.

Label encodings (docs/model.md, "Structure sets"):

- ``labelmap``: one value per voxel, the structure's value (0 background). What viewers read and
  send. Structures that overlap cannot all be held: where they do, the first-listed structure wins
  (models list their targets first, the highest dose first).
- ``bitmask``: lossless. Bit ``value - 1`` of a voxel is set when the voxel is in that structure,
  so overlapping structures are each kept whole (uint8 up to 8 structures, uint16 up to 16, uint32
  up to 32). Nearest-neighbour resampling keeps it exact: each voxel's bits travel together.

Laterality: a left-right mirror image turns a lateral structure into its partner (``Femur_Head_L`` <->
``Femur_Head_R``, by the TG-263 ``_L``/``_R`` suffix), so flip augmentation and flip test-time
augmentation swap their channels (``Structures.mirror_channels``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

ROI_TYPES = ("CTV", "PTV", "GTV", "ORGAN", "EXTERNAL")
RULES = ("largest", "all")  # keep the largest connected component, or every component
ENCODINGS = ("labelmap", "bitmask")
MAX_STRUCTURES = 32  # the widest bitmask (uint32)
_TG263_NAME = re.compile(r"^[A-Za-z0-9_^-]{1,16}$")  # at most 16 of letters, digits, _ ^ -
_SIDE = re.compile(r"_([LR])$")  # TG-263 puts laterality last: Femur_Head_L, Parotid_R


def normalise_name(name: str) -> str:
    """How ROI names are compared: case-insensitive, runs of spaces, hyphens and underscores as one ``_``."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


@dataclass(frozen=True)
class Structure:
    """One structure. ``synonyms``: regular expressions matched in full against ``normalise_name`` of a
    clinical ROI name (the TG-263 name itself always matches)."""

    name: str
    roi_type: str
    colour: tuple[int, int, int]
    rule: str = "largest"
    code: tuple[str, str] = ("", "")  # SNOMED CT (code value, meaning): the SEG's segmented property type
    synonyms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "colour", tuple(int(c) for c in self.colour))
        object.__setattr__(self, "code", tuple(str(c) for c in self.code))
        object.__setattr__(self, "synonyms", tuple(str(s) for s in self.synonyms))
        if not _TG263_NAME.match(self.name):
            raise ValueError(f"structure name {self.name!r} is not a TG-263 name (<= 16 of A-Z a-z 0-9 _ ^ -)")
        if self.roi_type not in ROI_TYPES:
            raise ValueError(f"{self.name}: roi_type must be one of {ROI_TYPES}, got {self.roi_type!r}")
        if len(self.colour) != 3 or not all(0 <= c <= 255 for c in self.colour):
            raise ValueError(f"{self.name}: colour must be three values 0-255, got {self.colour}")
        if self.rule not in RULES:
            raise ValueError(f"{self.name}: rule must be one of {RULES}, got {self.rule!r}")
        if len(self.code) != 2:
            raise ValueError(f"{self.name}: code must be (SNOMED CT code, meaning), got {self.code}")
        for pattern in self.synonyms:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{self.name}: synonym {pattern!r} is not a regular expression: {e}") from e

    @property
    def is_target(self) -> bool:
        return self.roi_type in ("CTV", "PTV", "GTV")

    @property
    def mirror_name(self) -> str:
        """This structure's name in a left-right mirrored image: the other side's for a lateral structure
        (TG-263 ``_L``/``_R`` suffix: ``Femur_Head_L`` -> ``Femur_Head_R``), its own otherwise."""
        return _SIDE.sub(lambda side: "_R" if side.group(1) == "L" else "_L", self.name)

    def matches(self, roi_name: str) -> bool:
        """Whether a clinical ROI name means this structure."""
        key = normalise_name(roi_name)
        return key == normalise_name(self.name) or any(re.fullmatch(p, key) for p in self.synonyms)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_TARGET = ("CTV", "PTV")


def _catalogue(*structures: Structure) -> dict[str, Structure]:
    return {s.name: s for s in structures}


# The structures this project knows, by TG-263 name. A model lists the ones it contours; a
# checkpoint carries its own full descriptions, so a department's own structure needs no code here.
CATALOGUE: dict[str, Structure] = _catalogue(
    # Cervix (the ``ctv`` model). CTV synonyms: CTV, CTVp, CTV1, CTV_45, CTV_45Gy, CTV_High, CTV_Primary...
    Structure("CTV", "CTV", (255, 128, 0), "largest", ("228792002", "Clinical Target Volume"),
              (r"ctv(_?(p|primary|high|low|hr|\d+(\.\d+)?(gy)?))*",)),
    Structure("Bladder", "ORGAN", (255, 230, 0), "largest", ("89837001", "Urinary bladder"),
              (r"(urinary_)?bladder", r"blad")),
    Structure("Rectum", "ORGAN", (150, 75, 0), "largest", ("34402009", "Rectum"), (r"rectum", r"rect")),
    Structure("Colon_Sigmoid", "ORGAN", (200, 140, 80), "largest", ("60184004", "Sigmoid colon"),
              (r"(colon_)?sigmoid(_colon)?", r"sigmoid_?colon")),
    Structure("Bag_Bowel", "ORGAN", (80, 180, 255), "all", ("113276009", "Intestinal structure"),
              (r"bowel(_?bag)?", r"bag_bowel", r"bowel_?space")),
    Structure("Femur_Head_L", "ORGAN", (0, 200, 90), "largest", ("2812003", "Head of femur"),
              (r"(femur|femoral)_?head_?(l|lt|left)", r"(l|lt|left)_(femur|femoral)_?head", r"femur_l")),
    Structure("Femur_Head_R", "ORGAN", (0, 120, 255), "largest", ("2812003", "Head of femur"),
              (r"(femur|femoral)_?head_?(r|rt|right)", r"(r|rt|right)_(femur|femoral)_?head", r"femur_r")),
    # Head and neck (OpenKBP's names among the synonyms).
    Structure("PTV_7000", "PTV", (255, 0, 0), "all", ("228793007", "Planning Target Volume"), (r"ptv_?70(00)?(_?gy)?",)),
    Structure("PTV_6300", "PTV", (255, 100, 100), "all", ("228793007", "Planning Target Volume"), (r"ptv_?63(00)?(_?gy)?",)),
    Structure("PTV_5600", "PTV", (255, 170, 170), "all", ("228793007", "Planning Target Volume"), (r"ptv_?56(00)?(_?gy)?",)),
    Structure("Brainstem", "ORGAN", (0, 255, 255), "largest", ("119238007", "Brain stem"), (r"brain_?stem",)),
    Structure("SpinalCord", "ORGAN", (255, 255, 0), "largest", ("2748008", "Spinal cord"), (r"spinal_?cord", r"cord")),
    Structure("Parotid_L", "ORGAN", (0, 200, 0), "largest", ("45289007", "Parotid gland"),
              (r"(l|lt|left)_?parotid", r"parotid_?(l|lt|left)")),
    Structure("Parotid_R", "ORGAN", (0, 120, 255), "largest", ("45289007", "Parotid gland"),
              (r"(r|rt|right)_?parotid", r"parotid_?(r|rt|right)")),
    Structure("Esophagus", "ORGAN", (160, 100, 255), "largest", ("32849002", "Esophagus"), (r"o?esophagus",)),
    Structure("Larynx", "ORGAN", (255, 0, 255), "largest", ("4596009", "Larynx"), (r"larynx",)),
    Structure("Bone_Mandible", "ORGAN", (230, 230, 200), "largest", ("91609006", "Mandible"), (r"(bone_)?mandible",)),
)  # fmt: skip

# The cervix model's structures, targets first (the label map's overlap priority).
CERVIX = ("CTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "Colon_Sigmoid", "Bag_Bowel")
# The head-and-neck model's structures (OpenKBP's clinical sets), targets first, highest dose first.
HEAD_AND_NECK = ("PTV_7000", "PTV_6300", "PTV_5600", "Brainstem", "SpinalCord", "Parotid_L", "Parotid_R",
                 "Esophagus", "Larynx", "Bone_Mandible")  # fmt: skip


def find_structure(roi_name: str, known: Iterable[Structure] | None = None) -> Structure | None:
    """The structure a clinical ROI name means (TG-263 name or synonym, any case), among ``known``
    (default: the catalogue); None if it means none of them."""
    for structure in CATALOGUE.values() if known is None else known:
        if structure.matches(roi_name):
            return structure
    return None


class Structures(Sequence[Structure]):
    """A model's structures, in order: value = position + 1, output channel = position."""

    def __init__(self, structures: Iterable[Structure | str | Mapping[str, Any]]):
        items = []
        for s in structures:
            if isinstance(s, Structure):
                items.append(s)
            elif isinstance(s, str):
                found = CATALOGUE.get(s) or find_structure(s)
                if found is None:
                    raise ValueError(f"unknown structure {s!r}; known: {', '.join(CATALOGUE)}")
                items.append(found)
            elif isinstance(s, Mapping):
                items.append(Structure(**dict(s)))
            else:
                raise ValueError(f"a structure is a name or a description, got {s!r}")
        names = [s.name for s in items]
        if not items:
            raise ValueError("a model needs at least one structure")
        if len(items) > MAX_STRUCTURES:
            raise ValueError(f"at most {MAX_STRUCTURES} structures, got {len(items)}")
        if len(set(names)) != len(names):
            raise ValueError(f"structure names must be unique, got {names}")
        self._items = tuple(items)

    def __getitem__(self, index):  # type: ignore[override]
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Structure]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Structures) and self._items == other._items

    def __repr__(self) -> str:
        return f"Structures({list(self.names)})"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._items]

    @property
    def labels(self) -> dict[str, int]:
        """MONAI Label's ``labels`` / ``label_names``: name -> value (the label-map value, bit value - 1)."""
        return {s.name: i + 1 for i, s in enumerate(self._items)}

    def value(self, name: str) -> int:
        return self.names.index(name) + 1

    def find(self, roi_name: str) -> Structure | None:
        """Which of these structures a clinical ROI name means, if any."""
        return find_structure(roi_name, self._items)

    def subset(self, names: Sequence[str]) -> list[Structure]:
        """The named structures (TG-263 names or synonyms) in this model's order; a ValueError names any
        name this model does not contour."""
        found, unknown = set(), []
        for name in names:
            structure = self.find(str(name))
            if structure is None:
                unknown.append(str(name))
            else:
                found.add(structure.name)
        if unknown:
            raise ValueError(f"unknown structure{'s' if len(unknown) > 1 else ''} {unknown}; this model contours {self.names}")
        return [s for s in self._items if s.name in found]

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self._items]

    def mirror_channels(self) -> list[int | None]:
        """For each output channel, the channel whose contour, mirrored left-right, is this channel's contour
        of the mirrored image: its own for a structure without side, its partner's for a lateral one
        (``Structure.mirror_name``), None for a lateral structure whose partner this model does not contour
        (its contour in a mirrored image is unknown). Mirroring twice is the identity."""
        names = self.names
        return [names.index(s.mirror_name) if s.mirror_name in names else None for s in self._items]

    # --- encodings ----------------------------------------------------------------------------------
    @property
    def bitmask_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if len(self) <= 8 else np.uint16 if len(self) <= 16 else np.uint32)

    def pack(self, masks: Sequence[np.ndarray | None]) -> np.ndarray:
        """One boolean mask per structure (None: empty) -> the bitmask volume."""
        shape = next(m.shape for m in masks if m is not None)
        out = np.zeros(shape, dtype=self.bitmask_dtype)
        for i, mask in enumerate(masks):
            if mask is not None:
                out[mask] |= self.bitmask_dtype.type(1 << i)
        return out

    def mask(self, bitmask: np.ndarray, name: str) -> np.ndarray:
        """One structure's voxels of a bitmask volume."""
        return (bitmask & (1 << (self.value(name) - 1))) != 0

    def labelmap(self, bitmask: np.ndarray) -> np.ndarray:
        """The bitmask as a label map: each voxel the value of the first-listed structure it is in."""
        out = np.zeros(bitmask.shape, dtype=np.uint8 if len(self) < 256 else np.uint16)
        for i in reversed(range(len(self))):  # the first-listed is painted last, so it wins
            out[(bitmask & (1 << i)) != 0] = i + 1
        return out


def voxels_of(data: np.ndarray, value: int, encoding: str = "labelmap") -> np.ndarray:
    """The voxels of the structure with ``value`` in a label volume of either encoding."""
    return (data & (1 << (int(value) - 1))) != 0 if encoding == "bitmask" else data == int(value)


def decode_label(
    data: np.ndarray, model: Structures, encoding: str = "labelmap", label_structures: Mapping[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A stored label -> (one 0/1 channel per model structure, which of them the label contains).

    ``label_structures``: the structures the label contains, name -> value, as recorded when it was
    saved (a labelmap value, or bit value - 1). None (a label saved before structures were recorded):
    a label map in the model's own values that contains the structures whose values occur in it.
    A model structure the label does not contain gets an empty channel and ``contained`` False: it was
    not contoured, which is not the same as absent."""
    if encoding not in ENCODINGS:
        raise ValueError(f"label encoding must be one of {ENCODINGS}, got {encoding!r}")
    values = np.asarray(data).astype(np.int64, copy=False)
    if label_structures is None:
        present = set(np.unique(values).tolist())
        label_structures = {name: v for name, v in model.labels.items() if v in present}
    channels = np.zeros((len(model), *values.shape), dtype=np.float32)
    contained = np.zeros(len(model), dtype=bool)
    for name, value in label_structures.items():
        if name not in model.names:
            continue  # a structure this model does not learn
        c = model.value(name) - 1
        contained[c] = True
        channels[c] = voxels_of(values, value, encoding)
    return channels, contained
