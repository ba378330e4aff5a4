"""Frozen-feature probes (vidssl probe): protocol functions against loops and planted signals, inputs, the report."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidssl.cli import main
from vidssl.data import labelled
from vidssl.evaluation import probe


# ------------------------------------------------------------------------------------------------ linear probe
def _planted(n, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)  # n d
    w = torch.randn(d, k, generator=g)  # d k
    return x, (x @ w).argmax(1)  # n d, n


def test_linear_probe_recovers_a_planted_linear_signal(one_thread):
    x, y = _planted(400)
    r = probe.linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=(1e-4, 1e-2, 1.0))
    assert r["top1"] > 0.9 and r["num_classes"] == 3
    assert [row["l2"] for row in r["sweep"]] == [1e-4, 1e-2, 1.0] and r["l2"] in (1e-4, 1e-2, 1.0)
    assert r["num_fit"] + r["num_heldout"] == 200


def test_linear_probe_scores_chance_on_noise_labels(one_thread):
    x, _ = _planted(600)
    y = torch.randint(0, 3, (600,), generator=torch.Generator().manual_seed(1))
    r = probe.linear_probe(x[:300], y[:300], x[300:], y[300:], l2_grid=(1e-4, 1e-2, 1.0))
    assert abs(r["top1"] - 1 / 3) < 0.1


def test_holdout_split_keeps_videos_together_and_falls_back_to_last_items():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    groups = ["a", "a", "b", "b", "c", "c", "c", "c", "c"]
    fit, held = probe.holdout_split(y, groups, 0.2)
    assert set(held.tolist()) == {2, 3, 8}  # class 0: its last video b; class 1 (one video): its last item
    assert {groups[i] for i in fit} & {groups[i] for i in held if y[i] == 0} == set()


def test_protocols_reject_bad_features_and_labels_naming_the_argument():
    x, y = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="too small"):
        probe.linear_probe(x[2:4], y[2:4], x, y)
    with pytest.raises(ValueError, match="train_y: expected non-negative integer"):
        probe.knn_classify(x, y.float(), x, y)
    with pytest.raises(ValueError, match="num_classes: 1, but the labels go up to 1"):
        probe.linear_probe(x, y, x, y, num_classes=1)
    with pytest.raises(ValueError, match="test_x: expected \\(N, D\\)"):
        probe.retrieval_recall(x, y, x[None], y)


# --------------------------------------------------------------------------------------------- kNN / retrieval
def _cosine_loop(a, b):
    return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_equals_a_brute_force_loop(k):
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(30, 6, generator=g), torch.randint(0, 4, (30,), generator=g)
    qx, qy = torch.randn(9, 6, generator=g), torch.randint(0, 4, (9,), generator=g)
    votes = probe.knn_scores(tx, ty, qx, k=k, temperature=0.07, num_classes=4)
    correct = 0
    for i in range(9):
        sims = sorted(((_cosine_loop(qx[i].tolist(), tx[j].tolist()), j) for j in range(30)), reverse=True)
        ref = [0.0] * 4
        for s, j in sims[:k]:
            ref[int(ty[j])] += math.exp(s / 0.07)
        assert votes[i].tolist() == pytest.approx(ref, rel=1e-4)
        correct += max(range(4), key=lambda c: ref[c]) == int(qy[i])
    r = probe.knn_classify(tx, ty, qx, qy, k=k, num_classes=4)
    assert r["top1"] == pytest.approx(correct / 9) and r["k"] == min(k, 30) and r["k_requested"] == k


def test_retrieval_recall_equals_a_loop():
    g = torch.Generator().manual_seed(2)
    tx, ty = torch.randn(25, 5, generator=g), torch.randint(0, 3, (25,), generator=g)
    qx, qy = torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)
    r = probe.retrieval_recall(tx, ty, qx, qy, ks=(1, 5, 10, 20, 50))
    for k in (1, 5, 10, 20, 50):
        hits = 0
        for i in range(11):
            ranked = sorted(range(25), key=lambda j: -_cosine_loop(qx[i].tolist(), tx[j].tolist()))
            hits += any(int(ty[j]) == int(qy[i]) for j in ranked[:k])
        assert r[f"R@{k}"] == pytest.approx(hits / 11), k
    assert r["k_used"]["R@50"] == 25


# ------------------------------------------------------------------------------------------------ arrow of time
def _clips(n, t=4, c=8, seed=0, order=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, c, generator=g).expand(n, t, c)  # n t c: the clip's content
    noise = 0.3 * torch.randn(n, t, c, generator=g)  # n t c
    drift = torch.randn(c, generator=g) if order else torch.zeros(c)  # c: one direction of change over time
    ramp = torch.arange(t, dtype=torch.float32)[None, :, None] * drift  # 1 t c
    return base + noise + ramp  # n t c


def test_arrow_probe_separates_a_feature_that_encodes_order(one_thread):
    clips = _clips(120, seed=0)  # every clip drifts along the same direction over time
    r = probe.arrow_of_time_probe(clips[:60], clips[60:], l2_grid=(1e-3, 1e-1))
    assert r["top1"] > 0.95 and r["num_clips_train"] == 60 and r["dim"] == 4 * 8


def test_arrow_probe_scores_chance_on_order_free_features(one_thread):
    train, test = _clips(150, seed=1, order=False), _clips(150, seed=2, order=False)
    r = probe.arrow_of_time_probe(train, test, l2_grid=(1e-3, 1e-1))
    assert abs(r["top1"] - 0.5) < 0.1

def test_arrow_probe_reports_test_videos_not_the_train_fit(one_thread):
    """Each clip drifts along its own random direction: a head can memorise the train clips' directions (train fit
    near 1) but nothing carries over to new clips, so the reported test top-1 must stay at chance."""
    g = torch.Generator().manual_seed(4)

    def own_drift(n):
        ramp = torch.arange(4, dtype=torch.float32)[None, :, None]  # 1 t 1
        return torch.randn(n, 1, 16, generator=g) + ramp * torch.randn(n, 1, 16, generator=g)  # n t c

    r = probe.arrow_of_time_probe(own_drift(12), own_drift(200), l2_grid=(1e-4,))
    assert r["train_top1"] > 0.95 and abs(r["top1"] - 0.5) < 0.1


def test_arrow_folds_are_video_disjoint():
    items = [labelled.ProbeItem(v, (0, 1), 0, v, s) for v in ("a", "b", "c") for s in ("train", "test")]
    folds, how = probe.arrow_folds(items)
    assert [sorted({items[i].video for i in te}) for _, te in folds] == [["a"], ["b"], ["c"]]
    assert all(not {items[i].video for i in tr} & {items[i].video for i in te} for tr, te in folds)
    assert len(folds[0][0]) == 4 and "leave-one-video-out" in how
    disjoint = [labelled.ProbeItem(v, (0, 1), 0, v, s) for v, s in (("a", "train"), ("b", "test"))]
    assert probe.arrow_folds(disjoint)[0] == [([0], [1])]


# ------------------------------------------------------------------------------------------------------ inputs
def _image(path, colour, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)


def _image_folder(root, classes=("cat", "dog"), per_class=4):
    for ci, c in enumerate(classes):
        for i in range(per_class):
            _image(root / c / f"{i}.png", (60 * ci + 10 * i, 100, 200 - 60 * ci))
    return root


def _frame_folders(root, names=("s0", "s1", "s2"), frames=8):
    for si, n in enumerate(names):
        for t in range(frames):
            _image(root / n / f"{t:05d}.jpg", (40 * si + 5 * t, 120, 30 * si))
    return root


def test_image_folder_errors_name_the_folder(tmp_path):
    _image_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match="one.*1 class"):
        labelled.image_folder_set(tmp_path / "one")
    given = tmp_path / "given"
    _image_folder(given / "train", per_class=3), _image_folder(given / "test", per_class=1)
    data = labelled.image_folder_set(given)
    assert data.classes == ["cat", "dog"] and data.counts()["test"]["clips"] == 2 and "is test" in data.protocol
    root = _image_folder(tmp_path / "two")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: empty class folder"):
        labelled.image_folder_set(root)


def test_frame_folders_split_by_time_and_reject_one_class(tmp_path):
    root = _frame_folders(tmp_path / "f")
    data = labelled.frame_folders_set(root, sequences=["s0", "s2"], clip_len=2, clips_per_video=2)
    assert data.classes == ["s0", "s2"]
    assert all(max(it.frames) < 4 for it in data.split("train")) and all(min(it.frames) >= 4
                                                                        for it in data.split("test"))
    with pytest.raises(ValueError, match="1 class"):
        labelled.frame_folders_set(root, sequences=["s0"])
    with pytest.raises(FileNotFoundError, match="nope"):
        labelled.frame_folders_set(root, sequences=["s0", "nope"])


def test_frame_folders_split_by_video_is_arrow_only(tmp_path, one_thread, capsys):
    root = _frame_folders(tmp_path / "f")
    data = labelled.frame_folders_set(root, sequences=["s0", "s1"], test_sequences=["s2"], clip_len=2,
                                      clips_per_video=3)
    assert {Path(it.video).name for it in data.split("train")} == {"s0", "s1"}
    assert {Path(it.video).name for it in data.split("test")} == {"s2"}
    assert max(max(it.frames) for it in data.items) == 7 and min(min(it.frames) for it in data.items) == 0
    folds, how = probe.arrow_folds(data.items)
    assert len(folds) == 1 and "disjoint videos" in how  # one fold: train on s0, s1; test on s2
    with pytest.raises(ValueError, match=r"\['s1'\] named twice"):
        labelled.frame_folders_set(root, sequences=["s0", "s1"], test_sequences=["s1"])
    seq = torch.randn(len(data.items), 2, 4)
    with pytest.raises(ValueError, match="share no class"):
        probe.evaluate_features(seq, data, protocols=["knn", "arrow"])
    assert probe.evaluate_features(seq, data, protocols=["arrow"])["arrow"]["num_test_videos"] == 1
    base = ["probe", "--encoder", "resnet18", "--frames", str(root), "--sequences", "s0,s1", "--test-sequences",
            "s2", "--size", "32", "--clip-len", "2", "--clips-per-video", "3", "--no-progress"]
    assert main(base + ["--protocols", "knn,arrow", "--out", str(tmp_path / "bad")]) == 2
    assert "only arrow applies" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(base + ["--out", str(tmp_path / "ok")]) == 0  # default protocols: arrow only
    rep = json.loads((tmp_path / "ok" / "probe.json").read_text())
    assert list(rep["summary"]) == ["arrow.top1"] and "split by video" in rep["data"]["protocol"]


def _video_classes(root):
    from vidssl.io import write_video

    for c in ("jump", "run"):
        for v in ("v1", "v2"):
            for t in range(5):
                _image(root / c / v / f"{t:03d}.jpg", (50 if c == "jump" else 200, 10 * t, 90))
    frames = np.stack([np.full((16, 16, 3), 20 * t, dtype=np.uint8) for t in range(6)])
    write_video(root / "run" / "v3.mp4", frames, fps=10, lossless=True)
    return root


def test_video_folder_refuses_one_class_and_an_empty_class(tmp_path):
    root = _video_classes(tmp_path / "videos")
    assert labelled.video_folder_set(root, clip_len=2, clips_per_video=1).classes == ["jump", "run"]
    (root / "walk").mkdir()
    with pytest.raises(ValueError, match=r"walk: empty class folder"):
        labelled.video_folder_set(root, clip_len=2)
    one = tmp_path / "one"
    (one / "jump").mkdir(parents=True)
    (root / "jump").rename(one / "jump" / "clips")
    with pytest.raises(ValueError, match=r"one: 1 class"):
        labelled.video_folder_set(one, clip_len=2)


def test_ucf101_and_hmdb51_splits_and_missing_videos(tmp_path):
    root = _video_classes(tmp_path / "videos")
    ucf = tmp_path / "ucf"
    ucf.mkdir()
    (ucf / "classInd.txt").write_text("1 jump\n2 run\n")
    (ucf / "trainlist01.txt").write_text("jump/v1.avi 1\nrun/v1.avi 2\nrun/v3.mp4 2\n")
    (ucf / "testlist01.txt").write_text("jump/v2.avi\nrun/v2.avi\n")
    data = labelled.video_folder_set(root, splits=ucf, clip_len=3, clips_per_video=2)
    assert data.classes == ["jump", "run"] and data.counts()["train"]["videos"] == 3
    mp4 = [it for it in data.items if it.path.endswith(".mp4")]
    assert mp4 and labelled.read_item_frames(mp4[0].path, mp4[0].frames).shape == (3, 3, 16, 16)
    (ucf / "testlist01.txt").write_text("jump/v2.avi\nrun/ghost.avi\n")
    with pytest.raises(ValueError, match=r"testlist01.txt: names 1 video.*run/ghost.avi"):
        labelled.video_folder_set(root, splits=ucf)

    hmdb = tmp_path / "hmdb"
    hmdb.mkdir()
    (hmdb / "jump_test_split1.txt").write_text("v1.avi 1\nv2.avi 2\n")
    (hmdb / "run_test_split1.txt").write_text("v1.avi 1\nv2.avi 2\nv3.mp4 0\n")
    data = labelled.video_folder_set(root, splits=hmdb, clip_len=2, clips_per_video=1)
    assert data.counts()["test"]["clips"] == 2 and not any(it.path.endswith(".mp4") for it in data.items)
    (hmdb / "run_test_split1.txt").write_text("v1.avi 1\nmissing.avi 2\n")
    with pytest.raises(ValueError, match=r"run_test_split1.txt: names 1 video.*missing.avi"):
        labelled.video_folder_set(root, splits=hmdb)


def test_video_folder_without_splits_keeps_videos_disjoint(tmp_path):
    data = labelled.video_folder_set(_video_classes(tmp_path / "v"), clip_len=2, clips_per_video=2)
    tr, te = data.split("train"), data.split("test")
    assert tr and te and not {it.video for it in tr} & {it.video for it in te}


def test_clip_features_encode_each_frame_once_in_bounded_batches(monkeypatch):
    calls = []

    class Crop(torch.nn.Module):
        def forward(self, x):  # b 3 8 8 -> b 3 2 2
            calls.append(x.shape[0])
            return x[:, :, :2, :2]

    def read(path, idx):
        return torch.stack([torch.full((3, 8, 8), 10 * int(path) + i, dtype=torch.uint8) for i in idx])

    monkeypatch.setattr(probe, "read_item_frames", read)
    items = [labelled.ProbeItem(str(p), (i, i + 1), 0, str(p), "train") for p in range(3) for i in range(9)]
    ff = probe.FrameFeatures(Crop(), None, size=8)
    seq = probe.clip_features(items, ff, batch_size=4)
    assert sum(calls) == 30 and max(calls) <= 4  # 3 videos x 10 distinct frames
    one_by_one = torch.stack([torch.stack([ff(read(it.path, [f]))[0] for f in it.frames]) for it in items])
    assert torch.equal(seq, one_by_one) and seq.shape == (27, 2, 3)


def test_batch_statistics_encoders_get_batches_mixed_across_videos(monkeypatch):
    class BatchStatBN(torch.nn.Module):  # DPC's 2d3d ResNet style: no running statistics
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3, track_running_stats=False, affine=False)

        def forward(self, x):  # b 3 h w
            return self.bn(x)

    def read(path, idx):
        return torch.stack([torch.full((3, 8, 8), 10 * int(path) + i, dtype=torch.uint8) for i in idx])

    monkeypatch.setattr(probe, "read_item_frames", read)
    items = [labelled.ProbeItem(str(p), (i,), p, str(p), "train") for p in range(3) for i in range(8)]
    assert probe.batch_statistics_layers(BatchStatBN()) == 1
    assert probe.batch_statistics_layers(torch.nn.BatchNorm2d(3)) == 0
    ff = probe.FrameFeatures(BatchStatBN(), None, size=8)
    keys = [k for k, _ in probe._frame_batches(items, ff, 8, mixed=True)]
    # every batch of 8 draws from more than one video (file by file, the first batch would be video 0 alone)
    assert all(len({p for p, _ in batch}) > 1 for batch in keys)
    assert sorted(k for batch in keys for k in batch) == sorted((str(p), i) for p in range(3) for i in range(8))
    plain = [k for k, _ in probe._frame_batches(items, ff, 8)]
    assert [{p for p, _ in batch} for batch in plain] == [{"0"}, {"1"}, {"2"}]
    # clip_features mixes on its own for such an encoder, and each frame's feature is the one of its mixed batch
    seq = probe.clip_features(items, ff, batch_size=8)  # n 1 c
    rows = {}
    for batch, x in probe._frame_batches(items, ff, 8, mixed=True):
        rows.update(zip(batch, ff.encode(x)))
    torch.testing.assert_close(seq[:, 0], torch.stack([rows[(it.path, it.frames[0])] for it in items]))


def test_recalibrate_batchnorm_uses_the_frames_and_restores_eval_mode(monkeypatch):
    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):  # b 3 h w
            return self.bn(x)

    def read(path, idx):
        return torch.stack([torch.full((3, 8, 8), 20 * int(path) + 3 * i, dtype=torch.uint8) for i in idx])

    monkeypatch.setattr(probe, "read_item_frames", read)
    items = [labelled.ProbeItem(str(p), (i,), 0, str(p), "train") for p in range(2) for i in range(4)]
    ff = probe.FrameFeatures(BN(), None, size=8)
    assert probe.recalibrate_batchnorm(items, ff, batch_size=4) == 1
    frames = torch.cat([ff.preprocess(read(str(p), range(4))) for p in range(2)])  # 8 3 8 8
    assert torch.allclose(ff.encoder.bn.running_mean, frames.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not ff.encoder.training and ff.encoder.bn.momentum == 0.1


# ---------------------------------------------------------------------------------------- runner and the CLI
def test_cli_end_to_end_on_images_and_frames(tmp_path, one_thread, capsys):
    from vidssl.cli import main

    imgs = _image_folder(tmp_path / "imgs")
    assert main(["probe", "--encoder", "resnet18", "--images", str(imgs), "--size", "32", "--seed", "0,1",
                 "--out", str(tmp_path / "p_img"), "--test-fraction", "0.5"]) == 0
    rep = json.loads((tmp_path / "p_img" / "probe.json").read_text())
    assert [e["role"] for e in rep["encoders"]] == ["random_init", "random_init"]
    assert rep["encoders"][0]["results"]["arrow"]["skipped"] and rep["encoders"][0]["feature_dim"] == 256
    assert rep["data"]["counts"]["test"]["clips"] == 4 and len(rep["summary"]["linear.top1"]["random_init"]) == 2

    frames = _frame_folders(tmp_path / "frames")
    out = tmp_path / "p_fr"
    args = ["probe", "--encoder", "resnet18", "--frames", str(frames), "--sequences", "s0,s1,s2", "--size", "32",
            "--clip-len", "2", "--clips-per-video", "3", "--out", str(out)]
    assert main(args) == 0
    rep = json.loads((out / "probe.json").read_text())
    assert set(rep["protocols"]) == {"linear", "knn", "retrieval", "arrow"}
    assert "k=20" in rep["protocols"]["knn"] and "T=0.07" in rep["protocols"]["knn"]
    res = rep["encoders"][0]["results"]
    assert res["knn"]["k=20"]["k"] == 9 and res["arrow"]["dim"] == 2 * 256 and "timings_s" in res
    before = (out / "probe.json").read_bytes()
    assert main(args) == 2  # an existing report is not replaced without --force
    assert "exists already" in capsys.readouterr().err
    assert main(args[:-1] + [str(out), "--force", "--sequences", "s0"]) == 2  # a failing run...
    assert (out / "probe.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["probe.json"]


def test_report_survives_a_run_that_fails_after_extraction(tmp_path, one_thread, monkeypatch):
    data = labelled.frame_folders_set(_frame_folders(tmp_path / "f"), clip_len=2, clips_per_video=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "probe.json").write_text("{\"old\": 1}")

    def fail(*args, **kwargs):
        raise RuntimeError("protocol crashed")

    monkeypatch.setattr(probe, "evaluate_features", fail)
    with pytest.raises(RuntimeError, match="protocol crashed"):
        probe.run_probe(data, tmp_path / "out", encoder="resnet18", size=32, protocols=["knn"], force=True)
    assert (tmp_path / "out" / "probe.json").read_text() == "{\"old\": 1}"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["probe.json"]


def test_checkpoint_is_probed_beside_its_random_init(tmp_path, one_thread):
    from vidssl.engine.checkpoint import save_checkpoint
    from vidssl.models.encoders import ModelConfig

    model = {"encoder": "resnet18", "out_layer": "layer2", "eval_layer": "layer2"}
    enc = probe.random_init_encoder(ModelConfig(**model), seed=0)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the seed-0 init
    weights = {"encoder." + k: v for k, v in enc.state_dict().items()}
    config = {"name": "tiny", "model": model, "objectives": [{"name": "crw"}]}
    save_checkpoint(tmp_path / "run", step=2, weights=weights, trainer_state={"step": 2}, config=config)
    data = labelled.frame_folders_set(_frame_folders(tmp_path / "f"), clip_len=2, clips_per_video=2)
    rep = probe.run_probe(data, tmp_path / "out", checkpoint=tmp_path / "run", seeds=(0,), size=32,
                          protocols=["knn", "retrieval"], bn_stats="train")
    roles = {e["role"]: e for e in rep["encoders"]}
    assert roles["trained"]["step"] == 2 and roles["random_init"]["seed"] == 0
    assert roles["trained"]["bn_layers_recalibrated"] == roles["random_init"]["bn_layers_recalibrated"] > 0
    assert rep["encoder"]["layer"] == "layer2" and roles["trained"]["feature_dim"] == 128
    assert "trained" in rep["summary"]["knn.k=20.top1"] and json.loads((tmp_path / "out" / "probe.json").read_text())
