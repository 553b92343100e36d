from .se_dynunet import (
    ARCHITECTURES,
    CTVDynUNet,
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
    "PlainDynUNet",
    "SEResBlock",
    "SEResDynUNet",
    "IterativeRefinementNet",
    "build_network",
    "network_for",
]
