"""VIVI (issue #13): shot-structured data, the batch-hard triplet and InfoNCE forms of L_S, shot order / embedding
prediction, attention pooling, co-training with an image stream, the checkpoint into propagate / probe, bad input."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidssl.config import ConfigError
from vidssl.data.datasets import ClipDataset
from vidssl.data.images import scan_image_folder
from vidssl.data.manifest import ManifestError, VideoEntry, load_manifest, write_manifest
from vidssl.data.streams import stream_drawn
from vidssl.data.transforms import BatchClipAugment, ClipTransform
from vidssl.losses.triplet import BatchHardTripletLoss, batch_hard_triplet
from vidssl.models.vivi import VIVI, ShotPooling, order_labels, permute_shots

from test_contract import _image_folder
from tiny_encoder import TinyEncoder

REPO = Path(__file__).resolve().parents[1]
STEP = 4  # pixel value = STEP * frame index (index-coded frames)


def _indexed_folder(path: Path, n: int, size=(24, 32)) -> Path:
    """A frame folder whose frame i is the flat grey value STEP * i (lossless PNG)."""
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), STEP * i, np.uint8)).save(path / f"{i:05d}.png")
    return path


def _decoded_indices(frames: torch.Tensor) -> list[int]:
    """Frame indices read back from index-coded ``uint8 (T, 3, H, W)`` frames."""
    return [round(float(f.float().mean()) / STEP) for f in frames]


def _entry(path: Path, n: int, shots, fps=None, kind="frames") -> VideoEntry:
    return VideoEntry(name=path.stem, path=str(path), kind=kind, num_frames=n, fps=fps, shots=shots)


# ------------------------------------------------------------------------------------------------------------ data

def test_shot_items_are_k_shots_of_l_frames_from_consecutive_shots(tmp_path):
    shots = [(0, 10), (10, 14), (14, 30), (30, 31), (31, 50)]
    e = _entry(_indexed_folder(tmp_path / "v", 50), 50, shots)
    ds = ClipDataset([e], clip_len=3, stride=2, sampler="shots", num_shots=2, clips_per_video=12,
                     shot_policy="skip", min_shot_len=2)
    assert ds.shot_skipped == {"shots": 2, "videos": 0}  # (30, 31): 1 frame; (10, 14): 2 frames at step 2 < L
    kept = ds.entries[0].shots
    assert kept == [(0, 10), (14, 30), (31, 50)]
    seen_pairs = set()
    for i in range(len(ds)):
        item = ds[i]
        got = _decoded_indices(item["video"])
        assert got == item["frames"].tolist() and len(got) == 6  # K * L frames, decoded = requested
        groups = [got[:3], got[3:]]
        ranges = [tuple(r) for r in item["shots"].tolist()]
        assert item["shot_ids"].tolist() == [0, 0, 0, 1, 1, 1]
        for g, (a, b) in zip(groups, ranges):
            assert all(a <= x < b for x in g) and g == sorted(set(g))  # distinct, sorted, inside their shot
            assert all((x - a) % 2 == 0 for x in g)  # on the stride-2 grid of the shot
        pair = (kept.index(ranges[0]), kept.index(ranges[1]))
        assert pair[1] == pair[0] + 1  # consecutive among the usable shots
        seen_pairs.add(pair)
    assert len(seen_pairs) >= 2


def test_shot_fps_sets_the_frame_step_of_an_encoded_video(tmp_path):
    from vidssl.io.writer import write_video

    n = 60
    frames = np.stack([np.full((32, 32, 3), STEP * i, np.uint8) for i in range(n)])
    path = write_video(tmp_path / "v.mp4", frames, fps=25, lossless=True)
    e = _entry(path, n, [(0, 20), (20, 60)], fps=25.0, kind="video")
    ds = ClipDataset([e], clip_len=4, sampler="shots", num_shots=2, shot_fps=5.0, clips_per_video=3,
                     shot_policy="error")
    assert ds.shot_step(e) == 5
    for i in range(len(ds)):
        item = ds[i]
        got = _decoded_indices(item["video"])
        assert got == item["frames"].tolist()
        assert all(x % 5 == 0 for x in got) and all(x < 20 for x in got[:4]) and all(x >= 20 for x in got[4:])


def test_per_frame_jitter_draws_flip_and_jitter_per_frame_and_both_paths_agree():
    t = ClipTransform(crop_size=16, flip=0.5, color_jitter=0.4, per_frame_jitter=True, mean=None, std=None)
    video = torch.randint(0, 255, (6, 3, 20, 20), dtype=torch.uint8)
    p = t.sample_params(6, 20, 20, generator=torch.Generator().manual_seed(3))
    assert len(set(p.brightness)) == 6 and len(p.flip) == 6 and len(set(p.flip)) == 2
    cpu = t.apply(video, p)
    gpu = BatchClipAugment(**t.spec())(video[None], [p])[0]
    assert (cpu - gpu).abs().mean() < 0.03
    shared = ClipTransform(crop_size=16, flip=0.5, color_jitter=0.4, mean=None, std=None)
    q = shared.sample_params(6, 20, 20, generator=torch.Generator().manual_seed(3))
    assert isinstance(q.brightness, float) and isinstance(q.flip, bool)


# --------------------------------------------------------------------------------------------------------- L_S

def _triplet_loop(x, y, margin, metric, soft=False, ignore=None):
    """Batch-hard triplet by loops; ``ignore[a][j]`` true: ``j`` is neither a positive nor a negative of ``a``;
    ``soft``: ``softplus(d_p - d_n)`` instead of the hinge."""
    total, count = 0.0, 0
    for a in range(len(x)):
        keep = [j for j in range(len(x)) if ignore is None or not bool(ignore[a][j])]
        pos = [j for j in keep if j != a and y[j] == y[a]]
        neg = [j for j in keep if y[j] != y[a]]
        if not pos or not neg:
            continue

        def d(i, j):
            if metric == "cosine":
                return 1 - float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0))
            sq = float(((x[i] - x[j]) ** 2).sum())
            return sq if metric == "sqeuclidean" else math.sqrt(sq)
        gap = max(d(a, p) for p in pos) - min(d(a, n) for n in neg)
        total += math.log1p(math.exp(gap)) if soft else max(0.0, margin + gap)
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_batch_hard_triplet_matches_a_loop(metric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 5])  # 4 and 5: no positive -> left out
    loss, m = batch_hard_triplet(x, y, margin=0.7, metric=metric)
    assert loss.item() == pytest.approx(_triplet_loop(x, y, 0.7, metric), rel=1e-5, abs=1e-6)
    assert m.valid.tolist() == [True] * 11 + [False] * 2


def test_batch_hard_triplet_closed_form_and_gradients():
    # points on a line: shot 0 at 0 and 1, shot 1 at 3 and 5; anchor 0: hardest pos 1, hardest neg 3
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss, m = batch_hard_triplet(x, y, margin=1.0)
    # anchors: 0 -> [1 + 1 - 3]+ = 0; 1 -> [1 + 1 - 2]+ = 0; 2 -> [1 + 2 - 2]+ = 1; 3 -> [1 + 2 - 4]+ = 0
    assert loss.item() == pytest.approx(0.25, abs=1e-5)
    assert m.pos_index.tolist() == [1, 0, 3, 2] and m.neg_index.tolist() == [2, 2, 1, 1]
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    none, _ = batch_hard_triplet(torch.randn(3, 2, requires_grad=True), torch.tensor([0, 1, 2]))
    assert none.item() == 0.0  # no anchor with a positive


def test_infonce_form_matches_a_loop(one_thread):
    torch.manual_seed(0)
    m = VIVI(TinyEncoder(), num_shots=2, frames_per_shot=3, shot_loss="infonce", video_loss="none",
             temperature=0.2)
    h = torch.randn(12, 16)
    ids = torch.arange(4).repeat_interleave(3)
    loss, logs = m._shot_level(h, ids, None)
    z = torch.nn.functional.normalize(m.proj(h), dim=-1).detach().double()
    s = z @ z.T / 0.2
    ref = 0.0
    for i in range(12):
        others = [j for j in range(12) if j != i]
        pos = [j for j in others if ids[j] == ids[i]]
        ref += -math.log(sum(math.exp(s[i, j]) for j in pos) / sum(math.exp(s[i, j]) for j in others))
    assert loss.item() == pytest.approx(ref / 12, rel=1e-5)
    assert logs["num_candidates"] == 11
    # closed form: identical embeddings -> every candidate equal -> loss = log(11 / 2)
    same, _ = m._shot_level(torch.zeros(12, 16), ids, None)
    assert same.item() == pytest.approx(math.log(11 / 2), rel=1e-5)


# --------------------------------------------------------------------------------------------------------- L_V

def test_order_labels_are_balanced_and_permutations_apply():
    for b, c in [(8, 2), (12, 6), (24, 24)]:
        labels = order_labels(b, c, torch.Generator().manual_seed(1))
        assert torch.bincount(labels, minlength=c).tolist() == [b // c] * c
    assert order_labels(8, 2, torch.Generator().manual_seed(1)).tolist() != \
        order_labels(8, 2, torch.Generator().manual_seed(2)).tolist()
    e = torch.arange(3.0).view(1, 3, 1).repeat(2, 1, 1)  # (2, K=3, 1): shots 0, 1, 2
    perms = torch.tensor([[0, 1, 2], [2, 1, 0]])
    assert permute_shots(e, torch.tensor([0, 1]), perms)[:, :, 0].tolist() == [[0, 1, 2], [2, 1, 0]]


def _ordered_clips(b, k=3, l=2, size=16, seed=0):
    """``(B, K*L, 3, S, S)`` videos whose shots get brighter over time (a learnable order), noise per frame."""
    g = torch.Generator().manual_seed(seed)
    level = torch.linspace(-1, 1, k).repeat_interleave(l)  # (K*L,)
    offset = torch.rand(b, 1, generator=g) * 0.5  # (B, 1) per-video brightness
    base = (level[None, :] + offset)[:, :, None, None, None]  # (B, K*L, 1, 1, 1)
    return base + 0.1 * torch.randn(b, k * l, 3, size, size, generator=g)


@pytest.mark.parametrize("head", ["mlp", "lstm"])
def test_overfitted_order_head_predicts_a_reversed_sequence_reversed(head, one_thread):
    torch.manual_seed(0)
    m = VIVI(TinyEncoder(8), num_shots=3, frames_per_shot=2, shot_loss="infonce", video_loss="order",
             order_head=head, shot_dim=16, hidden=32, proj_dim=8, proj_hidden=16, video_weight=1.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(60):
        loss, logs = m({"video": _ordered_clips(8, seed=step)}, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        x = _ordered_clips(8, seed=999)
        h = m.frame_features(x.flatten(0, 1)).view(8, 6, -1)
        e, _ = m.shot_embeddings(h)
        fwd = m.order_logits(e).argmax(1)
        rev = m.order_logits(e.flip(1)).argmax(1)
    assert fwd.tolist() == [0] * 8 and rev.tolist() == [1] * 8


def test_permutation_and_prediction_losses_start_near_chance(one_thread):
    torch.manual_seed(0)
    video = torch.randn(4, 6, 3, 16, 16)
    perm = VIVI(TinyEncoder(), num_shots=3, frames_per_shot=2, video_loss="permutation")
    _, logs = perm({"video": video}, torch.Generator().manual_seed(0))
    assert perm.perms.shape == (6, 3) and logs["video/chance"] == pytest.approx(1 / 6)
    assert abs(logs["video/loss"] - math.log(6)) < 0.3
    sep = VIVI(TinyEncoder(), num_shots=3, frames_per_shot=2, video_loss="prediction",
               sep_same_video_negatives=False)
    _, logs = sep({"video": video}, torch.Generator().manual_seed(0))
    assert logs["video/num_candidates"] == 4 * 3 - 2  # the other videos' shots + the positive
    # items 0 and 1 read one source video: each other's shots are not negatives either (shots by their first frame)
    shots = torch.tensor([[0, 4], [4, 8], [8, 12]]).expand(4, 3, 2)  # (B, K, 2)
    same = {"video": video, "video_index": torch.tensor([5, 5, 6, 7]), "shots": shots}
    _, logs = sep(same, torch.Generator().manual_seed(0))
    per_row = [6 + 1] * 2 * 2 + [9 + 1] * 2 * 2  # 2 rows per item; items 0, 1: the shots of items 2, 3; items 2, 3:
    # the shots of the other three items (each + its positive); without video_index it would be 10 on every row
    assert logs["video/num_candidates"] == pytest.approx(math.prod(per_row) ** (1 / len(per_row)))
    with pytest.raises(ValueError, match="num_shots"):
        VIVI(TinyEncoder(), num_shots=6, frames_per_shot=2, video_loss="permutation")


def test_attention_pooling_weights_sum_to_one_and_mean_pooling_is_the_mean():
    u = torch.randn(3, 4, 5, 8)
    e, alpha = ShotPooling(8, "attention", 6)(u)
    assert torch.allclose(alpha.sum(-1), torch.ones(3, 4)) and (alpha > 0).all()
    assert torch.allclose(e, (alpha[..., None] * u).sum(2), atol=1e-6)
    assert not torch.allclose(alpha, torch.full_like(alpha, 0.2))
    e_mean, a_mean = ShotPooling(8, "mean")(u)
    assert torch.allclose(e_mean, u.mean(2), atol=1e-6) and torch.allclose(a_mean.sum(-1), torch.ones(3, 4))


def test_rotation_variant_rotates_frames_with_balanced_labels(one_thread):
    enc = TinyEncoder()
    m = VIVI(enc, num_shots=2, frames_per_shot=2, shot_loss="rotation", video_loss="order")
    video = torch.arange(16.0).view(1, 1, 1, 4, 4).repeat(2, 4, 3, 1, 1)  # (B=2, 4 frames)
    loss, logs = m({"video": video}, torch.Generator().manual_seed(0))
    seen = enc.seen[0][:, 0]  # (8, 4, 4) frames as the encoder saw them
    ks = [next(r for r in range(4) if torch.equal(torch.rot90(video[0, 0, 0], r), f)) for f in seen]
    assert sorted(ks) == [0, 0, 1, 1, 2, 2, 3, 3]  # each rotation twice among 8 frames
    assert "shot/rot_acc" in logs and math.isfinite(loss.item())


# ------------------------------------------------------------------------------------------- engine, CLI, input

def _shot_manifest(tmp_path: Path, n_videos=3, n=24) -> Path:
    entries = [_entry(_indexed_folder(tmp_path / f"v{i}", n), n, [(0, 8), (8, 16), (16, 24)])
               for i in range(n_videos)]
    path = tmp_path / "shots.jsonl"
    write_manifest(path, entries)
    return path


def _cfg(manifest: Path, images: Path | None, steps: int, extra=()):
    from vidssl.engine import resolve_run_config

    sets = [f"data.source=manifest", f"data.manifest={manifest}", "data.sampler=shots", "data.num_shots=2",
            "data.clip_len=2", "data.crop_size=32", "data.clips_per_video=2", "data.per_frame_jitter=true",
            "model.encoder=resnet18", "model.out_layer=layer2", "model.eval_layer=layer2",
            "objectives=[{name: vivi, proj_hidden: 32, hidden: 32, shot_dim: 16}]", f"train.steps={steps}",
            "train.batch_size=2", "train.log_every=1", f"train.ckpt_every={steps}", "train.threads=1",
            "train.device=cpu", "optim.lr=0.001", "eval.enabled=false"]
    if images is not None:
        sets += [f"streams={{images: {{batch_size: 3, weight: 0.5, data: {{source: images, root: {images}, "
                 "crop_size: 32}}}",
                 "objectives=[{name: vivi, proj_hidden: 32, hidden: 32, shot_dim: 16, image_stream: images, "
                 "sup_weight: 0.5}]"]
    return resolve_run_config(None, sets + list(extra))


def test_cotraining_mixes_image_batches_at_the_stream_ratio(tmp_path):
    from vidssl.engine import train

    images = _image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=4)
    cfg = _cfg(_shot_manifest(tmp_path), images, steps=8)
    train(cfg, tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    drawn = 0
    for r in log:
        assert r["vivi/video/chance"] == 0.5
        if stream_drawn(0, "images", r["step"] - 1, 0.5):
            drawn += 1
            assert r["vivi/sup/items"] == 3 and r["vivi/main_frames"] == 2 * 2 * 2  # 3 images : 8 video frames
        else:
            assert "vivi/sup/loss" not in r
    assert 0 < drawn < 8


@pytest.mark.slow
def test_checkpoint_goes_into_propagate_and_probe(tmp_path):
    from vidssl.engine import encoder_from_checkpoint, train

    cfg = _cfg(_shot_manifest(tmp_path), None, steps=2)
    train(cfg, tmp_path / "run")
    enc, model_cfg, stored, step = encoder_from_checkpoint(tmp_path / "run")
    assert step == 2 and stored["objectives"][0]["name"] == "vivi" and model_cfg.out_layer == "layer2"
    davis = tmp_path / "davis"
    subprocess.run([sys.executable, "-m", "vidssl", "data", "synth", "--out", str(davis), "--format", "davis",
                    "--videos", "1", "--val-videos", "1", "--frames", "5", "--size", "48", "48"], check=True,
                   capture_output=True, cwd=tmp_path)
    res = subprocess.run([sys.executable, "-m", "vidssl", "propagate", "--checkpoint", str(tmp_path / "run"),
                          "--davis-root", str(davis), "--split", "val", "--out", str(tmp_path / "prop"),
                          "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "J&F" in json.dumps(json.loads((tmp_path / "prop" / "metrics.json").read_text()))
    res = subprocess.run([sys.executable, "-m", "vidssl", "probe", "--checkpoint", str(tmp_path / "run"),
                          "--images", str(_image_folder(tmp_path / "pimg", per_class=6)), "--protocols", "knn",
                          "--size", "32", "--out", str(tmp_path / "probe"), "--no-progress"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "probe" / "probe.json").is_file()


def test_bad_shot_input_is_skipped_and_counted_or_named(tmp_path):
    one = _entry(_indexed_folder(tmp_path / "one", 20), 20, None)  # no shots: one shot
    short = _entry(_indexed_folder(tmp_path / "short", 20), 20, [(0, 10), (10, 12), (12, 20)])
    few = _entry(_indexed_folder(tmp_path / "few", 20), 20, [(0, 10), (10, 20)])
    good = _entry(_indexed_folder(tmp_path / "good", 30), 30, [(0, 10), (10, 20), (20, 30)])
    ds = ClipDataset([one, short, few, good], clip_len=3, sampler="shots", num_shots=3, shot_policy="skip")
    assert [e.name for e in ds.entries] == ["good"]
    assert ds.shot_skipped == {"shots": 1, "videos": 3}
    with pytest.raises(ValueError, match=r"short.*\[10, 12\) has 2 frames"):
        ClipDataset([short], clip_len=3, sampler="shots", num_shots=2, shot_policy="error")
    with pytest.raises(ValueError, match=r"few: 2 shot\(s\), data.num_shots=3"):
        ClipDataset([few], clip_len=3, sampler="shots", num_shots=3, shot_policy="error")
    with pytest.raises(ValueError, match=r"no video has 3 shot"):
        ClipDataset([one], clip_len=3, sampler="shots", num_shots=3, shot_policy="skip")
    past = _entry(Path(good.path), 30, [(0, 10), (10, 35)])
    with pytest.raises(ValueError, match=r"good: shot \[10, 35\) .* outside the video's 30 frames"):
        ClipDataset([past], clip_len=3, sampler="shots", num_shots=2)
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({**good.to_dict(), "shots": [[0, 10], [10, 35]]}) + "\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: shot \[10, 35\)"):
        load_manifest(bad_manifest)
    _image_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"imgs/empty: empty class folder"):
        scan_image_folder(tmp_path / "imgs")


def test_recipes_resolve_and_the_data_contract_is_checked(tmp_path):
    from vidssl.engine import resolve_run_config

    for name in ("vivi_sample", "vivi_youtube8m"):
        cfg = resolve_run_config(REPO / "configs" / f"{name}.yaml", [])
        assert cfg.objectives[0].name == "vivi" and cfg.data.sampler == "shots"
    with pytest.raises(ConfigError, match="sampler"):
        resolve_run_config(REPO / "configs" / "vivi_sample.yaml", ["data.sampler=random"])
    with pytest.raises(ConfigError, match="num_shots"):
        resolve_run_config(REPO / "configs" / "vivi_sample.yaml", ["data.num_shots=1"])
    with pytest.raises(ConfigError, match="margin"):
        resolve_run_config(REPO / "configs" / "vivi_sample.yaml", ["objectives=[{name: vivi, margin: -1}]"])


# ---------------------------------------------------------------------- L_S: ignore mask, shot labels, negatives

@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_batch_hard_triplet_with_an_ignore_mask_matches_a_loop(metric, soft):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4])
    ignore = torch.rand(12, 12, generator=g) < 0.3
    ignore[10] = True  # anchor 10 (label 4): its positive 11 kept, every negative ignored -> left out of the mean
    ignore[10, 11] = False
    loss, m = batch_hard_triplet(x, y, margin=0.7, metric=metric, soft=soft, ignore=ignore)
    ref = _triplet_loop(x, y, 0.7, metric, soft=soft, ignore=ignore)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert abs(ref - _triplet_loop(x, y, 0.7, metric, soft=soft)) > 1e-3  # the mask changes the loss
    keep = [[not bool(ignore[a, j]) for j in range(12)] for a in range(12)]
    valid = [any(keep[a][j] and j != a and y[j] == y[a] for j in range(12))
             and any(keep[a][j] and y[j] != y[a] for j in range(12)) for a in range(12)]
    assert m.valid.tolist() == valid and not valid[10] and sum(valid) >= 6
    rows = torch.nonzero(m.valid).flatten()
    assert not ignore[rows, m.pos_index[rows]].any() and not ignore[rows, m.neg_index[rows]].any()


def test_batch_hard_triplet_ignore_is_checked_and_the_logs_honour_it():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for bad in (torch.zeros(3, 4, dtype=torch.bool), torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="ignore"):
            batch_hard_triplet(x, y, ignore=bad)
    # points on a line: shot 0 at 0 and 1, shot 1 at 1.3 and 10; d_p - d_n per anchor = -0.3, 0.7, 8.4, -0.3;
    # ignoring the pair (1, 2): -0.3, -8, 7.4, -0.3
    x = torch.tensor([[0.0], [1.0], [1.3], [10.0]])
    ignore = torch.zeros(4, 4, dtype=torch.bool)
    ignore[1, 2] = ignore[2, 1] = True
    expected = {  # (soft, ignore?) -> (active, top1): soft counts d_p > d_n, the hinge d_p + 0.5 > d_n
        (False, False): (1.0, 0.5), (True, False): (0.5, 0.5), (False, True): (0.75, 0.75), (True, True): (0.25, 0.75)}
    for (soft, masked), (active, top1) in expected.items():
        loss, logs = BatchHardTripletLoss(0.5, "euclidean", soft=soft)(x, y, ignore if masked else None)
        assert logs["active"] == pytest.approx(active) and logs["top1"] == pytest.approx(top1), (soft, masked)
        assert logs["valid"] == 1.0
        assert loss.item() == pytest.approx(_triplet_loop(x, y, 0.5, "euclidean", soft=soft,
                                                          ignore=ignore if masked else None), rel=1e-5)


def test_batch_hard_triplet_logs_say_when_no_anchor_has_a_negative():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    ignore = torch.ones(4, 4, dtype=torch.bool)  # every pair ignored: no positive, no negative
    loss, logs = BatchHardTripletLoss(0.5)(x, y, ignore)
    assert loss.item() == 0.0 and logs["valid"] == 0.0
    ignore = y[:, None] != y[None, :]  # negatives ignored, positives kept: still no valid anchor
    assert BatchHardTripletLoss(0.5)(x, y, ignore)[1]["valid"] == 0.0
    loss, logs = BatchHardTripletLoss(0.5)(x, torch.tensor([0, 0, 0, 1]))  # anchor 3 has no positive
    assert logs["valid"] == 0.75


# a batch of 3 items of K=2 shots of L=2 frames; items 0 and 2 are clips of one video (index 5) that both drew the
# shot starting at frame 8
_DUP_VIDEOS = [5, 7, 5]
_DUP_SHOTS = [[[0, 8], [8, 16]], [[0, 8], [8, 16]], [[8, 16], [16, 24]]]
_DUP_KEYS = [(v, rng[k][0]) for v, rng in zip(_DUP_VIDEOS, _DUP_SHOTS) for k in (0, 0, 1, 1)]  # per frame


def _dup_batch() -> dict:
    return {"video_index": torch.tensor(_DUP_VIDEOS), "shots": torch.tensor(_DUP_SHOTS),
            "shot_ids": torch.tensor([[0, 0, 1, 1]] * 3)}


def _partition(labels) -> list[list[bool]]:
    labels = list(labels)
    return [[a == b for b in labels] for a in labels]


def test_batch_shot_ids_give_a_shot_drawn_twice_one_label():
    m = VIVI(TinyEncoder(), num_shots=2, frames_per_shot=2, shot_loss="infonce", video_loss="none")
    batch = _dup_batch()
    shot, video = m._batch_shot_ids(batch, batch["shot_ids"])
    assert shot.shape == video.shape == (12,)
    assert shot[2] == shot[3] == shot[8] == shot[9] and video[2] == video[8]  # item 0 shot 1 = item 2 shot 0
    assert shot[0] != shot[4] and video[0] != video[4]  # same first frame, another video
    assert _partition(shot.tolist()) == _partition(_DUP_KEYS) and len(set(shot.tolist())) == 5
    assert _partition(video.tolist()) == _partition(k[0] for k in _DUP_KEYS)
    # without video_index (or shots): every item is its own video, a shot is (item, local id) -- as before
    items = [(b, k) for b in range(3) for k in (0, 0, 1, 1)]
    for partial in ({}, {"shots": batch["shots"]}, {"video_index": batch["video_index"]}):
        shot, video = m._batch_shot_ids(partial, batch["shot_ids"])
        assert _partition(shot.tolist()) == _partition(items) and shot[2] != shot[8]
        assert _partition(video.tolist()) == _partition(b for b, _ in items)


def test_other_videos_infonce_drops_same_video_other_shots_from_the_candidates(one_thread):
    torch.manual_seed(0)
    kw = dict(num_shots=2, frames_per_shot=2, shot_loss="infonce", video_loss="none", temperature=0.2,
              proj_dim=8, proj_hidden=16)
    m = VIVI(TinyEncoder(), shot_negatives="other_videos", **kw).eval()
    m_all = VIVI(TinyEncoder(), shot_negatives="all", **kw).eval()
    m_all.load_state_dict(m.state_dict())
    video = torch.randn(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    batch = {"video": video, **_dup_batch()}
    loss, logs = m(batch)
    loss_all, _ = m_all(batch)
    with torch.no_grad():
        z = torch.nn.functional.normalize(m.proj(m.frame_features(video.flatten(0, 1))), dim=-1).double()
    s = z @ z.T / 0.2
    refs = {}
    for mode in ("other_videos", "all"):
        ref = 0.0
        for i, ki in enumerate(_DUP_KEYS):
            cand = [j for j, kj in enumerate(_DUP_KEYS) if j != i and not (
                mode == "other_videos" and kj[0] == ki[0] and kj != ki)]
            pos = [j for j in cand if _DUP_KEYS[j] == ki]
            ref += -math.log(sum(math.exp(s[i, j]) for j in pos) / sum(math.exp(s[i, j]) for j in cand))
        refs[mode] = ref / 12
    assert loss.item() == pytest.approx(refs["other_videos"], rel=1e-5)
    assert loss_all.item() == pytest.approx(refs["all"], rel=1e-5)
    assert abs(refs["all"] - refs["other_videos"]) > 1e-3
    # candidates per row: 5 (video 5, shots at 0 and 16), 7 (video 5, shot at 8), 9 (video 7): the geometric mean
    assert logs["shot/num_candidates"] == pytest.approx((5 ** 4 * 7 ** 4 * 9 ** 4) ** (1 / 12), rel=1e-4)


def _spy_triplet(m: VIVI) -> dict:
    """Records what ``m`` hands its triplet loss (embeddings, labels, ignore)."""
    seen, forward = {}, m.triplet.forward

    def spy(embeddings, labels, ignore=None):
        seen.update(embeddings=embeddings.detach(), labels=labels, ignore=ignore)
        return forward(embeddings, labels, ignore)
    m.triplet.forward = spy
    return seen


@pytest.mark.parametrize("mode", ["all", "other_videos"])
def test_triplet_hardest_negative_with_and_without_same_video_shots(mode):
    # unit vectors at these angles (degrees); video 0 = shots 0 and 1, video 1 = shots 2 and 3: the nearest other
    # shot of every video-0 frame is the other shot of video 0
    deg = torch.tensor([0.0, 10, 20, 30, 120, 130, 240, 250]) * math.pi / 180
    h = torch.stack([deg.cos(), deg.sin(), torch.zeros(8)], dim=1)  # (8, 3)
    shot_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    video_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    m = VIVI(TinyEncoder(), num_shots=2, frames_per_shot=2, shot_loss="triplet", video_loss="none", margin=0.3,
             shot_negatives=mode)
    m.proj = torch.nn.Identity()  # embeddings = the unit vectors themselves
    seen = _spy_triplet(m)
    loss, _ = m._shot_level(h, shot_ids, None, video_ids)
    _, mining = batch_hard_triplet(seen["embeddings"], seen["labels"], margin=0.3, ignore=seen["ignore"])
    assert mining.valid.all()
    if mode == "all":
        assert seen["ignore"] is None or not seen["ignore"].any()
        assert mining.neg_index.tolist() == [2, 2, 1, 1, 3, 3, 5, 0]  # nearest angle of another shot
        assert (video_ids[mining.neg_index[:4]] == 0).all()  # same-video other shots mined
        ref = _triplet_loop(h, shot_ids.tolist(), 0.3, "euclidean")
    else:
        assert mining.neg_index.tolist() == [7, 4, 4, 4, 3, 3, 0, 0]  # nearest angle of the other video
        assert (video_ids[mining.neg_index] != video_ids).all()
        ignore = [[bool(video_ids[a] == video_ids[j] and shot_ids[a] != shot_ids[j]) for j in range(8)]
                  for a in range(8)]
        ref = _triplet_loop(h, shot_ids.tolist(), 0.3, "euclidean", ignore=ignore)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_shot_negatives_and_soft_margin_validate_and_resolve_from_the_config():
    from vidssl.config import from_dict
    from vidssl.engine import resolve_run_config
    from vidssl.models.objective import BuildContext
    from vidssl.models.vivi import VIVIParams

    with pytest.raises(ValueError, match="shot_negatives"):
        VIVI(TinyEncoder(), num_shots=2, frames_per_shot=2, shot_negatives="same_video")
    recipe = REPO / "configs" / "vivi_sample.yaml"
    with pytest.raises(ConfigError, match="shot_negatives"):
        resolve_run_config(recipe, ["objectives=[{name: vivi, shot_negatives: nope}]"])
    cfg = resolve_run_config(recipe, ["objectives=[{name: vivi, shot_negatives: other_videos, soft_margin: true, "
                                      "proj_hidden: 16, proj_dim: 8, hidden: 16, shot_dim: 8}]"])
    params = from_dict(VIVIParams, cfg.objectives[0].params, prefix="objectives.0")
    assert params.shot_negatives == "other_videos" and params.soft_margin is True
    m = VIVI.from_params(TinyEncoder(), params, BuildContext(data=cfg.data))
    assert m.shot_negatives == "other_videos" and m.triplet.soft
    default = VIVI.from_params(TinyEncoder(), from_dict(VIVIParams, {}, prefix="o"), BuildContext(data=cfg.data))
    assert default.shot_negatives == "all" and not default.triplet.soft


def test_soft_margin_other_videos_step_trains_the_encoder(one_thread):
    torch.manual_seed(0)
    m = VIVI(TinyEncoder(), num_shots=2, frames_per_shot=2, shot_loss="triplet", video_loss="none",
             soft_margin=True, shot_negatives="other_videos", proj_dim=8, proj_hidden=16)
    before = [p.detach().clone() for p in m.encoder.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    video = torch.randn(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    loss, logs = m({"video": video, **_dup_batch()})
    assert math.isfinite(loss.item()) and loss.item() > 0 and logs["shot/loss"] == pytest.approx(loss.item())
    opt.zero_grad()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.encoder.parameters() if p.grad is not None)
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, m.encoder.parameters())]
    assert changed[0] and sum(changed) >= len(changed) // 2
