"""Left-right mirroring that keeps laterality: a mirrored left femur head is a right femur head.

Flipping the image alone would teach the network that the left femur head lies on both sides, so a
volume of one channel per structure swaps its paired channels too (``Structures.mirror_channels``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Flip, MapTransform, RandomizableTransform, Transform

from ..losses import UNCONTOURED
from ..structures import Structures
from .labels import CONTAINED_KEY

# ``pre_transforms`` orients to RAS: spatial axis 0 runs from the patient's left to right.
LEFT_RIGHT_AXIS = 0


class FlipLeftRight(Transform):
    """Mirror a channel-first volume left-right. With ``structures`` the volume holds one channel per
    structure (a label): each channel then gets its mirror structure's flipped channel (Femur_Head_L the
    flipped Femur_Head_R), and a lateral structure whose partner the model lacks becomes ``UNCONTOURED``
    (what it covers in the mirrored image is unknown, so the loss leaves it out)."""

    def __init__(self, structures: Structures | None = None):
        self.flip = Flip(spatial_axis=LEFT_RIGHT_AXIS)
        mirror = structures.mirror_channels() if structures is not None else None
        self.sources = None if mirror is None else [i if m is None else m for i, m in enumerate(mirror)]
        self.unknown = [] if mirror is None else [i for i, m in enumerate(mirror) if m is None]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        out = self.flip(img)
        if self.sources is None:
            return out
        if out.shape[0] != len(self.sources):
            raise ValueError(f"a label of {len(self.sources)} structures has as many channels, got {out.shape[0]}")
        out = torch.index_select(out, 0, torch.as_tensor(self.sources, device=out.device))
        if self.unknown:
            out[self.unknown] = UNCONTOURED
        return out


class RandFlipLeftRightd(RandomizableTransform, MapTransform):
    """With probability ``prob``, mirror ``keys`` left-right together; ``label_key`` (one channel per
    structure) has its paired structures swapped by ``FlipLeftRight``, and the flags of which structures
    the case contains (``labels.CONTAINED_KEY``, read later by ``MarkUncontouredd``) move with them."""

    def __init__(
        self,
        keys: KeysCollection,
        structures: Structures,
        label_key: str = "label",
        prob: float = 0.1,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.flip_image = FlipLeftRight()
        self.flip_label = FlipLeftRight(structures)
        self.mirror: Sequence[int | None] = structures.mirror_channels()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = (self.flip_label if key == self.label_key else self.flip_image)(d[key])
        if CONTAINED_KEY in d:  # a new array: the patches of one volume share the one they were cropped with
            contained = np.asarray(d[CONTAINED_KEY])
            d[CONTAINED_KEY] = np.array([m is not None and bool(contained[m]) for m in self.mirror])
        return d
