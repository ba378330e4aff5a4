"""MAST: a/b channel dropout, ROI localisation under a known translation, both training stages,
learning on one pair, and the encoder."""

import math

import pytest
import torch
import torch.nn.functional as F

from vidssl.evaluation.mast_propagation import mast_propagate_frame
from vidssl.models.lab import normalise_lab, rgb_to_lab
from vidssl.models.local_attention import expected_offset
from vidssl.models.mast import MAST, lab_channel_dropout
from vidssl.models.mast_encoder import MASTEncoder

from tiny_encoder import TinyEncoder  # tests/tiny_encoder.py


def colour_blocks(frames: int, size: int = 32, shift: int = 2, block: int = 8, seed: int = 0) -> torch.Tensor:
    """``(1, T, 3, S, S)`` RGB in [0, 1]: random coloured squares translated by ``shift`` px per frame."""
    g = torch.Generator().manual_seed(seed)
    n = (size + shift * frames) // block + 2
    big = torch.rand(1, 3, n, n, generator=g).repeat_interleave(block, 2).repeat_interleave(block, 3)
    return torch.stack([big[0, :, 2:2 + size, 2 + shift * t:2 + shift * t + size] for t in range(frames)])[None]


# ------------------------------------------------------------------------------------------ dropout

def test_lab_channel_dropout_drops_a_or_b_only():
    g = torch.Generator().manual_seed(0)
    lab = normalise_lab(rgb_to_lab(torch.rand(2, 3, 3, 5, 6, generator=g)))
    counts = {1: 0, 2: 0}
    for _ in range(2000):
        out, ch = lab_channel_dropout(lab, generator=g)
        counts[ch] += 1
        assert torch.all(out[:, :, ch] == 0)
        for c in {0, 1, 2} - {ch}:  # L and the other channel scaled by 3/2
            torch.testing.assert_close(out[:, :, c], lab[:, :, c] * 1.5)
    assert set(counts) == {1, 2} and abs(counts[1] / 2000 - 0.5) < 0.04


def test_mast_feeds_dropped_input_and_reconstructs_the_clean_channel():
    torch.manual_seed(0)
    enc = TinyEncoder()
    m = MAST(enc)
    video = colour_blocks(2)
    loss, logs = m({"video": video}, generator=torch.Generator().manual_seed(5))
    ch = int(logs["dropped_channel"])
    clean = normalise_lab(rgb_to_lab(video))
    for seen, frame in zip(enc.seen, (1, 0)):  # target first, then the reference
        assert torch.all(seen[:, ch] == 0)
        torch.testing.assert_close(seen[:, 0], clean[:, frame, 0] * 1.5)
    # the loss is the Huber of the copy of the reference's clean channel against the target's clean channel
    assert m.temperature(16) == pytest.approx(4.0)
    m.eval()
    enc.seen.clear()
    loss_eval, logs_eval = m({"video": video})
    assert torch.equal(enc.seen[0], clean[:, 1])  # no dropout at eval; channel a reconstructed
    assert logs_eval["dropped_channel"] == 1.0 and math.isfinite(float(loss_eval.detach()))


def test_sqrt_c_scaling_flag_and_pair_sampling():
    enc = TinyEncoder(channels=64)
    assert MAST(enc).temperature(64) == pytest.approx(8.0)
    assert MAST(enc, sqrt_c_scaling=False).temperature(64) == 1.0
    m = MAST(enc, pair_gaps=[2, 5, 8], pair_probs=[0.4, 0.4, 0.2])
    assert m.min_clip_len == 9
    g = torch.Generator().manual_seed(0)
    picks = m._pair_targets(9, g, 5000)
    freq = {k: picks.count(k) / 5000 for k in (2, 5, 8)}
    assert abs(freq[2] - 0.4) < 0.03 and abs(freq[5] - 0.4) < 0.03 and abs(freq[8] - 0.2) < 0.03
    with pytest.raises(ValueError, match="pair_probs"):
        MAST(enc, pair_gaps=[2, 5], pair_probs=[0.5, 0.6])
    with pytest.raises(ValueError, match="clip"):
        m({"video": torch.rand(1, 4, 3, 16, 16)})
    # references 0, 1, T-3, T-2 must be distinct frames before the target T-1
    assert MAST(enc, stage="multiframe", long_term=[0, 1], short_term=[-3, -2]).min_clip_len == 5


# ------------------------------------------------------------------------------------------ ROI

def smooth_field(channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, h, w, generator=g)
    for _ in range(2):
        x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    return F.normalize(x, dim=1)


def test_roi_localisation_finds_the_window_under_a_known_translation():
    base = smooth_field(16, 64, 80, seed=0) * 6.0
    # coarse search (dilation 2) on a translation on its lattice: the expected offset is the translation
    key = base[:, :, 4:44, 20:68]
    query = base[:, :, 14:54, 6:54]  # query[y, x] = key[y + 10, x - 14]
    off = expected_offset(query, key, radius=12, dilation=2, out_of_image="zero")
    inner = off[0, :, 2:28, 16:44]  # queries whose match lies inside the key frame, away from its border
    assert (inner[0] - 10).abs().max() < 1.0 and (inner[1] + 14).abs().max() < 1.0  # half a coarse step

    dy, dx = 9, -13  # off the lattice; 13 columns is outside a radius-6 window
    query = base[:, :, 4 + dy:44 + dy, 20 + dx:68 + dx]  # query[y, x] = key[y + 9, x - 13]

    labels = torch.zeros(2, 40, 48)
    labels[0] = 1.0
    labels[:, 12:25, 16:31] = torch.tensor([0.0, 1.0])[:, None, None]  # object in the key frame
    truth = torch.zeros(40, 48, dtype=torch.long)
    truth[12 - dy:25 - dy, 16 - dx:31 - dx] = 1  # where it appears in the query frame
    far = mast_propagate_frame(query[0], [key[0]], [labels], ref_indices=[0], target_index=20, radius=6,
                               roi_radius=12)  # gap 20 > 15: ROI with dilation 2
    near = mast_propagate_frame(query[0], [key[0]], [labels], ref_indices=[0], target_index=5, radius=6)

    matched = torch.zeros(40, 48, dtype=torch.bool)
    matched[:40 - dy, -dx:] = True  # queries whose true match lies inside the key frame

    def iou(pred):
        p = (pred.argmax(0) == 1) & matched
        t = truth == 1
        return float((p & t).sum()) / float((p | t).sum())

    assert iou(far) > 0.9
    assert iou(near) < 0.5  # the plain 13x13 window cannot reach the object


# ------------------------------------------------------------------------------------------ training

def test_pairwise_loss_falls_when_overfitting_one_pair():
    torch.manual_seed(0)
    m = MAST(TinyEncoder())
    video = colour_blocks(2, shift=8, block=8)  # 2 feature cells of motion: copying in place is poor
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses, identity = [], []
    for _ in range(40):
        loss, logs = m({"video": video}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["huber"])
        identity.append(logs["huber_identity"])
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert sum(losses[-5:]) / 5 < 0.6 * sum(identity) / len(identity)  # far better than copying in place


def test_multiframe_stage_with_roi_trains():
    torch.manual_seed(0)
    m = MAST(TinyEncoder(), stage="multiframe", long_term=[0, 1], short_term=[-3, -2], roi=True, roi_radius=3,
             roi_dilation=2, radius=3)
    video = colour_blocks(6, size=32)
    loss, logs = m({"video": video}, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(logs["huber"])
    grads = {name: p.grad for name, p in m.encoder.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert len(m.encoder.seen) == 5  # target + 4 references


def test_mast_encoder_shapes_and_official_state_dict():
    enc = MASTEncoder()
    x = torch.rand(2, 3, 30, 42)
    assert enc(x).shape == (2, 64, 8, 11) and enc.feature_size(30, 42) == (8, 11)
    assert enc(x, upto="layer3").shape == (2, 256, 8, 11) and enc.channels_at("layer2") == 128
    assert enc.stride_at("head") == 4
    official = {}
    for k, v in enc.state_dict().items():
        new = "module.post_convolution." + k[5:] if k.startswith("head.") else "module.feature_extraction." + k
        official[new] = v.clone() + 1.0 if v.is_floating_point() else v.clone()
    other = MASTEncoder()
    other.load_official_state_dict(official)
    torch.testing.assert_close(other.head.weight, enc.head.weight + 1.0)
    with pytest.raises(ValueError, match="missing"):
        other.load_official_state_dict({"feature_extraction.conv1.0.weight": enc.conv1[0].weight})


def test_truncated_mast_encoder_is_the_full_trunk_up_to_its_last_stage():
    """``out_layer="layer2"``: the same seeded weights and outputs as the official encoder's first stages, nothing
    after them built, and the truncated output is what every reader takes as the features."""
    torch.manual_seed(0)
    full = MASTEncoder().eval()
    torch.manual_seed(0)
    short = MASTEncoder(out_layer="layer2").eval()
    assert short.layers == ("layer1", "layer2") and (short.out_channels, short.stride) == (128, 4)
    assert not any(k.startswith(("layer3.", "layer4.", "head.")) for k in short.state_dict())
    full_state = full.state_dict()
    assert all(torch.equal(v, full_state[k]) for k, v in short.state_dict().items())
    x = torch.rand(2, 3, 30, 42)
    torch.testing.assert_close(short(x), full(x, upto="layer2"), rtol=0, atol=0)
    assert short(x).shape == (2, 128, 8, 11) and short.channels_at("layer2") == 128
    with pytest.raises(ValueError, match="built stages"):
        short(x, upto="head")
    with pytest.raises(ValueError, match="out_layer"):
        MASTEncoder(out_layer="layer1")  # stride 2: not a correspondence encoder


def test_model_config_truncates_mast_resnet18_and_refuses_layer1():
    from vidssl.config import ConfigError
    from vidssl.models.encoders import ModelConfig, build_model_encoder

    assert build_model_encoder(ModelConfig(encoder="mast_resnet18")).layers[-1] == "head"  # layer4: the official
    cfg = ModelConfig(encoder="mast_resnet18", out_layer="layer3")
    cfg.validate()  # eval_layer (default layer3) does not apply: the encoder is read at its last stage
    assert build_model_encoder(cfg).layers[-1] == "layer3"
    with pytest.raises(ConfigError, match="model.out_layer"):
        ModelConfig(encoder="mast_resnet18", out_layer="layer1").validate()
