"""The contouring networks: residual DynUNet with squeeze-and-excitation (served), its ablation variants,
MONAI's SegResNet as the named peer, and optional iterative refinement."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet, SegResNet
from torch import nn

from ..params import CTVParams


class SEResBlock(UnetResBlock):
    """UnetResBlock with squeeze-and-excitation recalibrating the residual branch (SE-ResNet order)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *args, se_reduction: int = 4, **kwargs):
        super().__init__(spatial_dims, in_channels, out_channels, *args, **kwargs)
        self.se = ChannelSELayer(spatial_dims, out_channels, r=min(se_reduction, out_channels))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        residual = inp
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.se(self.norm2(self.conv2(out)))
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        return self.lrelu(out + residual)


class CTVDynUNet(DynUNet):
    """DynUNet with argument checks, 1 output per class; plain (``res_block=False``) or residual blocks.

    Deep-supervision heads (``deep_supr_num`` of them) are returned only in training mode,
    stacked on dim 1 as DynUNet does; in eval mode the forward gives the full-resolution logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Sequence[int] | int],
        strides: Sequence[Sequence[int] | int],
        filters: Sequence[int],
        deep_supervision: bool = True,
        deep_supr_num: int = 2,
        dropout: float | None = None,
        res_block: bool = True,
    ):
        if len(kernel_size) != len(strides):
            raise ValueError(
                f"kernel_size and strides need one entry per level, got {len(kernel_size)} and {len(strides)}"
            )
        if len(filters) != len(strides):
            raise ValueError(f"filters needs one entry per level ({len(strides)}), got {len(filters)}")
        if any(f <= 0 for f in filters):
            raise ValueError(f"filters must be positive, got {list(filters)}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if deep_supervision and not 1 <= deep_supr_num <= len(strides) - 2:
            raise ValueError(
                f"deep_supr_num must be in [1, {len(strides) - 2}] for {len(strides)} levels, got {deep_supr_num}"
            )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=filters,
            dropout=dropout,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )


class PlainDynUNet(CTVDynUNet):
    """The ablation's baseline: two plain conv-norm-act layers per level."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, res_block=False, **kwargs)


class SEResDynUNet(CTVDynUNet):
    """Residual DynUNet whose encoder and bottleneck blocks are residual SE blocks."""

    def __init__(self, *args, se_reduction: int = 4, **kwargs):
        if se_reduction < 1:
            raise ValueError(f"se_reduction must be >= 1, got {se_reduction}")
        self.se_reduction = se_reduction
        super().__init__(*args, res_block=True, **kwargs)

    # DynUNet builds every encoder block through these three hooks.
    def _block(self, in_ch: int, out_ch: int, kernel, stride) -> SEResBlock:
        return SEResBlock(
            self.spatial_dims,
            in_ch,
            out_ch,
            kernel,
            stride,
            self.norm_name,
            self.act_name,
            dropout=self.dropout,
            se_reduction=self.se_reduction,
        )

    def get_input_block(self) -> nn.Module:
        return self._block(self.in_channels, self.filters[0], self.kernel_size[0], self.strides[0])

    def get_bottleneck(self) -> nn.Module:
        return self._block(self.filters[-2], self.filters[-1], self.kernel_size[-1], self.strides[-1])

    def get_downsamples(self) -> nn.ModuleList:
        pairs = zip(self.filters[:-2], self.filters[1:-1], self.kernel_size[1:-1], self.strides[1:-1])
        return nn.ModuleList([self._block(i, o, k, s) for i, o, k, s in pairs])


class CTVSegResNet(SegResNet):
    """MONAI's SegResNet (Myronenko 2018: residual pre-activation blocks, 1-2-2-4 per encoder level, one per
    decoder level, additive skips), the design's named alternative to DynUNet, as the ablation's peer.
    Widths double per level from ``filters[0]``, as SegResNet builds them; no deep supervision (the loss
    takes its plain logits)."""

    def __init__(self, in_channels: int, out_channels: int, filters: Sequence[int], dropout: float | None = None):
        levels = len(filters)
        if any(f != filters[0] * 2**k for k, f in enumerate(filters)):
            raise ValueError(f"SegResNet doubles its width per level: filters must be f, 2f, 4f..., got {list(filters)}")
        super().__init__(
            spatial_dims=3,
            init_filters=filters[0],
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout,
            blocks_down=(1, 2, 2, 4, 4, 4)[:levels],
            blocks_up=(1,) * (levels - 1),
        )


# The ablation's steps, by name (docs/ablation.md); "se_resunet" is the served design.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": PlainDynUNet,
    "resunet": CTVDynUNet,
    "se_resunet": SEResDynUNet,
    "segresnet": CTVSegResNet,
}


class IterativeRefinementNet(nn.Module):
    """Runs ``net`` K times on (image, previous mask), starting from an all-zero mask.

    ``net`` must take ``image_channels + mask_channels`` inputs and give ``mask_channels``
    logits. The mask fed back is the sigmoid of the previous pass, detached so that each
    pass learns to correct a given mask rather than back-propagating through all K passes.
    """

    def __init__(self, net: nn.Module, image_channels: int, mask_channels: int, passes: int):
        super().__init__()
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        expected = getattr(net, "in_channels", image_channels + mask_channels)
        if expected != image_channels + mask_channels:
            raise ValueError(f"net takes {expected} channels, refinement feeds {image_channels}+{mask_channels}")
        self.net = net
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        self.passes = passes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mask = image.new_zeros((image.shape[0], self.mask_channels, *image.shape[2:]))
        out = image
        for _ in range(self.passes):
            out = self.net(torch.cat([image, mask], dim=1))
            main = out[:, 0] if out.dim() == image.dim() + 1 else out  # deep supervision stacks heads on dim 1
            mask = torch.sigmoid(main).detach()
        return out


def build_network(
    filters: Sequence[int] = (16, 32, 64, 128, 256),
    refinement_passes: int = 0,
    deep_supr_num: int = 2,
    dropout: float | None = None,
    architecture: str = "se_resunet",
    out_channels: int = 1,
) -> nn.Module:
    """The network: 1 CT channel in, one logit per structure out (each its own sigmoid, so structures
    may overlap); 3-D, first level anisotropy-free."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    levels = len(filters)
    if levels < 3:
        raise ValueError(f"need at least 3 levels, got filters={list(filters)}")
    strides = [1] + [2] * (levels - 1)
    in_channels = 1 + out_channels if refinement_passes else 1
    if architecture == "segresnet":
        net = CTVSegResNet(in_channels, out_channels, filters, dropout)
    else:
        net = ARCHITECTURES[architecture](
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * levels,
            strides=strides,
            filters=list(filters),
            deep_supervision=deep_supr_num > 0,
            deep_supr_num=max(deep_supr_num, 1),
            dropout=dropout,
        )
    if refinement_passes:
        return IterativeRefinementNet(net, image_channels=1, mask_channels=out_channels, passes=refinement_passes)
    return net


def network_for(params: CTVParams) -> nn.Module:
    """The network a set of CTV parameters describes (the served model, the trainers, the scorers)."""
    return build_network(
        params.filters,
        params.refinement_passes,
        params.deep_supr_num,
        params.dropout,
        params.architecture,
        out_channels=len(params.structures),
    )
