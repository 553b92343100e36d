from .se_dynunet import IterativeRefinementNet, SEResBlock, SEResDynUNet, build_network

__all__ = ["SEResBlock", "SEResDynUNet", "IterativeRefinementNet", "build_network"]
