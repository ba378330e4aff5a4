"""vidssl: self-supervised learning from video.

Layers (imports point down): ``vidssl.io`` (decoding, image/palette files) -> ``vidssl.data`` (datasets,
samplers, transforms, synthetic videos) -> ``vidssl.models`` / ``vidssl.losses`` -> ``vidssl.engine`` (training
loop, distributed, checkpoints) -> ``vidssl.evaluation`` (label propagation, DAVIS metrics) -> ``vidssl.cli``.
"""

__version__ = "0.1.0"
