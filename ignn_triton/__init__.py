"""IGNN image super-resolution with fused Triton kernels.

    import ignn_triton
    model = ignn_triton.load_model("IGNN_x4.pth")          # or ignn_triton.IGNN(scale=4)
    sr = model(lr)                                         # (B, 3, H, W) in [0, 1] -> x4
"""
from . import ops
from .checkpoint import CheckpointError, load_model, save_model
from .imresize import imresize
from .memory import estimate_memory
from .model import EDSR, IGNN
from .upscale import Upscaler, upscale

__all__ = ["EDSR", "IGNN", "CheckpointError", "Upscaler", "estimate_memory", "imresize",
           "load_model", "ops", "save_model", "upscale"]
__version__ = "0.1.0"
