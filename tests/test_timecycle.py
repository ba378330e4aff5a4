"""TimeCycle: spatial transformer, localiser, tracker cycles, losses, learning on one clip, checkpoint round trip."""

import json
import math

import einops
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.losses.cycle import (OFFSET_FACTOR, affine_grid, inlier_score, timecycle_loss, transformed_grid_loss,
                                 unit_grid)
from vidssl.models.encoders import build_encoder
from vidssl.models.timecycle import (Localizer, TimeCycle, cycle_tracks, localise, patch_affinity,
                                     sample_patch_theta, spatial_transform, theta_from_params, track)

from davis_scores import rescored_j_mean  # tests/davis_scores.py

# small-tensor tests: several times faster on one intra-op thread on a shared 2-core machine (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------------- helpers


def rot_theta(tx, ty, deg, scale=1 / 3, dtype=torch.float64):
    return theta_from_params(torch.tensor([[tx, ty, math.radians(deg)]], dtype=dtype), scale=scale)


def oracle_localizer(*, map_size, scale, offset_factor):
    """A parameter-free localiser: soft-argmax match of every patch cell, then the rotation + translation (scale
    fixed) that best maps the patch grid onto the matches (2-D Procrustes). Exact when the affinity is one-hot."""

    def fn(affinity):
        n, hw, h, w = affinity.shape
        pos = einops.rearrange(unit_grid(map_size, map_size, dtype=affinity.dtype), "H W c -> (H W) c")
        m = einops.einsum(affinity, pos, "n k h w, k c -> n h w c")  # expected matched position
        u = unit_grid(h, w, dtype=affinity.dtype)  # centred patch grid
        mc = m - m.mean(dim=(1, 2), keepdim=True)
        num = (u[..., 0] * mc[..., 1] - u[..., 1] * mc[..., 0]).sum(dim=(1, 2))
        den = (u[..., 0] * mc[..., 0] + u[..., 1] * mc[..., 1]).sum(dim=(1, 2))
        t = m.mean(dim=(1, 2)) / offset_factor
        return theta_from_params(torch.stack([t[:, 0], t[:, 1], torch.atan2(num, den)], dim=1), scale=scale)

    return fn


class TinyEncoder(nn.Module):
    """A stride-8 stand-in for the ResNet (fast tests of the objective's plumbing)."""

    stride, out_channels = 8, 32

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, 2, 1))

    def forward(self, x):
        return self.net(x)


def textured_clip(*, frames, size, shift=3, seed=0):
    """``(1, frames, 3, size, size)``: a smooth random texture translating ``shift`` pixels per frame."""
    g = torch.Generator().manual_seed(seed)
    world = F.interpolate(torch.randn(1, 3, 24, 24 + frames, generator=g), size=(size, size + shift * frames),
                          mode="bicubic", align_corners=False)
    return torch.stack([world[0, :, :, shift * t: shift * t + size] for t in range(frames)])[None]


# ------------------------------------------------------------------------------------------ spatial transformer


def test_spatial_transformer_samples_the_right_patch():
    img = torch.arange(28 * 28, dtype=torch.float64).reshape(1, 1, 28, 28)
    # scale 1/3 on a 28-cell map with a 10-cell patch: output cells fall on whole input cells 9..18 (t = 0),
    # translations of 2/27 move the patch by one cell
    crop = spatial_transform(img, rot_theta(0.0, 0.0, 0), size=(10, 10))
    torch.testing.assert_close(crop[0, 0], img[0, 0, 9:19, 9:19])
    crop = spatial_transform(img, rot_theta(2 * 4 / 27, -2 * 3 / 27, 0), size=(10, 10))
    torch.testing.assert_close(crop[0, 0], img[0, 0, 6:16, 13:23])
    # +90 degrees: output x runs down the input's rows, output y runs right to left
    crop = spatial_transform(img, rot_theta(0.0, 0.0, 90), size=(10, 10))
    torch.testing.assert_close(crop[0, 0], img[0, 0, 9:19, 9:19].T.flip(0))  # crop[i, j] = img[9 + j, 18 - i]
    torch.testing.assert_close(crop[0, 0, 0, :], img[0, 0, 9:19, 18])  # first output row = input column 18
    # the official feature sampler multiplies the translation by 227/210
    t = 2 * 5 / 27
    crop = spatial_transform(img, rot_theta(t / OFFSET_FACTOR, 0.0, 0), size=(10, 10), offset_factor=OFFSET_FACTOR)
    torch.testing.assert_close(crop[0, 0], img[0, 0, 9:19, 14:24])


def test_spatial_transformer_matches_affine_grid_and_linear_fields():
    g = torch.Generator().manual_seed(0)
    theta = theta_from_params(torch.rand(5, 3, generator=g, dtype=torch.float64) - 0.5, scale=0.4)
    ref = F.affine_grid(theta, (5, 1, 7, 9), align_corners=True)
    torch.testing.assert_close(affine_grid(theta, size=(7, 9)), ref)
    # bilinear sampling of a linear coordinate field returns the mapped coordinates exactly
    field = einops.repeat(unit_grid(30, 30, dtype=torch.float64), "h w c -> n c h w", n=5)
    out = spatial_transform(field, theta, size=(7, 9), offset_factor=OFFSET_FACTOR)
    torch.testing.assert_close(einops.rearrange(out, "n c h w -> n h w c"),
                               affine_grid(theta, size=(7, 9), offset_factor=OFFSET_FACTOR))
    with pytest.raises(ValueError, match="theta has 2 transformations for 5 maps"):
        spatial_transform(field, theta[:2], size=(3, 3))


def test_theta_from_params_and_patch_sampler():
    th = theta_from_params(torch.tensor([[0.1, -0.2, math.pi / 6]]), scale=1 / 3)
    c, s = math.cos(math.pi / 6) / 3, math.sin(math.pi / 6) / 3
    torch.testing.assert_close(th, torch.tensor([[[c, -s, 0.1], [s, c, -0.2]]]))
    # motion only inside window (x=5, y=1) of the 7x7 windows: with top=1 and no jitter the centre is that window
    target = torch.zeros(3, 3, 90, 90)
    following = target.clone()
    following[:, :, 10 * 1 + 12: 10 * 1 + 18, 10 * 5 + 12: 10 * 5 + 18] = 1.0
    th = sample_patch_theta(target, following, top=1, jitter=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(th[:, :, 2], torch.tensor([[5 / 6 * 2 - 1, 1 / 6 * 2 - 1]] * 3) * (2 / 3))
    rot = torch.atan2(th[:, 1, 0], th[:, 0, 0])
    assert torch.all(rot.abs() <= math.pi / 4) and torch.allclose(th[:, 0, 0] ** 2 + th[:, 1, 0] ** 2,
                                                                   torch.full((3,), 1 / 9))
    many = sample_patch_theta(torch.zeros(400, 3, 90, 90), None, generator=torch.Generator().manual_seed(1))
    assert many[:, :, 2].abs().max() <= 2 / 3 + 1e-6 and many[:, :, 2].std() > 0.2


# ------------------------------------------------------------------------------------------------------ losses


def test_grid_loss_closed_forms():
    a = rot_theta(0.1, 0.2, 20)
    assert transformed_grid_loss(a, a).item() == 0.0
    b = rot_theta(0.1 + 0.3, 0.2 - 0.4, 20)  # pure translation difference: every point moves by (0.3, -0.4)
    assert transformed_grid_loss(b, a).item() == pytest.approx(0.3 ** 2 + 0.4 ** 2)
    # scale difference d: mean over the 20x20 grid of d^2 (x^2 + y^2) = 2 d^2 mean(linspace(-1, 1, 20)^2)
    d = 0.05
    c = a.clone()
    c[:, 0, 0] += d
    c[:, 1, 1] += d
    expect = 2 * d ** 2 * float((torch.linspace(-1, 1, 20, dtype=torch.float64) ** 2).mean())
    assert transformed_grid_loss(c, a).item() == pytest.approx(expect)


def dense_inlier_reference(affinity, theta, map_size, offset_factor, eps=1e-5):
    """The official construction: warp a one-hot (H*W, H, W) identity-match volume to the patch grid, normalise by
    sum(mask + eps), sum mask * affinity."""
    n, hw, h, w = affinity.shape
    H = W = map_size
    mask = torch.eye(hw, dtype=affinity.dtype).reshape(1, hw, H, W).expand(n, hw, H, W)
    grid = affine_grid(theta, size=(h, w), offset_factor=offset_factor)
    warped = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # n hw h w
    warped = warped / (warped + eps).sum(dim=(1, 2, 3), keepdim=True)
    return (warped * affinity).sum(dim=(1, 2, 3))


def test_inlier_score_equals_the_dense_mask_construction():
    g = torch.Generator().manual_seed(0)
    aff = torch.softmax(torch.randn(3, 36, 3, 3, generator=g, dtype=torch.float64) * 3, dim=1)
    theta = theta_from_params(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [0.9, 0.5, -0.7]],
                                           dtype=torch.float64), scale=0.5)  # the last one leaves the map
    got = inlier_score(aff, theta, map_size=(6, 6), offset_factor=OFFSET_FACTOR)
    torch.testing.assert_close(got, dense_inlier_reference(aff, theta, 6, OFFSET_FACTOR))
    # an affinity that puts all mass where theta sends every patch cell scores the maximum, 1 / (1 + eps * H * W)
    # (the official normaliser adds eps = 1e-5 to each of the H*W*h*w mask elements)
    theta = rot_theta(2 * 2 / 27, 0.0, 90)
    tgt = affine_grid(theta, size=(10, 10))  # points on whole cells of a 28x28 map
    cells = ((tgt + 1) / 2 * 27).round().long()
    idx = einops.rearrange(cells[..., 1] * 28 + cells[..., 0], "n h w -> n 1 h w")
    onehot = torch.zeros(1, 784, 10, 10, dtype=torch.float64).scatter_(1, idx, 1.0)
    top = 1 / (1 + 1e-5 * 784)
    assert inlier_score(onehot, theta, map_size=(28, 28), offset_factor=1.0).item() == pytest.approx(top, rel=1e-9)
    assert inlier_score(onehot, rot_theta(-0.3, 0.3, 0), map_size=(28, 28), offset_factor=1.0).item() < 0.05


# --------------------------------------------------------------------------------------------------- localiser


def test_learned_localiser_recovers_a_known_affine_on_synthetic_feature_maps():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    H, h, C = 21, 7, 32  # 21x21 frame map, 7x7 patch (scale 1/3): the official architecture at a smaller size
    loc = Localizer(map_cells=H * H, patch_size=(h, h))
    opt = torch.optim.Adam(loc.parameters(), lr=3e-3)

    def batch(n, gen):
        feats = F.normalize(F.avg_pool2d(torch.randn(n, C, H + 2, H + 2, generator=gen), 3, stride=1), dim=1)
        params = (torch.rand(n, 3, generator=gen) * 2 - 1) * torch.tensor([2 / 3, 2 / 3, math.pi / 4])
        theta = theta_from_params(params)
        patch = F.normalize(spatial_transform(feats, theta, size=(h, h), offset_factor=OFFSET_FACTOR), dim=1)
        return patch_affinity(patch, feats, temperature=512 ** -0.5), theta

    test_aff, test_theta = batch(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = transformed_grid_loss(loc(test_aff), test_theta).item()
    for _ in range(100):
        aff, theta = batch(32, g)
        loss = transformed_grid_loss(loc(aff), theta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = loc(test_aff)
        after = transformed_grid_loss(pred, test_theta).item()
    # the untrained localiser returns the centred unrotated patch; the trained one finds the patch to within a small
    # fraction of that error: mean corner error ~ a few percent of the frame
    assert after < 0.05 * before, (before, after)
    angle_err = torch.atan2(pred[:, 1, 0], pred[:, 0, 0]) - torch.atan2(test_theta[:, 1, 0], test_theta[:, 0, 0])
    assert angle_err.abs().median() < math.radians(10)


# ----------------------------------------------------------------------------------------------------- tracker


def one_hot_world(height, width):
    """Features that identify every cell of a ``height x width`` world: ``(height*width, height, width)``."""
    return torch.eye(height * width, dtype=torch.float64).reshape(height * width, height, width)


@pytest.mark.parametrize("offset_factor", [1.0, OFFSET_FACTOR])
def test_cycle_of_identity_video_returns_to_start_with_zero_loss(offset_factor):
    M, T, B = 28, 4, 2
    frame = one_hot_world(M, M)
    past = einops.repeat(frame, "c h w -> b t c h w", b=B, t=T).clone()
    target = einops.repeat(frame, "c h w -> b c h w", b=B).clone()
    theta_gt = torch.cat([rot_theta(2 * 3 / 27 / offset_factor, -2 * 2 / 27 / offset_factor, 0),
                          rot_theta(-2 * 4 / 27 / offset_factor, 2 * 1 / 27 / offset_factor, 90)])
    patch = spatial_transform(target, theta_gt, size=(10, 10), offset_factor=offset_factor)
    oracle = oracle_localizer(map_size=M, scale=1 / 3, offset_factor=offset_factor)
    common = dict(localizer=oracle, temperature=0.01, offset_factor=offset_factor)
    cycles = cycle_tracks(F.normalize(patch, dim=1), past, F.normalize(past, dim=1), F.normalize(target, dim=1),
                          **common)
    assert len(cycles) == T
    direct, aff = localise(einops.repeat(F.normalize(patch, dim=1), "b c h w -> (b t) c h w", t=T),
                           einops.rearrange(F.normalize(past, dim=1), "b t c h w -> (b t) c h w"),
                           localizer=oracle, temperature=0.01)
    crops = spatial_transform(einops.rearrange(past, "b t c h w -> (b t) c h w"), direct, size=(10, 10),
                              offset_factor=offset_factor)
    skip, _ = localise(F.normalize(crops, dim=1), einops.repeat(F.normalize(target, dim=1),
                                                                "b c h w -> (b t) c h w", t=T),
                       localizer=oracle, temperature=0.01)
    loss, logs = timecycle_loss(cycle_thetas=cycles, skip_thetas=einops.rearrange(skip, "(b t) i j -> b t i j", b=B),
                                theta_gt=theta_gt, affinity=aff, direct_thetas=direct, map_size=(M, M),
                                offset_factor=offset_factor)
    assert logs["theta_cycle"] < 1e-20 and logs["theta_skip"] < 1e-20
    assert logs["inlier"] == pytest.approx(1 / (1 + 1e-5 * M * M), rel=1e-6)  # all mass at the matched cells
    assert loss.item() == pytest.approx(-logs["inlier"], abs=1e-12)


def test_tracker_follows_a_translating_video_and_fails_on_a_scrambled_one():
    M, T = 28, 4
    shifts = [0, 2, 3, 5, 6]  # world offset (cells) of past frames 0..3 and the target
    world = one_hot_world(M, M + 8)
    frames = torch.stack([world[:, :, s: s + M] for s in shifts])[None]  # 1 5 C M M
    past, target = frames[:, :T], frames[:, T]
    theta_gt = rot_theta(0.0, 2 * 1 / 27, 0)
    patch = spatial_transform(target, theta_gt, size=(10, 10))
    oracle = oracle_localizer(map_size=M, scale=1 / 3, offset_factor=1.0)
    common = dict(localizer=oracle, temperature=0.01, offset_factor=1.0)
    thetas, _ = track(F.normalize(patch, dim=1), past, F.normalize(past, dim=1), order=[3, 2, 1, 0], **common)
    for t, th in zip([3, 2, 1, 0], thetas):  # content moves left as the world offset grows: x is larger earlier
        expect = rot_theta(2 * (shifts[T] - shifts[t]) / 27, 2 * 1 / 27, 0)
        torch.testing.assert_close(th, expect)
    cycles = cycle_tracks(F.normalize(patch, dim=1), past, F.normalize(past, dim=1), F.normalize(target, dim=1),
                          **common)
    assert max(transformed_grid_loss(c, theta_gt).item() for c in cycles) < 1e-20
    # scramble frame 2: every cycle that passes through it (c >= 2) no longer returns
    g = torch.Generator().manual_seed(0)
    scrambled = past.clone()
    scrambled[:, 2] = past[:, 2, torch.randperm(M * (M + 8), generator=g)]  # every cell gets another's code
    cycles = cycle_tracks(F.normalize(patch, dim=1), scrambled, F.normalize(scrambled, dim=1),
                          F.normalize(target, dim=1), **common)
    losses = [transformed_grid_loss(c, theta_gt).item() for c in cycles]
    assert losses[0] < 1e-20 and min(losses[1:]) > 1e-3


# ------------------------------------------------------------------------------------------------ the objective


def test_losses_fall_when_overfitting_one_clip():
    torch.manual_seed(0)
    model = TimeCycle(TinyEncoder(), feat_dim=32, num_past=2, target_index=3, frame_size=168, patch_size=56)
    clip = textured_clip(frames=5, size=168, shift=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    history = []
    for step in range(25):
        loss, logs = model({"video": clip}, generator=torch.Generator().manual_seed(7))  # the same patch each step
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(logs)
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] - 0.05
    assert last["theta_cycle"] < 0.5 * first["theta_cycle"] and last["theta_skip"] < 0.5 * first["theta_skip"]
    assert last["inlier"] > first["inlier"]
    for logs in (first, last):  # the logged terms are the ones the loss is made of (official weights)
        assert logs["theta_cycle"] == pytest.approx((logs["theta_cycle_1"] + logs["theta_cycle_2"]) / 2, rel=1e-5)
        assert logs["loss"] == pytest.approx(0.02 * logs["theta_cycle"] + 0.1 * logs["theta_skip"] - logs["inlier"],
                                             rel=1e-4, abs=1e-6)


def test_gradients_reach_the_resnet_encoder_and_shapes():
    torch.manual_seed(0)
    enc = build_encoder("resnet18", out_layer="layer3", padding_mode="zeros")
    model = TimeCycle(enc, num_past=2, target_index=2, frame_size=168, patch_size=56)
    assert model.localizer.map_cells == 21 * 21 and model.min_clip_len == 4
    video = torch.randn(2, 4, 3, 168, 168)
    loss, logs = model({"video": video}, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(logs["loss"])
    loss.backward()
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer3.1.conv2.weight"):
        grad = enc.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for p in list(model.head.parameters()) + list(model.localizer.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_published_sizes_and_bad_input():
    enc = build_encoder("resnet50", out_layer="layer3", padding_mode="zeros")
    model = TimeCycle(enc)
    assert model.head.conv.in_channels == 1024 and model.head.conv.out_channels == 512
    assert (model.map_size, model.patch_cells, model.localizer.map_cells) == (30, 10, 900)
    assert model.localizer.fc.in_features == 64 * 4 * 4 and model.min_clip_len == 10
    assert model.temperature == pytest.approx(512 ** -0.5) and model.scale == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="raise data.clip_len"):
        model({"video": torch.zeros(1, 6, 3, 240, 240)})
    with pytest.raises(ValueError, match="data.crop_size=240"):
        model({"video": torch.zeros(1, 10, 3, 256, 256)})
    with pytest.raises(ValueError, match="multiples of the encoder stride"):
        TimeCycle(enc, frame_size=250)
    with pytest.raises(ValueError, match="too small for two unpadded"):
        Localizer(map_cells=100, patch_size=(6, 6))


# -------------------------------------------------------------------------------- checkpoint -> vidssl propagate


class ClipLoader:
    """In-memory loader with the engine's interface: translating-texture clips."""

    def __init__(self, n=2, frames=4, size=168):
        self.clips = torch.cat([textured_clip(frames=frames, size=size, seed=i) for i in range(n)])
        self.epoch, self.skipped = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 1

    def __iter__(self):
        yield {"video": self.clips}


def test_checkpoint_round_trip_into_propagate(tmp_path, monkeypatch):
    from vidssl.cli import main
    from vidssl.engine import model_from_checkpoint, read_weights, resolve_run_config, train

    monkeypatch.setenv("VIDSSL_CACHE", str(tmp_path / "cache"))
    cfg = resolve_run_config(None, [
        "objectives.0.name=timecycle", "objectives.0.num_past=2", "objectives.0.target_index=2",
        "objectives.0.frame_size=168", "objectives.0.patch_size=56", "data.clip_len=4", "data.crop_size=168",
        "model.encoder=resnet18", "model.out_layer=layer3", "model.eval_layer=layer3", "model.padding_mode=zeros",
        "train.steps=1", "train.batch_size=2", "train.log_every=1", "optim.lr=2e-4", "optim.betas=[0.5, 0.999]",
        "optim.grad_clip=10"])
    summary = train(cfg, tmp_path / "run", loader=ClipLoader(), progress=False, echo=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    last = log[-1]
    assert last["step"] == 1
    assert last["timecycle/theta_cycle"] == pytest.approx(
        (last["timecycle/theta_cycle_1"] + last["timecycle/theta_cycle_2"]) / 2, rel=1e-5)
    terms = 0.02 * last["timecycle/theta_cycle"] + 0.1 * last["timecycle/theta_skip"] - last["timecycle/inlier"]
    assert last["timecycle/loss"] == pytest.approx(terms, rel=1e-4, abs=1e-6)
    # the checkpoint alone rebuilds encoder, head and localiser
    weights, _, step = read_weights(summary["checkpoint"])
    assert step == 1 and any(k.startswith("objectives.timecycle.localizer.") for k in weights)
    model, cfg2, _ = model_from_checkpoint(summary["checkpoint"])
    assert isinstance(model.objectives["timecycle"], TimeCycle) and model.encoder.padding_mode == "zeros"
    state = model.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(state[k], v)
    with torch.no_grad():  # the trained encoder differs from its initialisation
        torch.manual_seed(cfg.train.seed)
        init = build_encoder("resnet18", out_layer="layer3", padding_mode="zeros")
        assert not torch.equal(init.conv1.weight, model.encoder.conv1.weight)
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--videos", "1", "--val-videos", "1", "--frames", "4",
                 "--size", "48", "64"]) == 0
    out = tmp_path / "prop"
    assert main(["propagate", "--checkpoint", str(tmp_path / "run"), "--davis-root", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extra_info"]["source"] == "checkpoint" and metrics["hyperparameters"]["layer"] == "layer3"
    g = metrics["global"]
    assert g["J-Mean"] == pytest.approx(rescored_j_mean(root, out, ["synth-val-0000"]), abs=1e-6)
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2, abs=1e-6)
    assert sorted(p.name for p in (out / "synth-val-0000").glob("*.png")) == [f"0000{i}.png" for i in range(4)]
