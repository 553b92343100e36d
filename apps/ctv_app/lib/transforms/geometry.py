"""Bring a prediction made on the resampled RAS grid back onto the input's own voxel grid.

Written here rather than taken from ``monailabel.transform.post.Restored`` because that module
imports torchvision, which does not import next to a CPU-only torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample, Transform


class RestoreGeometry(Transform):
    """Resample ``img`` (channel-first, on ``src_affine``) to ``dst_affine`` and ``dst_shape``.

    Use bilinear on probabilities, then threshold: this keeps sub-voxel boundary information
    that resampling a binary mask with nearest neighbour would throw away.
    """

    def __init__(self, mode: str = "bilinear"):
        self.resample = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)

    def __call__(self, img: torch.Tensor, src_affine, dst_affine, dst_shape) -> MetaTensor:
        src = MetaTensor(torch.as_tensor(img, dtype=torch.float32), affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64))
        dst_affine = torch.as_tensor(np.asarray(dst_affine), dtype=torch.float64)
        out = self.resample(src, dst_affine=dst_affine, spatial_size=[int(s) for s in dst_shape])
        out = MetaTensor(out.as_tensor(), affine=dst_affine)
        if tuple(out.shape[1:]) != tuple(int(s) for s in dst_shape):
            raise RuntimeError(f"restore produced shape {tuple(out.shape[1:])}, expected {tuple(dst_shape)}")
        return out


class RestoreGeometryd(MapTransform):
    """Restore ``keys`` to the original grid recorded in ``ref_image``'s metadata by the loader.

    The source grid is ``ref_image``'s current affine (after orientation and resampling); the
    destination is the loader's ``original_affine`` and ``spatial_shape``.
    """

    def __init__(self, keys: KeysCollection, ref_image: str = "image", mode: str = "bilinear"):
        super().__init__(keys)
        self.ref_image = ref_image
        self.restore = RestoreGeometry(mode)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.ref_image]
        dst_affine, dst_shape = ref.meta["original_affine"], ref.meta["spatial_shape"]
        for key in self.key_iterator(d):
            d[key] = self.restore(d[key], ref.affine, dst_affine, dst_shape)
        return d
