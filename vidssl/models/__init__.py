"""Models: frame encoders and one module per method (constructible with explicit keyword arguments)."""

from vidssl.models.corrflow import CorrFlow, rgb_channel_dropout
from vidssl.models.crw import CRW, grid_patches, jitter_patches
from vidssl.models.instance import InstanceDiscrimination, ProjectionHead, augment_views
from vidssl.models.encoders import ENCODERS, ResNetEncoder, build_encoder
from vidssl.models.lab import lab_to_rgb, normalise_lab, rgb_to_lab
from vidssl.models.local_attention import local_aggregate, local_attention, local_correlation
from vidssl.models.mast import MAST, lab_channel_dropout
from vidssl.models.mast_encoder import MASTEncoder
from vidssl.models.resnet_v2 import ResNetV2Encoder
from vidssl.models.timecycle import Localizer, TimeCycle, TimeCycleHead
from vidssl.models.vivi import VIVI, ShotPooling

__all__ = ["CRW", "ENCODERS", "InstanceDiscrimination", "Localizer", "ProjectionHead", "augment_views", "MAST", "TimeCycle", "TimeCycleHead", "VIVI", "ShotPooling", "CorrFlow", "MASTEncoder", "ResNetEncoder", "ResNetV2Encoder", "build_encoder", "grid_patches",
           "jitter_patches", "lab_channel_dropout", "lab_to_rgb", "local_aggregate", "local_attention",
           "local_correlation", "normalise_lab", "rgb_channel_dropout", "rgb_to_lab"]
