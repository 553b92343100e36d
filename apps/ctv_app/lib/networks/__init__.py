from .se_dynunet import (
    ARCHITECTURES,
    CTVDynUNet,
    CTVSegResNet,
    IterativeRefinementNet,
    PlainDynUNet,
    SEResBlock,
    SEResDynUNet,
    build_network,
    network_for,
)

__all__ = [
    "ARCHITECTURES",
    "CTVDynUNet",
    "CTVSegResNet",
    "PlainDynUNet",
    "SEResBlock",
    "SEResDynUNet",
    "IterativeRefinementNet",
    "build_network",
    "network_for",
]
