"""Frame-folder reading (vidssl.io.frames, vidssl.io.readers) and the clip dataset (vidssl.data.datasets)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidssl.data.datasets import ClipDataset, item_seed
from vidssl.data.manifest import VideoEntry
from vidssl.data.transforms import ClipTransform
from vidssl.io.base import DecodeError, FrameReader
from vidssl.io.frames import FrameFolderError, FrameFolderReader, list_frames, probe_frames
from vidssl.io.readers import open_reader


def frame_value(video: int, k: int) -> int:
    """The flat grey level of frame ``k`` of test video ``video`` (distinct, JPEG-robust steps of 8)."""
    return (video * 37 + k * 8) % 240 + 8


def write_frames(folder: Path, num_frames: int, *, video: int = 0, size=(24, 32), ext: str = ".png",
                 pattern: str = "{:05d}") -> Path:
    """Flat frames whose grey level encodes (video, frame) -- written with PIL (fixtures only)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    for k in range(num_frames):
        arr = np.full((h, w, 3), frame_value(video, k), dtype=np.uint8)
        arr[..., 1] = k  # green channel: the frame index itself (exact in PNG)
        Image.fromarray(arr).save(folder / (pattern.format(k) + ext), quality=95)
    return folder


def entry_for(folder: Path, name: str | None = None) -> VideoEntry:
    n = len(list_frames(folder))
    return VideoEntry(name=name or folder.name, path=str(folder), kind="frames", num_frames=n)


# ------------------------------------------------------------------------------------------------- reader

def test_reader_png_exact_any_order_and_repeats(tmp_path):
    folder = write_frames(tmp_path / "v", 6)
    r = open_reader(folder)
    assert isinstance(r, FrameFolderReader) and isinstance(r, FrameReader)
    assert (r.num_frames, r.height, r.width, r.fps) == (6, 24, 32, None)
    out = r.get_frames([4, 1, 1, 5])
    assert out.dtype == torch.uint8 and out.shape == (4, 3, 24, 32)
    assert out[:, 1, 0, 0].tolist() == [4, 1, 1, 5]  # green channel = frame index
    assert out[:, 0, 0, 0].tolist() == [frame_value(0, k) for k in (4, 1, 1, 5)]


def test_reader_jpeg_batched_matches_single_decodes(tmp_path):
    folder = write_frames(tmp_path / "v", 5, ext=".jpg")
    r = FrameFolderReader(folder)
    batch = r.get_frames([0, 2, 4])
    for j, k in enumerate((0, 2, 4)):
        assert torch.equal(batch[j], r.get_frames([k])[0])
        assert abs(int(batch[j, 0, 5, 5]) - frame_value(0, k)) <= 3  # flat colours survive JPEG closely
    threaded = FrameFolderReader(folder, threads=2).get_frames([0, 2, 4])
    assert torch.equal(batch, threaded)


def test_reader_natural_order(tmp_path):
    folder = tmp_path / "v"
    write_frames(folder, 12, pattern="img_{}")  # img_0 .. img_11, unpadded
    files = [p.name for p in list_frames(folder)]
    assert files[:3] == ["img_0.png", "img_1.png", "img_2.png"] and files[-1] == "img_11.png"
    assert FrameFolderReader(folder).get_frames([10])[0, 1, 0, 0] == 10


def test_reader_decodes_only_requested_frames(tmp_path, monkeypatch):
    import torchvision.io

    folder = write_frames(tmp_path / "v", 30, ext=".jpg")
    read = []
    real = torchvision.io.read_file
    monkeypatch.setattr(torchvision.io, "read_file", lambda p: read.append(Path(p).name) or real(p))
    FrameFolderReader(folder).get_frames([3, 7, 7, 20])
    assert sorted(read) == ["00003.jpg", "00007.jpg", "00020.jpg"]


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_reader(tmp_path / "nope")


def test_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FrameFolderError, match=r"empty.*empty frame folder"):
        FrameFolderReader(tmp_path / "empty")


def test_mixed_sizes_names_folder_and_sizes(tmp_path):
    folder = write_frames(tmp_path / "mixed", 3)
    write_frames(tmp_path / "other", 1, size=(30, 40))
    os.replace(tmp_path / "other" / "00000.png", folder / "00003.png")
    r = FrameFolderReader(folder)
    assert r.get_frames([0, 2]).shape == (2, 3, 24, 32)  # the frames asked for agree
    with pytest.raises(FrameFolderError, match=r"mixed.*32x24.*40x30"):
        r.get_frames([0, 3])
    with pytest.raises(FrameFolderError, match=r"mixed sizes"):
        probe_frames(folder)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_unreadable_image_names_the_file(tmp_path, ext):
    folder = write_frames(tmp_path / "v", 4, ext=ext)
    (folder / f"00002{ext}").write_bytes(b"this is not an image")
    r = FrameFolderReader(folder)
    r.get_frames([0, 1, 3])
    with pytest.raises(DecodeError, match=f"00002{ext}"):
        r.get_frames([0, 2])


def test_index_out_of_range(tmp_path):
    r = FrameFolderReader(write_frames(tmp_path / "v", 3))
    with pytest.raises(IndexError, match="frame 3 out of range"):
        r.get_frames([3])


def test_probe_frames(tmp_path):
    info = probe_frames(write_frames(tmp_path / "v", 4, ext=".jpg"))
    assert info == {"num_frames": 4, "fps": None, "height": 24, "width": 32, "codec": "jpeg", "duration": None}


def test_open_reader_file_goes_to_video_module(tmp_path):
    pytest.importorskip("av")  # a decoding backend for the "auto" choice
    bogus = tmp_path / "broken.mp4"
    bogus.write_bytes(b"\x00" * 64)
    with pytest.raises((DecodeError, OSError, ValueError), match="broken.mp4"):
        open_reader(bogus).get_frames([0])


# ------------------------------------------------------------------------------------------------- dataset

@pytest.fixture
def videos(tmp_path) -> list[VideoEntry]:
    return [entry_for(write_frames(tmp_path / f"v{v}", n, video=v), f"v{v}") for v, n in enumerate((10, 3, 25))]


def test_dataset_len_items_and_frames(videos):
    ds = ClipDataset(videos, clip_len=4, stride=2, clips_per_video=3, seed=0)
    assert len(ds) == 9
    for i in range(len(ds)):
        item = ds[i]
        v = i // 3
        assert item["index"] == i and item["video_index"] == v and item["skipped"] == 0
        assert item["video"].dtype == torch.uint8 and item["video"].shape == (4, 3, 24, 32)
        frames = item["frames"]
        assert frames.dtype == torch.int64 and frames.shape == (4,)
        assert item["video"][:, 1, 0, 0].tolist() == frames.tolist()  # decoded exactly the sampled frames
        assert item["video"][0, 0, 0, 0] == frame_value(v, int(frames[0]))
        assert (frames < videos[v].num_frames).all()
    # video 1 has 3 frames: clip of 4 at stride 2 -> stride 1 and a repeated last frame
    assert ds[3]["frames"].tolist() == [0, 1, 2, 2]


def test_dataset_seeded_per_item_and_epoch(videos):
    t = ClipTransform(crop_size=16, flip=0.5, color_jitter=0.3)
    a = ClipDataset(videos, clip_len=3, transform=t, seed=5)
    b = ClipDataset(videos, clip_len=3, transform=t, seed=5)
    order = [2, 0, 1]
    got_a = [a[i] for i in range(3)]
    got_b = {i: b[i] for i in order}  # another access order (as another worker would)
    for i in range(3):
        assert torch.equal(got_a[i]["video"], got_b[i]["video"])
        assert torch.equal(got_a[i]["frames"], got_b[i]["frames"])
    assert got_a[0]["video"].dtype == torch.float32 and got_a[0]["video"].shape == (3, 3, 16, 16)
    a.set_epoch(1)
    assert not torch.equal(a[2]["video"], got_a[2]["video"])  # new epoch, new randomness
    assert item_seed(5, 1, 2) != item_seed(5, 2, 1)


def test_dataset_samplers_uniform_consecutive_pair_shots(videos):
    uni = ClipDataset(videos, clip_len=2, stride=1, sampler="uniform", clips_per_video=3)
    assert [uni[i]["frames"].tolist() for i in range(3)] == [[0, 1], [4, 5], [8, 9]]
    con = ClipDataset(videos, clip_len=4, sampler="consecutive", clips_per_video=3)
    assert [con[i]["frames"].tolist() for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    pair = ClipDataset(videos, clip_len=2, stride=3, sampler="pair")
    a, b = pair[2]["frames"].tolist()
    assert 1 <= b - a <= 3
    with pytest.raises(ValueError, match="pair"):
        ClipDataset(videos, clip_len=3, sampler="pair")
    shot_entry = VideoEntry(**{**videos[2].__dict__, "shots": [(0, 8), (8, 20), (20, 25)]})
    shots = ClipDataset([shot_entry], clip_len=2, sampler="shots", num_shots=2)
    f = shots[0]["frames"].tolist()
    assert len(f) == 4 and f[:2] == sorted(f[:2]) and f[2:] == sorted(f[2:])
    spans = [next(k for k, (a, b) in enumerate(shot_entry.shots) if a <= x < b) for x in f]
    assert spans[0] == spans[1] and spans[2] == spans[3] == spans[0] + 1


def test_dataset_return_uint8_geometric_only(videos):
    t = ClipTransform(crop_size=8, per_frame_crop=False)
    item = ClipDataset(videos, clip_len=2, transform=t, return_uint8=True)[0]
    assert item["video"].dtype == torch.uint8 and item["video"].shape == (2, 3, 8, 8)


def test_dataset_skips_bad_video_retries_and_counts(videos, tmp_path, monkeypatch, caplog):
    bad = write_frames(tmp_path / "bad", 5)
    for k in range(5):
        (bad / f"{k:05d}.png").write_bytes(b"garbage")
    entries = [videos[0], entry_for(bad, "bad"), videos[2]]
    import vidssl.io.readers as readers

    opened = []
    real = readers.open_reader
    monkeypatch.setattr(readers, "open_reader", lambda p, **kw: opened.append(Path(p).name) or real(p, **kw))
    ds = ClipDataset(entries, clip_len=2, max_retries=2, seed=1)
    with caplog.at_level(logging.WARNING, logger="vidssl.data.datasets"):
        item = ds[1]
    assert opened == ["bad", "bad", "v2"]  # 2 attempts, then the next video
    assert item["skipped"] == 1 and item["video_index"] == 2 and ds.skipped == 1
    assert str(bad) in caplog.text and "unreadable image" in caplog.text
    # the substitute is what item 1 would be if video 2 stood in slot 1 (same per-item generator)
    ref = ClipDataset([videos[0], videos[2], videos[2]], clip_len=2, seed=1)[1]
    assert torch.equal(item["frames"], ref["frames"]) and torch.equal(item["video"], ref["video"])
    opened.clear()
    again = ds[1]  # known bad: not retried, still counted
    assert opened == ["v2"] and again["skipped"] == 1 and ds.skipped == 2
    assert torch.equal(again["video"], item["video"])


def test_dataset_missing_folder_is_skipped(videos, tmp_path):
    gone = VideoEntry(name="gone", path=str(tmp_path / "gone"), kind="frames", num_frames=4)
    ds = ClipDataset([gone, videos[0]], clip_len=2, max_retries=1)
    assert ds[0]["video_index"] == 1 and ds[0]["skipped"] == 1


def test_dataset_all_bad_raises(tmp_path):
    gone = VideoEntry(name="gone", path=str(tmp_path / "gone"), kind="frames", num_frames=4)
    with pytest.raises(RuntimeError, match="no readable video"):
        ClipDataset([gone], clip_len=2, max_retries=1)[0]


def test_dataset_bad_arguments(videos):
    with pytest.raises(ValueError, match="no videos"):
        ClipDataset([], clip_len=2)
    with pytest.raises(ValueError, match="sampler"):
        ClipDataset(videos, clip_len=2, sampler="nope")
    with pytest.raises(IndexError):
        ClipDataset(videos, clip_len=2)[3]


# ------------------------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_davis_clip(davis_sample):
    folder = davis_sample / "JPEGImages" / "480p" / "surf"
    r = FrameFolderReader(folder)
    assert r.num_frames == 55 and (r.height, r.width) == (480, 854)
    t = ClipTransform(crop_size=64)
    item = ClipDataset([entry_for(folder)], clip_len=4, stride=3, transform=t, seed=0)[0]
    assert item["video"].shape == (4, 3, 64, 64) and torch.isfinite(item["video"]).all()
    f = item["frames"].tolist()
    assert [b - a for a, b in zip(f, f[1:])] == [3, 3, 3]
