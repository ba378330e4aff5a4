"""CorrFlow: channel dropout, colour quantisation, log-space numerics, scheduled sampling, learning on one clip."""

import math

import pytest
import torch
import torch.nn.functional as F

from vidssl.losses.reconstruction import colour_nll, kmeans, log_bilinear_upsample, quantise_ab
from vidssl.models.corrflow import CorrFlow, colour_jitter_frames, input_rgb, rgb_channel_dropout
from vidssl.models.mast_encoder import MASTEncoder

from tiny_encoder import TinyEncoder  # tests/tiny_encoder.py


def moving_texture_clip(frames: int = 3, size: int = 32, shift: int = 2, block: int = 8, seed: int = 0
                        ) -> torch.Tensor:
    """RGB in [0, 1]: random coloured ``block``-pixel squares translated by ``shift`` pixels per frame,
    ``(1, T, 3, S, S)``."""
    g = torch.Generator().manual_seed(seed)
    n = (size + shift * frames) // block + 2
    big = torch.rand(1, 3, n, n, generator=g).repeat_interleave(block, 2).repeat_interleave(block, 3)
    clip = [big[0, :, 2:2 + size, 2 + shift * t:2 + shift * t + size] for t in range(frames)]
    return torch.stack(clip)[None]


def test_rgb_channel_dropout_follows_the_code():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 4, 5, generator=g) + 0.1
    n, none, ks, per_channel = 3000, 0, {1: 0, 2: 0}, [0, 0, 0]
    for _ in range(n):
        y, dropped = rgb_channel_dropout(x, keep_prob=0.3, generator=g)
        if not dropped:
            none += 1
            assert y is x or torch.equal(y, x)
            continue
        k = len(dropped)
        ks[k] += 1
        for c in range(3):
            if c in dropped:
                per_channel[c] += 1
                assert torch.all(y[:, :, c] == 0)  # zeroed for every sample and frame
            else:
                torch.testing.assert_close(y[:, :, c], x[:, :, c] * 3 / (3 - k))
    assert abs(none / n - 0.3) < 0.04
    assert abs(ks[1] / (n - none) - 0.5) < 0.05
    expected = (ks[1] + 2 * ks[2]) / 3  # each channel equally likely
    assert all(abs(c - expected) / expected < 0.1 for c in per_channel)
    with pytest.raises(ValueError, match="keep_prob"):
        rgb_channel_dropout(x, keep_prob=1.5)


def test_colour_jitter_only_on_picked_clips_and_per_frame():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 2, 3, 6, 6, generator=g)
    y = colour_jitter_frames(x, prob=0.5, strength=0.1, generator=g)
    changed = [(y[i] - x[i]).abs().amax() > 1e-6 for i in range(64)]
    assert 15 < sum(changed) < 50  # about half of the clips
    i = changed.index(True)
    assert not torch.allclose(y[i, 0] - x[i, 0], y[i, 1] - x[i, 1])  # fresh parameters per frame
    assert torch.equal(colour_jitter_frames(x, prob=0.0, generator=g), x)


def test_input_must_be_rgb01():
    video = torch.rand(1, 3, 3, 8, 8)
    imagenet = (video - 0.45) / 0.225
    with pytest.raises(ValueError, match="data.mean"):
        input_rgb(imagenet, mean=(0, 0, 0), std=(1, 1, 1))
    back = input_rgb(imagenet, mean=(0.45,) * 3, std=(0.225,) * 3)
    torch.testing.assert_close(back, video, atol=1e-5, rtol=0)


def test_quantise_is_nearest_centroid_and_kmeans_finds_clusters():
    g = torch.Generator().manual_seed(0)
    cents = torch.tensor([[-40.0, 10.0], [0.0, 0.0], [30.0, -20.0], [15.0, 45.0]])
    ab = torch.randn(2, 2, 5, 7, generator=g) * 30
    ids = quantise_ab(ab, cents)
    d = ((ab.permute(0, 2, 3, 1)[..., None, :] - cents) ** 2).sum(-1)
    assert torch.equal(ids, d.argmin(-1))
    pts = torch.cat([c + torch.randn(200, 2, generator=g) for c in cents])
    fit = kmeans(pts, k=4, generator=torch.Generator().manual_seed(3))
    for c in cents:
        assert ((fit - c).norm(dim=1).min() < 0.5).item()


def test_log_bilinear_upsample_matches_probability_space():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) * 3, dim=1)
    ref = torch.log(F.interpolate(p, size=(24, 28), mode="bilinear", align_corners=False))
    torch.testing.assert_close(log_bilinear_upsample(p.log(), (24, 28)), ref, rtol=1e-10, atol=1e-10)
    # tiny probabilities keep exact logs (the official log(p + 1e-8) would floor them)
    tiny = torch.full((1, 1, 2, 2), -200.0, dtype=torch.float64)
    torch.testing.assert_close(log_bilinear_upsample(tiny, (8, 8)), torch.full((1, 1, 8, 8), -200.0,
                                                                                dtype=torch.float64))


def test_logsumexp_and_official_numerics_give_the_same_distribution():
    torch.manual_seed(0)
    m = CorrFlow(TinyEncoder(), numerics="logsumexp")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    ref = torch.softmax(torch.randn(1, 16, 8, 8, generator=g), dim=1)
    p_lse, lp_lse = m.copy_colours(q, k, ref, (32, 32))
    m.numerics = "official"
    p_off, lp_off = m.copy_colours(q, k, ref, (32, 32))
    torch.testing.assert_close(p_lse, p_off, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p_off.sum(1), torch.ones(1, 32, 32), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp_off, torch.log(p_off + 1e-8))
    torch.testing.assert_close(colour_nll(p_off, torch.zeros(1, 32, 32, dtype=torch.long)),
                               -torch.log(p_off[:, 0] + 1e-8).mean())


def test_reference_colour_downsampling_modes():
    m = CorrFlow(TinyEncoder(), num_colours=4, ref_downsample="ids_bilinear")
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    ids[:, :, 4:] = 2
    hard = m.reference_colours(ids, (2, 2))
    assert torch.equal(hard.sum(1), torch.ones(1, 2, 2)) and set(hard.unique().tolist()) <= {0.0, 1.0}
    m.ref_downsample = "onehot_bilinear"
    soft = m.reference_colours(ids, (2, 2))
    torch.testing.assert_close(soft.sum(1), torch.ones(1, 2, 2))
    # a 0|2 edge at the cell border: bilinear ids give exact 0 and 2 here, but a 0|3 edge inside a cell makes 1
    ids2 = torch.zeros(1, 4, 4, dtype=torch.long)
    ids2[:, :, 2:] = 3
    m.ref_downsample = "ids_bilinear"
    assert 1 in m.reference_colours(ids2, (1, 1)).argmax(1).unique().tolist()  # the official quirk: spurious id


def test_scheduled_sampling_schedule_and_centroid_fitting():
    torch.manual_seed(0)
    m = CorrFlow(TinyEncoder(), schedule_steps=4, keep_prob=1.0, jitter_prob=0.0)
    assert not bool(m.centroids_ready)
    clip = moving_texture_clip()
    g = torch.Generator().manual_seed(0)
    probs = []
    for _ in range(6):
        probs.append(m.scheduled_sampling_prob())
        m({"video": clip}, generator=g)
    assert probs[0] == pytest.approx(0.9) and probs[2] == pytest.approx(0.75) and probs[4:] == [
        pytest.approx(0.6)] * 2
    assert int(m.step) == 6 and bool(m.centroids_ready)
    assert torch.unique(m.centroids, dim=0).shape[0] == 16
    fitted = m.centroids.clone()
    m({"video": clip}, generator=g)
    assert torch.equal(m.centroids, fitted)  # fitted once, then kept (and saved in the state dict)
    assert "centroids" in m.state_dict() and "step" in m.state_dict()
    with pytest.raises(ValueError, match="centroids"):
        CorrFlow(TinyEncoder(), centroids=[[0.0, 0.0]] * 3)


def test_loss_falls_when_overfitting_one_clip():
    torch.manual_seed(0)
    m = CorrFlow(TinyEncoder(), keep_prob=0.3, jitter_prob=0.0, schedule_steps=40)
    clip = moving_texture_clip(size=32, shift=2)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss, logs = m({"video": clip}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss_sim"])
    assert math.isfinite(losses[-1])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_forward_with_the_real_encoder_and_errors():
    torch.manual_seed(0)
    m = CorrFlow(MASTEncoder(), keep_prob=0.0, jitter_prob=1.0)
    loss, logs = m({"video": torch.rand(1, 3, 3, 32, 32)}, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(m.encoder.conv1[0].weight.grad.abs().sum()) > 0
    assert logs["dropped_channels"] in (1.0, 2.0)
    with pytest.raises(ValueError, match="clip_len"):
        m({"video": torch.rand(1, 2, 3, 32, 32)})
    with pytest.raises(ValueError, match="numerics"):
        CorrFlow(MASTEncoder(), numerics="fast")
