"""Models: frame encoders and one module per method (constructible with explicit keyword arguments)."""

from vidssl.models.crw import CRW, grid_patches, jitter_patches
from vidssl.models.encoders import ENCODERS, ResNetEncoder, build_encoder

__all__ = ["CRW", "ENCODERS", "ResNetEncoder", "build_encoder", "grid_patches", "jitter_patches"]
