"""Training labels as one channel per structure: decode what the datastore stored, and mark the
structures a case does not contain so that the loss leaves them out (``losses.UNCONTOURED``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ..losses import UNCONTOURED
from ..structures import Structures, decode_label

# Datalist keys (``CTVDatastore.datalist``) saying how a label is encoded and which structures it contains.
ENCODING_KEY, STRUCTURES_KEY = "label_encoding", "label_structures"
CONTAINED_KEY = "label_contained"


def label_datalist_keys(label_info: Mapping[str, Any]) -> dict[str, Any]:
    """The datalist keys for a label from the info the datastore saved with it (``encoding`` and
    ``structures``, name -> value); none for a label saved before structures were recorded."""
    if not label_info.get("structures"):
        return {}
    return {ENCODING_KEY: label_info.get("encoding", "labelmap"), STRUCTURES_KEY: dict(label_info["structures"])}


class StructureChannels(Transform):
    """A stored label (channel-first, one channel) -> one 0/1 channel per model structure, and which
    of them it contains (``structures.decode_label``)."""

    def __init__(self, structures: Structures):
        self.structures = structures

    def __call__(
        self, label: torch.Tensor, encoding: str = "labelmap", label_structures: Mapping[str, int] | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        values = np.asarray(torch.as_tensor(label).detach().cpu())
        if values.shape[0] != 1:
            raise ValueError(f"a stored label has one channel, got {values.shape[0]}")
        channels, contained = decode_label(values[0], self.structures, encoding, label_structures)
        out = torch.as_tensor(channels)
        if isinstance(label, MetaTensor):
            out = MetaTensor(out)
            out.copy_meta_from(label)  # the label's grid and the transforms applied to it
        return out, contained


class StructureChannelsd(MapTransform):
    """``StructureChannels`` on ``keys``; reads (and removes) the datalist's encoding and structures,
    and puts the contained flags under ``CONTAINED_KEY``."""

    def __init__(self, keys: Any, structures: Structures):
        super().__init__(keys)
        self.decode = StructureChannels(structures)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        encoding = d.pop(ENCODING_KEY, None) or "labelmap"
        label_structures = d.pop(STRUCTURES_KEY, None)
        for key in self.key_iterator(d):
            d[key], d[CONTAINED_KEY] = self.decode(d[key], encoding, label_structures)
        return d


class MarkUncontouredd(MapTransform):
    """Fill the channels of structures the case does not contain with ``UNCONTOURED`` (last, after
    cropping: a crop must not take the marked channels for foreground)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        contained = np.asarray(d.pop(CONTAINED_KEY))
        for key in self.key_iterator(d):
            if not contained.all():
                label = d[key].clone()
                label[torch.as_tensor(~contained)] = UNCONTOURED
                d[key] = label
        return d
