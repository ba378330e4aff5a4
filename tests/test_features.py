"""Feature extractors: shapes/stride, exact sizes, seeds, weights files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from vidssl.data.davis import DavisLayoutError
from vidssl.evaluation.features import (
    EncoderFeatures,
    FeatureExtractor,
    FrameFeatures,
    LabFeatures,
    build_encoder_features,
    infer_resnet_arch,
    resize_frames,
    resized_size,
)
from vidssl.evaluation.presets import get_preset
from vidssl.models.lab import normalise_lab, rgb_to_lab


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resized_size_policies():
    assert resized_size(480, 854) == (480, 854)
    kw = dict(resize="short_floor", short_side=480, multiple=64)
    assert resized_size(480, 854, **kw) == (480, 832)
    assert resized_size(480, 910, **kw) == (480, 896)
    assert resized_size(480, 1152, **kw) == (480, 1152)
    assert resized_size(854, 480, **kw) == (832, 480)  # portrait: the long side is the height
    with pytest.raises(ValueError, match="resize"):
        resized_size(10, 10, resize="square")


def test_resize_frames_exact_size_like_opencv_inter_linear():
    cv2 = pytest.importorskip("cv2")
    frames = torch.randint(0, 256, (2, 3, 37, 51), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in [(20, 33), (74, 102)]:  # down and up
        out = resize_frames(frames, size)
        assert out.shape == (2, 3, *size) and out.dtype == torch.float32
        ref = [cv2.resize(f.permute(1, 2, 0).numpy().astype("float32") / 255, size[::-1], interpolation=cv2.INTER_LINEAR)
               for f in frames]
        torch.testing.assert_close(out, torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(resize_frames(frames, (37, 51)), frames.float() / 255)


@pytest.mark.parametrize("size", [(37, 51), (40, 64), (17, 9)])
def test_lab_features_shapes_and_values(size):
    ext = LabFeatures(stride=8)
    assert isinstance(ext, FeatureExtractor)
    frames = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    feats = ext(frames)
    expected = (math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert feats.shape == (2, 3, *expected)
    assert ext.feature_size(*size) == expected
    # A constant frame gives the (scaled) Lab value of its colour in every cell.
    const = torch.zeros(1, 3, *size, dtype=torch.uint8)
    const[:, 0], const[:, 1], const[:, 2] = 200, 30, 90
    scaled = normalise_lab(rgb_to_lab(torch.tensor([200 / 255, 30 / 255, 90 / 255]).reshape(3, 1, 1))).flatten()
    # sRGB (200, 30, 90) is Lab (44.16, 65.81, 10.61) (scikit-image), scaled as MAST's input
    torch.testing.assert_close(scaled, torch.tensor([(44.16 - 50) / 50, 65.81 / 127, 10.61 / 127]), atol=2e-4,
                               rtol=0)
    torch.testing.assert_close(ext(const)[0], scaled[:, None, None].expand(3, *expected), atol=1e-6, rtol=0)


def test_encoder_features_shapes_odd_sizes_and_seed():
    rng_before = torch.random.get_rng_state()
    ext = build_encoder_features("resnet18", seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeding did not touch the global RNG
    assert ext.stride == 8 and ext.channels == 256
    for size in [(37, 51), (48, 64)]:
        frames = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
        feats = ext(frames)
        assert feats.shape == (1, 256, math.ceil(size[0] / 8), math.ceil(size[1] / 8))
        assert ext.feature_size(*size) == tuple(feats.shape[-2:])
    frames = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    same = build_encoder_features("resnet18", seed=3)(frames)
    torch.testing.assert_close(ext(frames), same)
    other = build_encoder_features("resnet18", seed=4)(frames)
    assert (other - same).abs().max() > 1e-3


def test_encoder_features_normalisation_and_resize():
    ext = build_encoder_features("resnet18", seed=0, cfg=get_preset("dino"))
    frames = torch.randint(0, 256, (1, 3, 48, 80), dtype=torch.uint8)
    # DINO policy with short side 480: 48x80 -> 480x800 -> floored to 480x768.
    assert ext.input_size(48, 80) == (480, 768)
    small = EncoderFeatures(ext.encoder, layer="layer3", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = frames.float() / 255
    manual = ext.encoder((x - torch.tensor([0.5, 0.4, 0.3])[None, :, None, None])
                         / torch.tensor([0.2, 0.25, 0.3])[None, :, None, None], upto="layer3")
    torch.testing.assert_close(small(frames), manual)


def test_weights_file_and_arch_inference(tmp_path):
    net = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    ext = build_encoder_features("resnet18", weights=path)
    assert ext.encoder.padding_mode == "zeros"
    torch.testing.assert_close(ext.encoder.conv1.weight, net.conv1.weight)
    torch.testing.assert_close(ext.encoder.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    assert infer_resnet_arch(net.state_dict()) == "resnet18"
    assert infer_resnet_arch(torchvision.models.resnet50().state_dict()) == "resnet50"
    assert ext.info()["arch"] == "resnet18" and "r18.pth" in ext.name
    with pytest.raises(ValueError, match="resnet50"):
        build_encoder_features("resnet50", weights=path)  # message names the file and the expected arch
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        build_encoder_features("resnet18", weights=bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_encoder_features("resnet18", weights=tmp_path / "missing.pth")



def test_frame_features_encode_in_batches_once_each(tmp_path):
    from PIL import Image

    frames = torch.randint(0, 256, (7, 3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ext = LabFeatures(stride=4)
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return ext(x)

    counting.name, counting.feature_size = "lab", ext.feature_size
    provider = FrameFeatures(counting, frames, size=(16, 24), batch=3, l2=True)
    assert len(provider) == 7 and provider.feat_size == (4, 6)
    got = torch.stack([provider(t) for t in range(7)])
    assert calls == [3, 3, 1] and provider.computed == 7
    torch.testing.assert_close(got, torch.nn.functional.normalize(ext(frames), dim=1))
    # frame files are read from disk; a frame of another size is named
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i:05d}.png")
        Image.fromarray(frames[i].permute(1, 2, 0).numpy()).save(paths[-1])
    from_files = FrameFeatures(ext, paths, size=(16, 24), batch=2)
    torch.testing.assert_close(torch.stack([from_files(t) for t in range(3)]), ext(frames[:3]))
    Image.fromarray(frames[0, :, :8].permute(1, 2, 0).numpy()).save(paths[2])
    bad = FrameFeatures(ext, paths, size=(16, 24), batch=1)
    bad(0)
    with pytest.raises(DavisLayoutError, match=r"00002.png: frame is 24x8 \(WxH\) but the sequence's first annotation "
                                               r"is 24x16"):
        bad(2)


@pytest.mark.parametrize("colour, fed", [("lab", "lab"), ("rgb", "imagenet")])
def test_random_init_baseline_reads_the_models_colour_space(colour, fed):
    """A ResNet trained on Lab (e.g. MAST's objective on resnet18) is evaluated on Lab, its random init too; one trained
    on RGB reads ImageNet-normalised RGB; both are the run's step-0 weights at its eval layer."""
    from vidssl.evaluation.sources import random_init_extractor
    from vidssl.models.encoders import ModelConfig, build_model_encoder

    model = ModelConfig(encoder="resnet18", out_layer="layer2", eval_layer="layer2", colour=colour)
    ext, info, cfg = random_init_extractor(model, seed=3, preset=get_preset("crw"))
    assert ext.colour == fed and ext.layer == "layer2" == cfg.layer == info["layer"]
    torch.manual_seed(3)
    step0 = build_model_encoder(model)
    assert all(torch.equal(a, b) for a, b in zip(step0.state_dict().values(), ext.encoder.state_dict().values()))
    frames = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    other = random_init_extractor(ModelConfig(encoder="resnet18", out_layer="layer2", eval_layer="layer2",
                                              colour="rgb" if colour == "lab" else "lab"), seed=3,
                                  preset=get_preset("crw"))[0]
    assert not torch.allclose(ext(frames), other(frames))  # same weights, different input colour space
