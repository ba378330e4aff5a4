"""build_loader / ClipLoader (vidssl.data.loader): determinism, clip counts, distributed split, bad inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vidssl.data.loader as L
from vidssl.config import ConfigError
from vidssl.data import DataConfig, build_loader
from vidssl.data.manifest import ManifestError
from vidssl.io import write_video


def write_frames(folder: Path, n: int, *, seed: int, size=(20, 28)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{k:05d}.jpg")
    return folder


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "frames"
    for v, n in enumerate((6, 9, 5, 12, 7, 8)):
        write_frames(r / f"vid{v}", n, seed=v)
    return r


def cfg_for(root: Path, **kw) -> DataConfig:
    base = dict(source="frames", root=str(root), clip_len=3, stride=2, crop_size=16, flip=0.5, color_jitter=0.3)
    return DataConfig(**{**base, **kw})


def epoch(loader, e: int) -> list[dict]:
    loader.set_epoch(e)
    return list(loader)


# ----------------------------------------------------------------------------------------------- basics

def test_batches_shapes_and_counts(root, tmp_path):
    loader = build_loader(cfg_for(root, clips_per_video=2), batch_size=4, seed=0, cache_dir=tmp_path / "cache")
    assert len(loader.dataset) == 12 and len(loader) == 3
    batches = epoch(loader, 0)
    assert len(batches) == 3
    b = batches[0]
    assert b["video"].shape == (4, 3, 3, 16, 16) and b["video"].dtype == torch.float32
    assert b["frames"].shape == (4, 3) and b["index"].shape == (4,) and b["skipped"].tolist() == [0] * 4
    seen = torch.cat([x["index"] for x in batches]).tolist()
    assert sorted(seen) == list(range(12))  # every clip exactly once per epoch


def test_exact_clip_count_with_drop_last(root, tmp_path):
    loader = build_loader(cfg_for(root, clips_per_video=3), batch_size=5, seed=1, cache_dir=tmp_path / "c")
    assert len(loader) == 18 // 5
    idx = torch.cat([b["index"] for b in epoch(loader, 0)]).tolist()
    assert len(idx) == 15 and len(set(idx)) == 15
    keep = build_loader(cfg_for(root, clips_per_video=3), batch_size=5, seed=1, cache_dir=tmp_path / "c",
                        drop_last=False)
    assert len(keep) == 4 and sum(len(b["index"]) for b in epoch(keep, 0)) == 18


def test_same_seed_same_batches_regardless_of_workers(root, tmp_path):
    cache = tmp_path / "cache"
    l0 = build_loader(cfg_for(root, num_workers=0), batch_size=3, seed=7, cache_dir=cache)
    l2 = build_loader(cfg_for(root, num_workers=2), batch_size=3, seed=7, cache_dir=cache)
    for e in (0, 1):
        a, b = epoch(l0, e), epoch(l2, e)
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["frames"], y["frames"])
            assert torch.equal(x["video"], y["video"])
    again = epoch(l0, 1)
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(again, epoch(l2, 1)))
    other_seed = epoch(build_loader(cfg_for(root), batch_size=3, seed=8, cache_dir=cache), 1)
    assert not all(torch.equal(x["video"], y["video"]) for x, y in zip(again, other_seed))


def test_epochs_differ_and_resume_is_exact(root, tmp_path):
    cache = tmp_path / "cache"
    loader = build_loader(cfg_for(root), batch_size=2, seed=3, cache_dir=cache)
    e0, e1 = epoch(loader, 0), epoch(loader, 1)
    assert [b["index"].tolist() for b in e0] != [b["index"].tolist() for b in e1]
    fresh = build_loader(cfg_for(root), batch_size=2, seed=3, cache_dir=cache)  # a resumed run jumps to epoch 1
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(e1, epoch(fresh, 1)))


def test_two_ranks_split_disjoint(root, tmp_path):
    cache = tmp_path / "cache"
    cfg = cfg_for(root, clips_per_video=2)  # 12 clips
    ranks = [build_loader(cfg, batch_size=2, seed=5, rank=r, world_size=2, cache_dir=cache) for r in (0, 1)]
    assert [len(x) for x in ranks] == [3, 3]
    for e in (0, 1):
        parts = [torch.cat([b["index"] for b in epoch(x, e)]).tolist() for x in ranks]
        assert len(parts[0]) == len(parts[1]) == 6
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == list(range(12))
    odd = build_loader(cfg_for(root, clips_per_video=1), batch_size=1, seed=5, rank=1, world_size=4,
                       cache_dir=cache)
    assert len(odd) == 6 // 4  # DistributedSampler drop_last: equal shares, no duplicated clips


def test_manifest_built_once_and_reused(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    build_loader(cfg_for(root), batch_size=2, seed=0, cache_dir=cache)
    cached = list((cache / "manifests").glob("*.jsonl"))
    assert len(cached) == 1

    def no_rescan(*a, **k):
        raise AssertionError("rescanned although a manifest exists")

    monkeypatch.setattr(L, "build_manifest", no_rescan)
    assert len(build_loader(cfg_for(root), batch_size=2, seed=0, cache_dir=cache).dataset) == 6
    monkeypatch.undo()
    explicit = tmp_path / "my" / "index.jsonl"
    loader = build_loader(cfg_for(root, manifest=str(explicit)), batch_size=2, seed=0, cache_dir=cache)
    assert explicit.is_file() and len(loader.dataset) == 6


def test_sequences_and_split_select_videos(root, tmp_path):
    cfg = cfg_for(root, sequences=["vid3", "vid1"])
    loader = build_loader(cfg, batch_size=1, seed=0, cache_dir=tmp_path / "c")
    assert [e.name for e in loader.dataset.entries] == ["vid3", "vid1"]
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "train.txt").write_text("vid0\nvid5\n")
    loader = build_loader(cfg_for(root, split="train"), batch_size=1, seed=0, cache_dir=tmp_path / "c2")
    assert [e.name for e in loader.dataset.entries] == ["vid0", "vid5"]


# ----------------------------------------------------------------------------------------------- bad input

def test_missing_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root: .*nowhere"):
        build_loader(cfg_for(tmp_path / "nowhere"), batch_size=1, seed=0, cache_dir=tmp_path / "c")


def test_empty_root_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="empty: no frame folders or video files"):
        build_loader(cfg_for(tmp_path / "empty"), batch_size=1, seed=0, cache_dir=tmp_path / "c")


def test_unknown_sequence_and_big_batch(root, tmp_path):
    with pytest.raises(ManifestError, match="not indexed: zebra"):
        build_loader(cfg_for(root, sequences=["zebra"]), batch_size=1, seed=0, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="batch_size=7 is larger than the 6 clips"):
        build_loader(cfg_for(root), batch_size=7, seed=0, cache_dir=tmp_path / "c")


def test_missing_manifest_entry_names_file(root, tmp_path):
    import shutil

    cache = tmp_path / "c"
    build_loader(cfg_for(root), batch_size=1, seed=0, cache_dir=cache)
    shutil.rmtree(root / "vid2")
    with pytest.raises(FileNotFoundError, match="video 'vid2' not found"):
        build_loader(cfg_for(root), batch_size=1, seed=0, cache_dir=cache)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_is_a_config_error(root, tmp_path):
    with pytest.raises(ConfigError, match="data.device"):
        build_loader(cfg_for(root, device="cuda"), batch_size=1, seed=0, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_continues_past_bad_files_and_counts_skips(root, tmp_path, workers, caplog):
    cache = tmp_path / "c"
    loader = build_loader(cfg_for(root, num_workers=workers, max_retries=2, clip_len=3, sampler="uniform",
                                  clips_per_video=2), batch_size=2, seed=0, cache_dir=cache, drop_last=False)
    # break every middle frame of vid1 after indexing (the index only reads the first and last headers)
    for k in range(1, 8):
        (root / "vid1" / f"{k:05d}.jpg").write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING):
        batches = epoch(loader, 0)
    assert sum(len(b["index"]) for b in batches) == 12  # the epoch is complete
    skipped = sum(int(b["skipped"].sum()) for b in batches)
    assert skipped == 2 and loader.skipped == 2 and loader.epoch_skipped == 2  # vid1's two clips
    assert all(v != 1 for b in batches for v in b["video_index"].tolist())
    assert "epoch 0: 2 unreadable video(s) skipped" in caplog.text


# ----------------------------------------------------------------------------------------------- synthetic

def test_synthetic_source_uses_train_split(tmp_path):
    cfg = DataConfig(source="synthetic", synth_videos=4, synth_frames=6, synth_size=(32, 40), clip_len=2,
                     crop_size=16)
    loader = build_loader(cfg, batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    names = [e.name for e in loader.dataset.entries]
    assert names == [f"synth-train-{i:04d}" for i in range(4)]
    root = L.synthetic_root(cfg, cache_dir=tmp_path / "cache")
    assert root.parent == tmp_path / "cache" and root.name.startswith("synth-")
    assert all(Path(e.path).parent == root / "JPEGImages" / "480p" for e in loader.dataset.entries)
    b = next(iter(loader))
    assert b["video"].shape == (2, 2, 3, 16, 16)
    other = L.synthetic_root(DataConfig(synth_videos=4, synth_frames=6, synth_size=(32, 40), synth_seed=1),
                             cache_dir=tmp_path / "cache")
    assert other != root


# ----------------------------------------------------------------------------------------------- GPU path

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_matches_cpu_path(tmp_path):
    # smooth frames: on pixel noise the two resamplers (and nvjpeg vs libjpeg) legitimately disagree
    root = tmp_path / "smooth"
    rng = np.random.default_rng(0)
    for v in range(4):
        (root / f"v{v}").mkdir(parents=True)
        for k in range(6):
            low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            low.resize((96, 72), Image.BILINEAR).save(root / f"v{v}" / f"{k:05d}.jpg", quality=95)
    cache = tmp_path / "c"
    cpu = build_loader(cfg_for(root, crop_size=32), batch_size=2, seed=2, cache_dir=cache)
    gpu = build_loader(cfg_for(root, crop_size=32, device="cuda", num_workers=2), batch_size=2, seed=2,
                       cache_dir=cache, device="cuda")
    assert len(cpu) == len(gpu) == 2
    for x, y in zip(epoch(cpu, 1), epoch(gpu, 1)):
        assert y["video"].device.type == "cuda" and y["video"].shape == x["video"].shape
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["frames"], y["frames"])
        diff = (y["video"].cpu() - x["video"]).abs() * 0.229 * 255  # ~pixel levels
        assert diff.mean() < 3.0  # interpolation (and nvjpeg vs libjpeg decoding) only; unrelated crops: > 30


# ----------------------------------------------------------------------------------------------- encoded video

def write_mp4(path: Path, n: int, *, seed: int, size=(24, 32)) -> Path:
    frames = np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)
    return write_video(path, frames, fps=10, codec="mpeg4")


def test_video_source_through_manifest(tmp_path):
    vids = tmp_path / "videos"
    for v, n in enumerate((8, 11, 6)):
        write_mp4(vids / f"v{v}.mp4", n, seed=v)
    (vids / "broken.mp4").write_bytes(b"\x00 not a video")
    cfg = DataConfig(source="video", root=str(vids), clip_len=3, stride=2, crop_size=16, decoder="pyav")
    loader = build_loader(cfg, batch_size=3, seed=0, cache_dir=tmp_path / "c")
    assert [e.name for e in loader.dataset.entries] == ["v0", "v1", "v2"]  # broken.mp4 listed as a failure
    (b,) = epoch(loader, 0)
    assert b["video"].shape == (3, 3, 3, 16, 16) and torch.isfinite(b["video"]).all()
    frames_cfg = DataConfig(source="frames", root=str(vids), clip_len=3, crop_size=16)
    with pytest.raises(ManifestError, match="no frame folders indexed"):
        build_loader(frames_cfg, batch_size=1, seed=0, cache_dir=tmp_path / "c")


@pytest.mark.realdata
def test_real_davis_sample_split(tmp_path, davis_sample):
    cfg = DataConfig(source="frames", root=str(davis_sample), split="sample", clip_len=2, stride=4, crop_size=32)
    loader = build_loader(cfg, batch_size=4, seed=0, cache_dir=tmp_path / "c")
    assert len(loader.dataset) == 12 and len(loader) == 3
    b = next(iter(loader))
    assert b["video"].shape == (4, 2, 3, 32, 32) and (b["frames"][:, 1] - b["frames"][:, 0] == 4).all()


def test_reader_cache_reuses_decoders_and_changes_nothing(tmp_path, monkeypatch):
    import pickle

    import vidssl.io.readers as readers
    from vidssl.data.datasets import ClipDataset
    from vidssl.data.manifest import build_manifest, load_manifest

    vids = tmp_path / "videos"
    for v, n in enumerate((9, 12, 10)):
        write_mp4(vids / f"v{v}.mp4", n, seed=v)
    build_manifest(vids, tmp_path / "m.jsonl")
    entries = load_manifest(tmp_path / "m.jsonl")
    opened, closed = [], []
    real_open = readers.open_reader

    def counting_open(path, **kw):
        r = real_open(path, **kw)
        opened.append(Path(path).stem)
        real_close, done = r.close, []

        def close():  # count the first close of each reader (__del__ calls it again)
            if not done:
                done.append(1)
                closed.append(Path(path).stem)
            real_close()
        r.close = close
        return r

    monkeypatch.setattr(readers, "open_reader", counting_open)
    kw = dict(clip_len=3, stride=2, clips_per_video=4, seed=0, backend="pyav")
    plain = ClipDataset(entries, **kw)
    cached = ClipDataset(entries, reader_cache=2, **kw)
    order = [0, 1, 4, 2, 8, 3, 5, 9]  # videos 0 0 1 0 2 0 1 2
    want = [plain.load_clip(i).frames for i in order]
    assert len(opened) == len(order) == len(closed)  # one decoder per item without a cache
    opened.clear(), closed.clear()
    got = [cached.load_clip(i).frames for i in order]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # LRU of 2: v0 v1 (v0 hit) | v2 evicts v1 | v0 hit | v1 evicts v2 | v2 evicts v0
    assert opened == ["v0", "v1", "v2", "v1", "v2"] and closed == ["v1", "v2", "v0"]
    clone = pickle.loads(pickle.dumps(cached))  # e.g. a spawned worker: no decoders travel
    assert len(clone._readers) == 0 and len(cached._readers) == 2
    cached.close()
    assert len(cached._readers) == 0 and sorted(closed) == ["v0", "v1", "v1", "v2", "v2"]
    with pytest.raises(ValueError, match="reader_cache"):
        ClipDataset(entries, reader_cache=-1, **kw)
    with pytest.raises(ConfigError, match="reader_cache"):
        DataConfig(source="video", root=str(vids), reader_cache=-1).validate()


def test_keyframe_aligned_clips_start_on_keyframes(tmp_path):
    from vidssl.data.datasets import ClipDataset
    from vidssl.data.manifest import VideoEntry
    from vidssl.data.synthetic import decode_frame_index, frame_index_video
    from vidssl.io import open_video

    path = write_video(tmp_path / "g10.mp4", frame_index_video(40, 64, 64), gop=10)
    with open_video(path, backend="pyav") as r:
        keys = r.keyframe_indices
    assert keys == [0, 10, 20, 30]  # write_video's gop: a keyframe exactly every 10 frames
    entry = VideoEntry(name="g10", path=str(path), kind="video", num_frames=40)
    ds = ClipDataset([entry], clip_len=8, stride=1, clips_per_video=40, keyframe_aligned=True, backend="pyav")
    starts = set()
    for i in range(40):
        clip = ds.load_clip(i)
        assert clip.indices == list(range(clip.indices[0], clip.indices[0] + 8))
        assert [decode_frame_index(f) for f in clip.frames.permute(0, 2, 3, 1).numpy()] == clip.indices
        starts.add(clip.indices[0])
    assert starts == {0, 10, 20, 30}
    plain = ClipDataset([entry], clip_len=8, stride=1, clips_per_video=40, backend="pyav")
    assert len({plain.load_clip(i).indices[0] for i in range(40)}) > 4  # the default draws any start
    with pytest.raises(ValueError, match="keyframe_aligned"):
        ClipDataset([entry], clip_len=8, sampler="uniform", keyframe_aligned=True)
    with pytest.raises(ConfigError, match="keyframe_aligned"):
        DataConfig(source="video", root=str(tmp_path), sampler="uniform", keyframe_aligned=True).validate()


def test_threaded_gpu_path_loader_is_deterministic_on_cpu(tmp_path):
    """The GPU path's loop (threads + pooled readers + batched augmentation) run on the CPU: batches do not depend
    on the number of decode threads or on the reader pool."""
    from vidssl.data.datasets import ClipDataset
    from vidssl.data.loader import ClipLoader
    from vidssl.data.manifest import build_manifest, load_manifest
    from vidssl.data.transforms import BatchClipAugment

    vids = tmp_path / "videos"
    for v, n in enumerate((9, 12, 10, 8)):
        write_mp4(vids / f"v{v}.mp4", n, seed=v)
    build_manifest(vids, tmp_path / "m.jsonl")
    entries = load_manifest(tmp_path / "m.jsonl")
    cfg = DataConfig(source="video", root=str(vids), clip_len=3, stride=2, crop_size=16, flip=0.5, color_jitter=0.3)
    runs = []
    for threads, cache in [(1, 0), (3, 2), (4, 16)]:
        ds = ClipDataset(entries, clip_len=3, stride=2, clips_per_video=3, seed=1, backend="pyav",
                         reader_cache=cache)
        loader = ClipLoader(ds, batch_size=4, seed=1, gpu_augment=BatchClipAugment.from_config(cfg),
                            gpu_threads=threads)
        runs.append(epoch(loader, 2))
        ds.close()
    assert len(runs[0]) == 3
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["frames"], b["frames"])
            assert torch.equal(a["video"], b["video"])
    with pytest.raises(ValueError, match="gpu_threads"):
        ClipLoader(ds, batch_size=4, seed=1, gpu_augment=BatchClipAugment.from_config(cfg), gpu_threads=0)
