"""Video index (vidssl.data.manifest): discovery, build, resume, failures, loading, splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vidssl.data.manifest as M
from vidssl.data.manifest import (
    ManifestError,
    VideoEntry,
    build_manifest,
    failures_path,
    find_videos,
    load_manifest,
    read_split,
    select_entries,
)
from vidssl.io import write_video


def write_frames(folder: Path, n: int, size=(12, 16), ext=".jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(np.full((*size, 3), 10 * k, dtype=np.uint8)).save(folder / f"{k:05d}{ext}")
    return folder


@pytest.fixture
def flat_root(tmp_path) -> Path:
    """A folder of per-video frame folders, Kinetics-style nesting, plus one broken and one empty video."""
    root = tmp_path / "data"
    write_frames(root / "a", 5)
    write_frames(root / "b", 3, ext=".png", size=(8, 10))
    write_frames(root / "cls" / "c", 7)
    broken = write_frames(root / "broken", 2)
    (broken / "00000.jpg").write_bytes(b"not a jpeg")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def davis_root(tmp_path) -> Path:
    root = tmp_path / "davis"
    for name, n in (("bear", 4), ("cows", 6), ("dog", 2)):
        write_frames(root / "JPEGImages" / "480p" / name, n)
    (root / "ImageSets" / "2016").mkdir(parents=True)
    (root / "ImageSets" / "2016" / "train.txt").write_text("bear\ncows\ndog\n")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "train.txt").write_text("cows\nbear\n")
    (root / "ImageSets" / "2017" / "val.txt").write_text("dog\n")
    return root


def test_find_videos_layouts(flat_root, davis_root):
    names = [n for n, _ in find_videos(flat_root)]
    assert names == ["a", "b", "broken", "cls/c", "empty"]
    assert [n for n, _ in find_videos(davis_root)] == ["bear", "cows", "dog"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_videos(flat_root / "nowhere")
    (flat_root.parent / "void").mkdir()
    with pytest.raises(ManifestError, match="void.*no frame folders or video files"):
        find_videos(flat_root.parent / "void")


def test_build_manifest_entries_failures_and_file(flat_root, tmp_path):
    out = tmp_path / "idx" / "manifest.jsonl"
    entries, failures = build_manifest(flat_root, out, workers=2, progress=False)
    assert [e.name for e in entries] == ["a", "b", "cls/c"]
    a, b, c = entries
    assert (a.kind, a.num_frames, a.height, a.width, a.codec, a.fps) == ("frames", 5, 12, 16, "jpeg", None)
    assert (b.num_frames, b.height, b.width, b.codec) == (3, 8, 10, "png")
    assert c.num_frames == 7 and Path(c.path) == (flat_root / "cls" / "c").resolve()
    reasons = {Path(f["path"]).name: f["reason"] for f in failures}
    assert set(reasons) == {"broken", "empty"}
    assert "00000.jpg" in reasons["broken"] and "empty frame folder" in reasons["empty"]
    lines = out.read_text().splitlines()
    assert [json.loads(ln)["name"] for ln in lines] == ["a", "b", "cls/c"]
    assert {json.loads(ln)["path"] for ln in failures_path(out).read_text().splitlines()} == \
        {str((flat_root / "broken").resolve()), str((flat_root / "empty").resolve())}
    assert [p.name for p in out.parent.iterdir()] and not [p for p in out.parent.iterdir() if ".tmp" in p.name]
    assert load_manifest(out) == entries


def test_build_manifest_resume_probes_only_new(flat_root, tmp_path, monkeypatch):
    out = tmp_path / "manifest.jsonl"
    build_manifest(flat_root, out, progress=False)
    # hand-added shots survive a resumed build
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    lines[0]["shots"] = [[0, 2], [2, 5]]
    out.write_text("".join(json.dumps(d) + "\n" for d in lines))
    write_frames(flat_root / "new", 4)
    probed = []
    real = M.probe
    monkeypatch.setattr(M, "probe", lambda p: probed.append(Path(p).name) or real(p))
    entries, failures = build_manifest(flat_root, out, progress=False)
    assert sorted(probed) == ["broken", "empty", "new"]  # failures are retried, listed videos are not
    assert [e.name for e in entries] == ["a", "b", "cls/c", "new"]
    assert entries[0].shots == [(0, 2), (2, 5)]
    probed.clear()
    build_manifest(flat_root, out, resume=False, progress=False)
    assert len(probed) == 6


def test_build_manifest_saves_progress_while_scanning(flat_root, tmp_path, monkeypatch):
    out = tmp_path / "manifest.jsonl"
    seen_sizes = []
    real = M.write_manifest
    monkeypatch.setattr(M, "write_manifest", lambda p, es: seen_sizes.append(len(es)) or real(p, es))
    build_manifest(flat_root, out, progress=False, save_every_s=0.0, workers=1)
    assert seen_sizes[:-1] == [1, 2, 3] and seen_sizes[-1] == 3  # one save per new video, then the final write


def test_build_drops_entries_whose_files_are_gone(flat_root, tmp_path):
    out = tmp_path / "manifest.jsonl"
    build_manifest(flat_root, out, progress=False)
    import shutil

    shutil.rmtree(flat_root / "b")
    entries, _ = build_manifest(flat_root, out, progress=False)
    assert [e.name for e in entries] == ["a", "cls/c"]


def test_load_manifest_missing_file_error_or_warning(flat_root, tmp_path, caplog):
    out = tmp_path / "manifest.jsonl"
    build_manifest(flat_root, out, progress=False)
    import shutil

    shutil.rmtree(flat_root / "a")
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:1: video 'a' not found at .*data/a"):
        load_manifest(out)
    with caplog.at_level(logging.WARNING, logger="vidssl.data.manifest"):
        entries = load_manifest(out, missing="warn")
    assert [e.name for e in entries] == ["b", "cls/c"] and "video 'a' not found" in caplog.text


def test_load_manifest_malformed_lines_name_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    good = {"name": "x", "path": str(tmp_path), "kind": "frames", "num_frames": 3}
    p.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:2: invalid JSON"):
        load_manifest(p)
    p.write_text(json.dumps({**good, "num_frames": 0}) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:1: num_frames"):
        load_manifest(p)
    p.write_text(json.dumps({**good, "colour": "red"}) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:1: unknown field 'colour'"):
        load_manifest(p)
    p.write_text(json.dumps({**good, "shots": [[0, 9]]}) + "\n")
    with pytest.raises(ManifestError, match=r"shot \[0, 9\)"):
        load_manifest(p)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_manifest(tmp_path / "absent.jsonl")


def test_relative_paths_resolve_against_manifest_folder(tmp_path):
    write_frames(tmp_path / "vids" / "v", 2)
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"name": "v", "path": "vids/v", "kind": "frames", "num_frames": 2}) + "\n")
    (e,) = load_manifest(p)
    assert Path(e.path) == (tmp_path / "vids" / "v").resolve()


def test_davis_layout_and_splits(davis_root, tmp_path):
    entries, failures = build_manifest(davis_root, tmp_path / "m.jsonl", progress=False)
    assert [e.name for e in entries] == ["bear", "cows", "dog"] and not failures
    assert read_split(davis_root, "train") == ["cows", "bear"]  # the newest year wins
    assert read_split(davis_root, "2016/train") == ["bear", "cows", "dog"]
    assert [e.name for e in select_entries(entries, read_split(davis_root, "train"))] == ["cows", "bear"]
    with pytest.raises(ManifestError, match=r"split 'test' not found.*2017/train"):
        read_split(davis_root, "test")
    with pytest.raises(ManifestError, match="not indexed: zebra"):
        select_entries(entries, ["bear", "zebra"])


def test_davis2016_pair_list_format(tmp_path):
    root = tmp_path / "d16"
    (root / "ImageSets" / "480p").mkdir(parents=True)
    (root / "ImageSets" / "480p" / "train.txt").write_text(
        "/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png\n"
        "/JPEGImages/480p/bear/00001.jpg /Annotations/480p/bear/00001.png\n"
        "/JPEGImages/480p/cows/00000.jpg /Annotations/480p/cows/00000.png\n")
    assert read_split(root, "train") == ["bear", "cows"]


def test_video_files_are_indexed(tmp_path):
    root = tmp_path / "videos"
    frames = np.stack([np.full((24, 32, 3), 30 * k, dtype=np.uint8) for k in range(6)])
    write_video(root / "clip.mp4", frames, fps=10, codec="mpeg4")
    (root / "junk.mp4").write_bytes(b"\x00\x01 not a video")
    entries, failures = build_manifest(root, tmp_path / "m.jsonl", progress=False)
    (e,) = entries
    assert (e.name, e.kind, e.num_frames, e.height, e.width) == ("clip", "video", 6, 24, 32)
    assert e.fps == pytest.approx(10) and e.codec == "mpeg4"
    assert [Path(f["path"]).name for f in failures] == ["junk.mp4"]


def test_entry_roundtrip():
    e = VideoEntry(name="x", path="/p", kind="video", num_frames=10, fps=25.0, height=4, width=6, codec="h264",
                   duration=0.4, shots=[(0, 4), (4, 10)])
    assert VideoEntry.from_dict(json.loads(json.dumps(e.to_dict()))) == e


# ----------------------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_davis_sample_index(tmp_path, davis_sample):
    entries, failures = build_manifest(davis_sample, tmp_path / "davis.jsonl", progress=False)
    assert not failures and len(entries) == 12 and sum(e.num_frames for e in entries) == 712
    assert {(e.height, e.width, e.codec) for e in entries} == {(480, 854, "jpeg")}
    assert sorted(read_split(davis_sample, "sample")) == sorted(e.name for e in entries)


@pytest.mark.realdata
def test_real_videos_index(tmp_path, shared_videos):
    videos, failures = build_manifest(shared_videos, tmp_path / "videos.jsonl", progress=False)
    by_name = {e.name: e for e in videos}
    assert not failures and set(by_name) == {"bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"}
    assert (by_name["bigbuckbunny"].num_frames, by_name["bigbuckbunny"].width) == (132, 1280)
    assert (by_name["bikes"].num_frames, by_name["bikes"].height) == (250, 272)


def test_missing_backend_is_fatal_not_a_bad_file(tmp_path, monkeypatch):
    root = tmp_path / "v"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")

    def no_backend(path):
        raise ImportError("backend 'pyav' needs PyAV: pip install av")

    monkeypatch.setattr(M, "probe", no_backend)
    with pytest.raises(ImportError, match="pip install av"):
        build_manifest(root, tmp_path / "m.jsonl", progress=False)
