"""ResNet v2 (pre-activation) trunk, VIVI's ResNet-50 v2 (issue #13): shapes and strides per stage, the parameter
count against torchvision's v1 trunk, the pre-activation order, gradients, the registry and one VIVI step."""

import math
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision

from vidssl.models.encoders import ModelConfig, ResNetEncoder, build_model_encoder, encoder_names
from vidssl.models.resnet_v2 import PreActBasic, PreActBottleneck, ResNetV2Encoder
from vidssl.models.vivi import VIVI

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("stride8", [False, True])
@pytest.mark.parametrize("out_layer", LAYERS)
def test_shapes_and_strides_per_out_layer(out_layer, stride8, one_thread):
    torch.manual_seed(0)
    enc = ResNetV2Encoder("resnet50v2", out_layer=out_layer, stride8=stride8)
    ref = ResNetEncoder("resnet50", out_layer=out_layer, stride8=stride8)  # the v1 trunk: same interface
    assert enc.layers == LAYERS[: LAYERS.index(out_layer) + 1] and enc.out_layer == out_layer
    assert enc.out_channels == ref.out_channels and enc.stride == ref.stride
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        for layer in enc.layers:
            assert enc.channels_at(layer) == ref.channels_at(layer)
            assert enc.stride_at(layer) == ref.stride_at(layer)
            s = enc.stride_at(layer)
            y = enc(x, upto=layer)
            assert y.shape == (2, enc.channels_at(layer), math.ceil(40 / s), math.ceil(56 / s))
            assert y.shape == ref(x, upto=layer).shape
            assert (y >= 0).all()  # every stage output is BN+ReLU normalised
        assert enc(x).shape == (2, enc.out_channels, math.ceil(40 / enc.stride), math.ceil(56 / enc.stride))
    with pytest.raises(ValueError, match="upto"):
        ResNetV2Encoder("resnet18v2", out_layer="layer1")(x, upto="layer2")


@pytest.mark.parametrize("arch,width", [("resnet18v2", 512), ("resnet34v2", 512)])
def test_basic_block_variants(arch, width, one_thread):
    enc = ResNetV2Encoder(arch, stride8=False, padding_mode="zeros")
    assert isinstance(enc.layer1[0], PreActBasic) and enc.out_channels == width
    assert len(enc.layer3) == {"resnet18v2": 2, "resnet34v2": 6}[arch]
    # v1 -> v2 keeps every convolution (v2's 1x1 projections lose their BN, no conv bias anywhere)
    conv = lambda m: sum(p.numel() for n, p in m.named_parameters() if "conv" in n or "downsample" in n)
    tv = getattr(torchvision.models, arch.removesuffix("v2"))()
    assert conv(enc) == sum(p.numel() for n, p in tv.named_parameters() if n.endswith(".weight") and p.dim() == 4)
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, width, 1, 1)


def test_resnet50v2_parameter_count_matches_the_v1_trunk_up_to_moved_batchnorms():
    """v2 only moves BatchNorms: convolutions are identical, so the difference is BN channels x 2 (weight, bias).

    v1 BN channels: stem 64 + per stage (width w, n blocks) n * (w + w + 4w) + 4w on the projection
    = 64 + 1408 + 3584 + 10240 + 11264 = 26560. v2: per stage the first block's input (64/256/512/1024)
    + (n - 1) * 4w inputs + n * 2w, plus the 2048 post-norm = 960 + 2816 + 8704 + 8192 + 2048 = 22720.
    So v2 has (26560 - 22720) * 2 = 7680 fewer parameters (23,500,352 vs 23,508,032): 0.03 %.
    """
    v2 = _count(ResNetV2Encoder("resnet50v2", out_layer="layer4", stride8=False, padding_mode="zeros"))
    tv = torchvision.models.resnet50()
    v1 = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))  # trunk without the head
    bn = lambda m: sum(p.numel() for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters())
    v2_bn = bn(ResNetV2Encoder("resnet50v2"))
    assert bn(tv) - v2_bn == 2 * (26560 - 22720) == 7680
    assert v1 - v2 == 7680
    assert abs(v2 - v1) / v1 < 0.01
    assert 23.4e6 < v2 < 23.6e6  # the ~23.5M ResNet-50 trunk


def test_blocks_pre_activate_and_project_the_pre_activated_input():
    """Traced order: the residual branch starts with bn1 -> relu; the projection reads relu(bn1(x)), not x; the
    stem is conv + max pool with no BN/ReLU; the post-norm follows the last stage."""
    for block, n_bn in ((PreActBottleneck(64, 64, 2), 3), (PreActBasic(64, 128, 2), 2)):
        g = torch.fx.symbolic_trace(block).graph
        ops = [n for n in g.nodes if n.op in ("call_module", "call_function", "call_method")]
        x = next(n for n in g.nodes if n.op == "placeholder")
        assert ops[0].op == "call_module" and ops[0].target == "bn1" and ops[0].args[0] is x
        assert ops[1].target is torch.nn.functional.relu and ops[1].args[0] is ops[0]
        proj = next(n for n in ops if n.target == "downsample")
        assert proj.args[0] is ops[1]  # projection from the pre-activation
        assert next(n for n in ops if n.target == "conv1").args[0] is ops[1]
        assert {u.target for u in x.users} == {"bn1"}  # x reaches the output only through the projection
        for i in range(1, n_bn + 1):  # every conv is preceded by its BN + ReLU
            conv = next(n for n in ops if n.target == f"conv{i}")
            relu = conv.args[0]
            assert relu.target is torch.nn.functional.relu and relu.args[0].target == f"bn{i}"
        assert ops[-1].target is operator.add  # the block ends with the residual sum
    plain = PreActBottleneck(256, 64, 1)
    assert plain.downsample is None
    g = torch.fx.symbolic_trace(plain).graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    assert {u.target for u in x.users} == {"bn1", operator.add}  # identity shortcut is x itself
    enc = ResNetV2Encoder("resnet50v2", padding_mode="zeros")
    g = torch.fx.symbolic_trace(enc, concrete_args={"upto": None}).graph
    mods = [n.target for n in g.nodes if n.op == "call_module"]
    assert mods[:3] == ["conv1", "maxpool", "layer1.0.bn1"]  # no BN/ReLU after the stem
    assert mods[-1] == "norm"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.layer1[0].downsample.modules())


def test_gradient_reaches_the_stem_and_padding_modes(one_thread):
    torch.manual_seed(0)
    enc = ResNetV2Encoder("resnet50v2", out_layer="layer3", stride8=True, padding_mode="reflect")
    enc(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert enc.conv1.weight.grad is not None and enc.conv1.weight.grad.abs().sum() > 0
    assert enc.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())
    pads = {m.padding_mode for m in enc.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)}
    assert pads == {"reflect"}


def test_builds_through_the_registry():
    assert {"resnet18v2", "resnet34v2", "resnet50v2"} <= set(encoder_names())
    enc = build_model_encoder(ModelConfig(encoder="resnet50v2", out_layer="layer3", eval_layer="layer2",
                                          stride8=False, padding_mode="zeros"))
    assert isinstance(enc, ResNetV2Encoder) and enc.arch == "resnet50v2" and enc.padding_mode == "zeros"
    assert enc.layers == ("layer1", "layer2", "layer3") and enc.stride == 16 and enc.out_channels == 1024
    grouped = build_model_encoder(ModelConfig(encoder="resnet18v2", out_layer="layer2", norm="group"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in grouped.modules())
    assert isinstance(grouped.norm, nn.GroupNorm)


def test_one_vivi_training_step(one_thread):
    torch.manual_seed(0)
    enc = build_model_encoder(ModelConfig(encoder="resnet50v2", out_layer="layer2", eval_layer="layer2",
                                          stride8=False, padding_mode="zeros"))
    m = VIVI(enc, num_shots=2, frames_per_shot=2, shot_loss="triplet", video_loss="order", pooling="attention",
             proj_hidden=32, proj_dim=16, shot_dim=16, hidden=32)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = enc.conv1.weight.detach().clone()
    loss, logs = m({"video": torch.randn(2, 4, 3, 32, 32)}, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and "shot/loss" in logs and "video/loss" in logs
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before, enc.conv1.weight)


def test_recipe_trains_a_step_and_the_checkpoint_feeds_propagation_features(tmp_path, one_thread):
    """``model.encoder: resnet50v2`` through the engine (one VIVI step on 32 px shots), then the checkpoint's
    encoder read at ``eval_layer`` by the propagation feature extractor."""
    import numpy as np
    from PIL import Image

    from vidssl.data.manifest import VideoEntry, write_manifest
    from vidssl.engine import encoder_from_checkpoint, resolve_run_config, train
    from vidssl.evaluation.presets import get_preset
    from vidssl.evaluation.sources import model_extractor

    entries = []
    for v in range(2):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        rng = np.random.default_rng(v)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        entries.append(VideoEntry(name=f"v{v}", path=str(folder), kind="frames", num_frames=8, fps=None,
                                  shots=[(0, 4), (4, 8)]))
    write_manifest(tmp_path / "shots.jsonl", entries)
    cfg = resolve_run_config(None, [
        "data.source=manifest", f"data.manifest={tmp_path / 'shots.jsonl'}", "data.sampler=shots",
        "data.num_shots=2", "data.clip_len=2", "data.crop_size=32", "data.clips_per_video=1",
        "model.encoder=resnet50v2", "model.out_layer=layer2", "model.eval_layer=layer1", "model.stride8=false",
        "objectives=[{name: vivi, proj_hidden: 32, hidden: 32, shot_dim: 16}]", "train.steps=1",
        "train.batch_size=2", "train.log_every=1", "train.ckpt_every=1", "train.threads=1", "train.device=cpu",
        "optim.lr=0.001", "eval.enabled=false"])
    train(cfg, tmp_path / "run")
    enc, model_cfg, _, step = encoder_from_checkpoint(tmp_path / "run")
    assert step == 1 and isinstance(enc, ResNetV2Encoder) and enc.layers == ("layer1", "layer2")
    ext, layer, _ = model_extractor(enc, model_cfg, get_preset("crw"), name="v2")
    assert layer == "layer1" and ext.stride == 4 and ext.channels == 256
    feats = ext(torch.zeros(2, 3, 32, 48, dtype=torch.uint8))
    assert feats.shape[:2] == (2, 256) and torch.isfinite(feats).all()
