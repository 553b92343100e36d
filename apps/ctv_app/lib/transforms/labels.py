"""Training labels as one channel per structure: decode what the datastore stored, and mark the
structures a case does not contain so that the loss leaves them out (``losses.UNCONTOURED``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from ..losses import UNCONTOURED
from ..structures import Structures, decode_label

logger = logging.getLogger(__name__)

# Datalist keys (``CTVDatastore.datalist``) saying how a label is encoded and which structures it contains.
ENCODING_KEY, STRUCTURES_KEY = "label_encoding", "label_structures"
CONTAINED_KEY = "label_contained"


def label_datalist_keys(label_info: Mapping[str, Any]) -> dict[str, Any]:
    """The datalist keys for a label from the info the datastore saved with it (``encoding`` and
    ``structures``, name -> value); none for a label saved before structures were recorded."""
    if not label_info.get("structures"):
        return {}
    return {ENCODING_KEY: label_info.get("encoding", "labelmap"), STRUCTURES_KEY: dict(label_info["structures"])}


def model_datalist(
    datalist: Sequence[Mapping[str, Any]], model: Structures, known: Structures, name: str = "this model"
) -> list[dict[str, Any]]:
    """The training pairs of ``model`` among a datastore's (``CTVDatastore.datalist``): those whose label
    contains any of its structures. A label that contains none of them (on a server of several models, a
    cervix label for the head-and-neck model) would be all ``UNCONTOURED`` for it: no loss, no validation
    Dice, only a validation slot and a patch of compute. It is left out, and a log line says which.

    A label saved before structures were recorded (no ``STRUCTURES_KEY``) is a label map in the values of
    the datastore's ``known`` structures, as a save that names none is read (``datastore.label_contents``).
    Where the model's values are the datastore's (the first model served, or the only one), it is decoded
    by the model's values as always; otherwise its values are read here once and the structures they mean
    recorded in its entry, so it is decoded, or left out, by what it contains."""
    same_values = all(known.labels.get(n) == v for n, v in model.labels.items())
    kept, skipped = [], []
    for entry in datalist:
        entry = dict(entry)
        structures = entry.get(STRUCTURES_KEY)
        if structures is None and not same_values:
            values = {int(v) for v in np.unique(np.asarray(LoadImage(image_only=True)(entry["label"])))}
            structures = {n: v for n, v in known.labels.items() if v in values}
            entry.update({ENCODING_KEY: "labelmap", STRUCTURES_KEY: structures})
        if structures is not None and not set(structures) & set(model.names):
            skipped.append(entry)
            continue
        kept.append(entry)
    if skipped:
        names = [os.path.basename(str(e["label"])) for e in skipped]
        logger.info(
            f"model {name}: {len(skipped)} of {len(datalist)} labels contain none of its structures "
            f"{model.names}, not trained on: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
        )
    return kept


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
