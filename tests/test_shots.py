"""Shot boundary detection (vidssl.data.shot_detect) and shots files (vidssl.data.shots)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vidssl.cli import main
from vidssl.data.manifest import ManifestError, VideoEntry, write_manifest
from vidssl.data.shot_detect import ContentParams, find_cuts, frame_features
from vidssl.data.shots import (
    content_cuts,
    detect_cuts,
    load_shots_file,
    process_source,
    read_scenedetect_csv,
    run_shots,
    shots_from_cuts,
)
from vidssl.data.synthetic import SynthConfig, generate_multishot, generate_video
from vidssl.io import write_video
from vidssl.io.readers import probe

CFG = SynthConfig(num_frames=24, height=64, width=80, seed=3)
BIKES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "videos" / "bikes.mp4"


def tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)


def cuts_of(frames: np.ndarray, **params) -> list[int]:
    return content_cuts(tensor(frames).split(16), ContentParams(**params))


def one_shot(frames: int = 40, pan: float = 1.0, seed: int = 0) -> np.ndarray:
    return generate_video(seed, replace(CFG, num_frames=frames, camera_pan=pan)).frames  # (T, H, W, 3)


def fade_through_black(a: np.ndarray, b: np.ndarray, fade: int, hold: int) -> np.ndarray:
    ramp = np.linspace(1.0, 0.0, fade + 2)[1:-1, None, None, None]            # (fade, 1, 1, 1)
    a, b = a.astype(np.float32), b.astype(np.float32)
    a[-fade:] *= ramp
    b[:fade] *= ramp[::-1]
    black = np.zeros((hold, *a.shape[1:]), np.float32)
    return np.concatenate([a, black, b]).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ the detector

def test_finds_known_cuts(one_thread):
    for i in range(3):
        video = generate_multishot(i, CFG, num_shots=4)
        assert cuts_of(video.frames) == video.cuts, f"video {i}"


def test_no_cut_inside_a_fast_pan_or_in_a_still_shot(one_thread):
    assert cuts_of(one_shot(60, pan=4.0)) == []
    still = np.repeat(one_shot(1), 30, axis=0)
    assert cuts_of(still) == []


def test_single_frame_flash_is_not_a_cut(one_thread):
    frames = one_shot(40)
    frames[20] = np.clip(frames[20].astype(np.int16) + 150, 0, 255).astype(np.uint8)
    assert cuts_of(frames) == []
    # without the flash rule the flash is a cut: the rule is what removes it
    assert cuts_of(frames, flash_len=0) != []


def test_fade_through_black_is_one_cut_in_its_span(one_thread):
    a, b = one_shot(30, seed=1), one_shot(30, seed=2)
    for hold in (0, 3):
        frames = fade_through_black(a, b, fade=8, hold=hold)
        cuts = cuts_of(frames)
        assert len(cuts) == 1, (hold, cuts)
        assert 30 - 8 <= cuts[0] <= 30 + hold + 8
    # fade-in from black at the start and fade-out to black at the end: no boundary
    dark = np.zeros((10, *a.shape[1:]), np.uint8)
    assert cuts_of(fade_through_black(dark, a, fade=1, hold=3)) == []
    assert cuts_of(fade_through_black(a, dark, fade=8, hold=3)) == []


def test_features_and_thresholds_are_shaped_and_bounded(one_thread):
    frames = tensor(generate_multishot(0, CFG, num_shots=2).frames)
    p = ContentParams(bins=8, grid=3)
    hist, luma = frame_features(frames, p)
    assert hist.shape == (frames.shape[0], 27, 8) and luma.shape == (frames.shape[0],)
    torch.testing.assert_close(hist.sum(-1), torch.ones(frames.shape[0], 27))
    b = find_cuts(hist, luma, p)
    assert float(b.distances.max()) <= 1.0 and float(b.thresholds.min()) >= p.min_threshold


def test_params_validate_names_the_key():
    from vidssl.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="detector.bins"):
        from_dict(ContentParams, {"bins": 1}, prefix="detector")
    with pytest.raises(ConfigError, match="detector.colour"):
        from_dict(ContentParams, {"colour": "lab"}, prefix="detector")


@pytest.mark.skipif(not BIKES.is_file(), reason="shared bikes.mp4 not present")
def test_bikes_real_cuts(one_thread):
    rec = process_source(type("S", (), {"path": str(BIKES), "shots": None})())
    assert rec["cuts"] == [30, 76, 137, 187, 242]


def test_pyscenedetect_behind_the_same_function(one_thread):
    pytest.importorskip("scenedetect")
    video = generate_multishot(0, replace(CFG, num_frames=40), num_shots=3)
    assert detect_cuts(tensor(video.frames).split(16), "pyscenedetect") == video.cuts


# -------------------------------------------------------------------------------------------------- shots files

@pytest.fixture
def videos(tmp_path):
    """Two multi-shot mp4s, one single-shot mp4 and a corrupt file."""
    paths = {}
    for i in range(2):
        v = generate_multishot(i, CFG, num_shots=3)
        paths[f"multi{i}"] = (write_video(tmp_path / "v" / f"multi{i}.mp4", v.frames, fps=25), v.cuts)
    paths["single"] = (write_video(tmp_path / "v" / "single.mp4", one_shot(30), fps=25), [])
    bad = tmp_path / "v" / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    paths["broken"] = (bad, None)
    return paths


class Counting:
    """process_source that counts the videos it is asked for and can raise on the n-th call."""

    def __init__(self, raise_at: int | None = None):
        self.calls, self.raise_at = [], raise_at

    def __call__(self, src, *args, **kwargs):
        self.calls.append(src.path)
        if self.raise_at is not None and len(self.calls) == self.raise_at:
            raise KeyboardInterrupt
        return process_source(src, *args, **kwargs)


def test_shots_file_round_trip_resume_and_failures(tmp_path, videos, one_thread):
    out = tmp_path / "shots.jsonl"
    first = Counting()
    summary = run_shots([tmp_path / "v"], out, workers=2, progress=False, process=first)
    assert len(first.calls) == 4
    by_name = {Path(r["path"]).stem: r for r in summary.records}
    for name in ("multi0", "multi1", "single"):
        path, cuts = videos[name]
        rec = by_name[name]
        assert rec["cuts"] == cuts and rec["shots"] == shots_from_cuts(cuts, rec["num_frames"])
        assert rec["fps"] == 25.0 and rec["detector"]["name"] == "content"
    assert by_name["single"]["shots"] == [[0, 30]]
    assert [Path(f["path"]).name for f in summary.failures] == ["broken.mp4"]
    assert summary.failures[0]["error"]
    lines = load_shots_file(out)
    assert sorted(lines, key=lambda r: r["path"]) == sorted(summary.records + summary.failures,
                                                            key=lambda r: r["path"])
    second = Counting()
    again = run_shots([tmp_path / "v"], out, progress=False, process=second)
    assert second.calls == [str(videos["broken"][0].resolve())]  # only the failure is retried
    assert again.skipped == 3 and again.records == summary.records


def test_interrupted_run_leaves_a_valid_file_and_resumes(tmp_path, videos, one_thread):
    out = tmp_path / "shots.jsonl"
    inputs = [videos[n][0] for n in ("multi0", "multi1", "single")]
    with pytest.raises(KeyboardInterrupt):
        run_shots(inputs, out, workers=1, progress=False, save_every_s=1e9, process=Counting(raise_at=2))
    saved = load_shots_file(out)  # valid JSONL holding the finished video
    assert len(saved) == 1 and "shots" in saved[0]
    rest = Counting()
    summary = run_shots(inputs, out, workers=1, progress=False, process=rest)
    assert len(rest.calls) == 2 and saved[0]["path"] not in rest.calls
    assert len(summary.records) == 3 and len(load_shots_file(out)) == 3
    nothing = Counting()
    assert run_shots(inputs, out, progress=False, process=nothing).skipped == 3 and nothing.calls == []


def test_manifest_shots_are_taken_as_given(tmp_path, videos):
    path, _ = videos["multi0"]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [VideoEntry(name="m0", path=str(path), kind="video", num_frames=40, fps=25.0,
                                         shots=[(0, 7), (7, 40)])])
    calls = Counting()
    rec = run_shots([manifest], tmp_path / "s.jsonl", progress=False, process=calls).records[0]
    assert rec["shots"] == [[0, 7], [7, 40]] and rec["cuts"] == [7]
    assert rec["detector"]["name"] == "manifest"


SCENES_CSV = """Timecode List:,00:00:01.200,00:00:02.400
Scene Number,Start Frame,Start Timecode,Start Time (seconds),End Frame,End Timecode,End Time (seconds),Length (frames),Length (timecode),Length (seconds)
1,1,00:00:00.000,0.000,30,00:00:01.200,1.200,30,00:00:01.200,1.200
2,31,00:00:01.200,1.200,60,00:00:02.400,2.400,30,00:00:01.200,1.200
3,61,00:00:02.400,2.400,72,00:00:02.880,2.880,12,00:00:00.480,0.480
"""


def test_pyscenedetect_csv(tmp_path, videos):
    csv_path = tmp_path / "a-Scenes.csv"
    csv_path.write_text(SCENES_CSV)
    assert read_scenedetect_csv(csv_path) == [(0, 30), (30, 60), (60, 72)]
    no_timecodes = tmp_path / "b.csv"
    no_timecodes.write_text(SCENES_CSV.split("\n", 1)[1])
    assert read_scenedetect_csv(no_timecodes) == [(0, 30), (30, 60), (60, 72)]
    bad = tmp_path / "c.csv"
    bad.write_text("Scene Number,Start Frame\n1,1\n")
    with pytest.raises(ManifestError, match=r"c\.csv:1: no 'End Frame' column"):
        read_scenedetect_csv(bad)
    bad.write_text("Scene Number,Start Frame,End Frame\n1,1,30\n2,x,40\n")
    with pytest.raises(ManifestError, match=r"c\.csv:3"):
        read_scenedetect_csv(bad)
    # beside a video (<stem>-Scenes.csv) it replaces detection
    path, _ = videos["single"]
    (path.parent / "single-Scenes.csv").write_text("Scene Number,Start Frame,End Frame\n1,1,12\n2,13,30\n")
    rec = run_shots([path], tmp_path / "s.jsonl", progress=False).records[0]
    assert rec["cuts"] == [12] and rec["detector"]["name"] == "pyscenedetect-csv"


def test_cli_data_shots(tmp_path, videos, capsys):
    out = tmp_path / "cli.jsonl"
    path, cuts = videos["multi1"]
    assert main(["data", "shots", str(path), str(videos["broken"][0]), "--out", str(out), "--no-progress",
                 "--set", "k=3"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x.get("cuts") for x in lines if "cuts" in x] == [cuts]
    assert "1 failed" in capsys.readouterr().out
    assert main(["data", "shots", str(path), "--out", str(out), "--set", "bins=1"]) == 2
    assert "detector.bins" in capsys.readouterr().err


def test_cli_manifest_out_feeds_the_shots_sampler(tmp_path, videos):
    from vidssl.data.manifest import load_manifest

    path, cuts = videos["multi0"]
    manifest = tmp_path / "m.jsonl"
    n = probe(path)["num_frames"]
    write_manifest(manifest, [VideoEntry(name="m0", path=str(path), kind="video", num_frames=n, fps=25.0)])
    out = tmp_path / "with_shots.jsonl"
    assert main(["data", "shots", str(manifest), "--out", str(tmp_path / "s.jsonl"), "--manifest-out", str(out),
                 "--no-progress"]) == 0
    entry = load_manifest(out)[0]
    assert [a for a, _ in entry.shots[1:]] == cuts and entry.shots[-1][1] == n
    write_manifest(manifest, [VideoEntry(name="m0", path=str(path), kind="video", num_frames=n + 5)])
    assert main(["data", "shots", str(manifest), "--out", str(tmp_path / "s.jsonl"), "--manifest-out", str(out),
                 "--no-progress"]) == 2  # a stale frame count is named, not written
    assert main(["data", "shots", str(path), "--out", str(tmp_path / "t.jsonl"), "--manifest-out", str(out)]) == 2
