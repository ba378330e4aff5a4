"""tools/make_shot_manifest.py: DAVIS pseudo-shot segments from a first-segment offset, --offsets entries."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tool_module import load_tool
from vidssl.data.manifest import load_manifest



def _tool():
    """tools/make_shot_manifest.py as a module."""
    return load_tool("make_shot_manifest")


def _davis(root: Path, name: str, n: int) -> Path:
    """A DAVIS-layout root with one sequence of ``n`` small JPEG frames."""
    seq = root / "JPEGImages" / "480p" / name
    seq.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((12, 16, 3), 10 * i, np.uint8)).save(seq / f"{i:05d}.jpg")
    return root


def test_segment_shots_start_at_the_offset():
    seg = _tool().segment_shots
    assert seg(25, 8, 2) == [(2, 10), (10, 18)]  # (18, 26) runs past frame 25: dropped
    assert seg(25, 8) == seg(25, 8, 0) == [(0, 8), (8, 16), (16, 24)]
    assert seg(23, 8, 7) == [(7, 15), (15, 23)] and seg(22, 8, 7) == [(7, 15)]  # 23 frames: (15, 23) just fits
    with pytest.raises(ValueError, match="offsets"):
        seg(25, 8, -1)


def test_offsets_write_one_entry_per_offset(tmp_path, capsys):
    root = _davis(tmp_path / "davis", "seqA", 20)
    out = tmp_path / "m" / "shots.jsonl"
    assert _tool().main(["--out", str(out), "--davis-root", str(root), "--sequences", "seqA", "--segment", "8",
                         "--offsets", "4,0"]) == 0
    entries = load_manifest(out)
    assert [e.name for e in entries] == ["seqA@0", "seqA@4"]
    assert [[tuple(s) for s in e.shots] for e in entries] == [[(0, 8), (8, 16)], [(4, 12), (12, 20)]]
    assert {e.num_frames for e in entries} == {20} and {Path(e.path).name for e in entries} == {"seqA"}
    one = tmp_path / "one.jsonl"  # default --offsets 0: the entry keeps the sequence's name
    assert _tool().main(["--out", str(one), "--davis-root", str(root), "--segment", "8"]) == 0
    assert [(e.name, [tuple(s) for s in e.shots]) for e in load_manifest(one)] == [("seqA", [(0, 8), (8, 16)])]
    capsys.readouterr()
    for bad in ("8", "-1,0", "0,x"):
        with pytest.raises(SystemExit) as exc:
            _tool().main(["--out", str(tmp_path / "bad.jsonl"), "--davis-root", str(root), "--segment", "8",
                          "--offsets", bad])
        assert exc.value.code == 2 and "--offsets" in capsys.readouterr().err, bad
    assert not (tmp_path / "bad.jsonl").exists()


def test_an_offset_with_no_whole_segment_is_left_out(tmp_path, capsys):
    root = _davis(tmp_path / "davis", "seqA", 20)
    out = tmp_path / "shots.jsonl"
    assert _tool().main(["--out", str(out), "--davis-root", str(root), "--segment", "16", "--offsets", "0,5"]) == 0
    assert [(e.name, [tuple(s) for s in e.shots]) for e in load_manifest(out)] == [("seqA@0", [(0, 16)])]
    assert "seqA@5: no whole segment of 16 frames from frame 5; left out" in capsys.readouterr().err
