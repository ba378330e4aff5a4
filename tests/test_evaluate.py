"""DAVIS layout reading and the semi-supervised evaluator on tiny trees made in tmp_path, plus a real-data check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidssl.data.davis import (
    DavisLayoutError,
    annotation_paths,
    frame_paths,
    load_annotations,
    read_sequence_list,
)
from vidssl.evaluation import metrics as M
from vidssl.evaluation import metrics_reference as R
from vidssl.evaluation.evaluate import (
    GLOBAL_COLUMNS,
    ResultsError,
    evaluate_results,
    format_table,
    write_csvs,
)
from vidssl.io.images import write_label_png

H, W = 24, 33  # odd width on purpose


def _write_l(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def make_tree(root: Path, seqs: dict[str, np.ndarray], *, year: str = "2017", split: str = "val",
              frames: bool = True) -> Path:
    """A DAVIS tree: ``seqs[name]`` is ``(T, H, W)`` ids (2017: palette PNGs; 2016: 0/255 'L' PNGs of ids > 0)."""
    for name, ids in seqs.items():
        for t, m in enumerate(ids):
            ann = root / "Annotations" / "480p" / name / f"{t:05d}.png"
            if year == "2016":
                _write_l(ann, np.where(m > 0, 255, 0))
            else:
                write_label_png(ann, m)
            if frames:
                jpg = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
                jpg.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full(m.shape + (3,), 128, np.uint8)).save(jpg)
    sets = root / "ImageSets" / year
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in seqs))
    return root


def write_results(folder: Path, name: str, ids: np.ndarray, *, frames: range | None = None) -> None:
    for t in (range(len(ids)) if frames is None else frames):
        write_label_png(folder / name / f"{t:05d}.png", ids[t])


def box(t: int, boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """(T, H, W) ids with object k filling rows y0..y1-1, cols x0..x1-1 in every frame."""
    ids = np.zeros((t, H, W), np.uint8)
    for k, (y0, y1, x0, x1) in boxes.items():
        ids[:, y0:y1, x0:x1] = k
    return ids


@pytest.fixture
def two_seq(tmp_path):
    """Sequence A: 2 objects, B: 1 object; 5 frames each (3 scored)."""
    a = box(5, {1: (2, 8, 2, 9), 2: (12, 20, 15, 27)})
    b = box(5, {1: (4, 14, 5, 20)})
    root = make_tree(tmp_path / "davis", {"A": a, "B": b})
    return root, a, b


# ---------------------------------------------------------------- layout


def test_sequence_lists(tmp_path):
    root = make_tree(tmp_path / "d", {"bear": box(3, {1: (1, 5, 1, 5)}), "cows": box(3, {1: (1, 5, 1, 5)})})
    assert read_sequence_list(root) == ["bear", "cows"]
    assert read_sequence_list(root, sequences=["cows", "cows"]) == ["cows"]
    with pytest.raises(FileNotFoundError, match="zebra"):
        read_sequence_list(root, sequences=["bear", "zebra"])
    with pytest.raises(FileNotFoundError, match=r"ImageSets/2017/train\.txt.*ImageSets/2017/val\.txt"):
        read_sequence_list(root, split="train")
    # DAVIS-2016 original pair-line format in ImageSets/480p
    pairs = root / "ImageSets" / "480p" / "trainval.txt"
    pairs.parent.mkdir(parents=True)
    pairs.write_text("/JPEGImages/480p/cows/00000.jpg /Annotations/480p/cows/00000.png\n"
                     "/JPEGImages/480p/cows/00001.jpg /Annotations/480p/cows/00001.png\n"
                     "/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png\n")
    assert read_sequence_list(root, year="2016", split="trainval") == ["cows", "bear"]
    (root / "ImageSets" / "2016").mkdir()
    (root / "ImageSets" / "2016" / "sample.txt").write_text("bear\n\n")
    assert read_sequence_list(root, year="2016", split="sample") == ["bear"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sequence_list(tmp_path / "nowhere")


def test_paths_sorted_and_missing(tmp_path):
    root = make_tree(tmp_path / "d", {"bear": box(12, {1: (1, 5, 1, 5)})})
    fp = frame_paths(root, "bear")
    ap = annotation_paths(root, "bear")
    assert [p.name for p in fp] == [f"{t:05d}.jpg" for t in range(12)]
    assert [p.stem for p in ap] == [p.stem for p in fp]
    with pytest.raises(FileNotFoundError, match="JPEGImages/480p/cows"):
        frame_paths(root, "cows")
    with pytest.raises(FileNotFoundError, match="Annotations/Full-Resolution/bear"):
        annotation_paths(root, "bear", resolution="Full-Resolution")


def test_load_annotations_2017_void_and_objects(tmp_path):
    ids = box(4, {1: (1, 5, 1, 5), 2: (8, 12, 8, 12)})
    ids[:, 15:18, 20:25] = 255  # void
    ids[2:, 20:22, 1:3] = 3  # object absent from the first frame
    root = make_tree(tmp_path / "d", {"s": ids})
    with pytest.warns(UserWarning, match="beyond the 2 object"):
        m = load_annotations(root, "s")
    assert m.num_objects == 2
    assert m.void[:, 15:18, 20:25].all() and m.void.sum() == 4 * 15
    assert (m.ids[m.void] == 0).all()
    assert m.palette is not None and m.palette[3:6] == [128, 0, 0]
    assert m.unexpected_ids == {"00002.png": [3], "00003.png": [3]}
    assert m.stems == ["00000", "00001", "00002", "00003"] and m.size == (H, W)
    with pytest.raises(DavisLayoutError, match="00002.png has \\[3\\]"):
        load_annotations(root, "s", strict=True)
    first = load_annotations(root, "s", first_only=True)
    assert first.ids.shape == (1, H, W) and first.num_objects == 2


def test_load_annotations_2016(tmp_path):
    ids = box(3, {1: (1, 5, 1, 5)})
    root = make_tree(tmp_path / "d", {"s": ids}, year="2016")
    m = load_annotations(root, "s", year="2016")
    assert m.num_objects == 1 and m.palette is None
    assert np.array_equal(m.ids, ids) and not m.void.any()
    with pytest.raises(DavisLayoutError, match="year '2016'"):
        load_annotations(root, "s", year="2017")
    # annotations without a JPEGImages folder (GT-only trees) load without the frame checks
    gt_only = make_tree(tmp_path / "gt_only", {"s": ids}, year="2016", frames=False)
    assert np.array_equal(load_annotations(gt_only, "s", year="2016").ids, ids)
    # multi-object palette masks are refused under the single-object 2016 rules
    multi = make_tree(tmp_path / "multi", {"s": box(3, {1: (1, 5, 1, 5), 2: (8, 12, 8, 12)})})
    with pytest.raises(DavisLayoutError, match="year '2017'"):
        load_annotations(multi, "s", year="2016")


def test_load_annotations_validation(tmp_path):
    root = make_tree(tmp_path / "d", {"s": box(3, {1: (1, 5, 1, 5)})})
    ann = root / "Annotations" / "480p" / "s"
    # one frame more than annotations
    extra = root / "JPEGImages" / "480p" / "s" / "00003.jpg"
    shutil.copy(extra.with_name("00000.jpg"), extra)
    with pytest.raises(DavisLayoutError, match="3 annotation PNGs but 4 frames"):
        load_annotations(root, "s")
    extra.unlink()
    # mask size differs from the JPEG
    big = root / "JPEGImages" / "480p" / "s" / "00000.jpg"
    Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)).save(big)
    with pytest.raises(DavisLayoutError, match=r"00000.png: mask is 33x24 .* is 33x26"):
        load_annotations(root, "s")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(big)
    # a later mask of another size
    write_label_png(ann / "00002.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(DavisLayoutError, match="00002.png: mask is 34x24"):
        load_annotations(root, "s")
    # unreadable PNG
    (ann / "00002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="00002.png"):
        load_annotations(root, "s")
    with pytest.raises(ValueError, match="year"):
        load_annotations(root, "s", year="2019")


# ---------------------------------------------------------------- evaluation


def test_per_object_aggregation_and_csvs(two_seq, tmp_path):
    root, a, b = two_seq
    res = tmp_path / "res"
    pred_a = a.copy()
    pred_a[a == 2] = 0  # object 2 of A never predicted -> J = F = 0; K_res = 1 < K = 2 is zero-padded
    write_results(res, "A", pred_a)
    write_results(res, "B", b)
    # stale CSVs from an earlier run must be replaced, never read back
    (res / "global_results-val.csv").write_text("stale\n")
    result = evaluate_results(root, res, progress=False)
    assert list(result.per_object) == ["A_1", "A_2", "B_1"]
    assert result.num_scored_frames == 6
    np.testing.assert_array_equal(result.per_object["A_1"]["J"], [1, 1, 1])
    np.testing.assert_array_equal(result.per_object["A_2"]["J"], [0, 0, 0])
    np.testing.assert_array_equal(result.per_object["A_2"]["F"], [0, 0, 0])
    # mean over the 3 objects (2/3), not over the 2 sequences ((0.5 + 1) / 2 = 0.75)
    g = result.global_row
    assert list(g) == list(GLOBAL_COLUMNS)
    assert g["J-Mean"] == pytest.approx(2 / 3) and g["F-Mean"] == pytest.approx(2 / 3)
    assert g["J&F-Mean"] == pytest.approx(2 / 3) and g["J-Recall"] == pytest.approx(2 / 3)
    assert g["J-Decay"] == 0.0 and g["F-Decay"] == 0.0
    gp, sp = write_csvs(result, res, "val")
    assert gp.read_text() == ("J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
                              "0.667,0.667,0.667,0.000,0.667,0.667,0.000\n")
    assert sp.read_text() == "Sequence,J-Mean,F-Mean\nA_1,1.000,1.000\nA_2,0.000,0.000\nB_1,1.000,1.000\n"
    table = format_table(result)
    assert "Global results for val" in table and "A_2" in table and "J&F-Mean" in table
    assert result.to_json_dict()["per_object"]["A_2"]["J"] == [0.0, 0.0, 0.0]


def test_first_and_last_frames_not_scored_and_void_not_used(tmp_path):
    gt = box(5, {1: (4, 12, 4, 16)})
    gt[:, 14:20, 4:16] = 255  # void band below the object
    root = make_tree(tmp_path / "d", {"s": gt})
    pred = box(5, {1: (4, 12, 4, 16)})
    pred[:, 14:20, 4:16] = 1  # predicting the void band as object is penalised (upstream passes void=None)
    res = tmp_path / "res"
    write_results(res, "s", pred, frames=range(1, 4))  # no 00000.png and no 00004.png: never read
    r = evaluate_results(root, res, progress=False)
    j = r.per_object["s_1"]["J"]
    assert j.shape == (3,)
    np.testing.assert_allclose(j, 96 / (96 + 72))  # object 8x12 = 96 px, void band 6x12 = 72 px


def test_result_errors(two_seq, tmp_path):
    root, a, b = two_seq
    res = tmp_path / "res"
    write_results(res, "A", a)
    write_results(res, "B", b)
    # an id above the sequence's objects
    bad = b[2].copy()
    bad[0, 0] = 2
    write_label_png(res / "B" / "00002.png", bad)
    with pytest.raises(ResultsError, match=r"B/00002.png: object id 2 .* 'B' has only 1"):
        evaluate_results(root, res, progress=False)
    write_label_png(res / "B" / "00002.png", b[2])
    # an RGB colour PNG
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(res / "B" / "00001.png")
    with pytest.raises(ResultsError, match=r"B/00001.png.*'RGB'"):
        evaluate_results(root, res, progress=False)
    write_label_png(res / "B" / "00001.png", b[1])
    # a wrong size
    write_label_png(res / "B" / "00003.png", np.zeros((H, W - 1), np.uint8))
    with pytest.raises(ResultsError, match="B/00003.png: result is 32x24"):
        evaluate_results(root, res, progress=False)
    # a missing frame
    (res / "B" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"B/00003.png"):
        evaluate_results(root, res, progress=False)
    with pytest.raises(FileNotFoundError, match="results folder"):
        evaluate_results(root, tmp_path / "nothing", progress=False)
    shutil.rmtree(res / "A")
    with pytest.raises(FileNotFoundError, match=r"results folder .*A for sequence 'A'"):
        evaluate_results(root, res, progress=False)


def test_year_2016_results_palette_or_grey(tmp_path):
    gt = box(6, {1: (3, 15, 5, 25)})
    root = make_tree(tmp_path / "d", {"s": gt}, year="2016", split="sample")
    shifted = np.roll(gt, 2, axis=2)
    res_p, res_l = tmp_path / "p", tmp_path / "l"
    write_results(res_p, "s", shifted)  # palette ids 0/1
    for t in range(6):
        _write_l(res_l / "s" / f"{t:05d}.png", np.where(shifted[t] > 0, 255, 0))  # grey 0/255
    rp = evaluate_results(root, res_p, year="2016", split="sample", progress=False)
    rl = evaluate_results(root, res_l, year="2016", split="sample", progress=False)
    np.testing.assert_array_equal(rp.per_object["s_1"]["J"], rl.per_object["s_1"]["J"])
    np.testing.assert_array_equal(rp.per_object["s_1"]["J"], M.db_eval_iou(gt[1:-1] > 0, shifted[1:-1] > 0))
    # the 0/255 results under 2017 rules: id 255 is an error that points at --year 2016
    root17 = make_tree(tmp_path / "d17", {"s": gt})
    with pytest.raises(ResultsError, match="year '2016'"):
        evaluate_results(root17, res_l, progress=False)


def test_vectorised_equals_reference_evaluator(tmp_path):
    rng = np.random.default_rng(0)
    seqs, preds = {}, {}
    for name in ("x", "y"):
        lo = rng.integers(0, 4, size=(7, H // 4 + 1, W // 4 + 1))
        ids = np.repeat(np.repeat(lo, 4, axis=1), 4, axis=2)[:, :H, :W].astype(np.uint8)
        ids[0, :2, :2] = 3  # make sure frame 0 holds K = 3
        seqs[name] = ids
        preds[name] = np.where(rng.random(ids.shape) < 0.1, rng.integers(0, 4, ids.shape), ids).astype(np.uint8)
    root = make_tree(tmp_path / "d", seqs)
    res = tmp_path / "res"
    for name, p in preds.items():
        write_results(res, name, p)
    fast = evaluate_results(root, res, progress=False)
    ref = evaluate_results(root, res, progress=False, implementation="reference")
    assert list(fast.per_object) == [f"{n}_{k}" for n in ("x", "y") for k in (1, 2, 3)]
    for key, rec in fast.per_object.items():
        np.testing.assert_array_equal(rec["J"], ref.per_object[key]["J"])
        np.testing.assert_array_equal(rec["F"], ref.per_object[key]["F"])
    for c in GLOBAL_COLUMNS:
        assert fast.global_row[c] == pytest.approx(ref.global_row[c], abs=1e-12)


# ---------------------------------------------------------------- real data (skipped when absent)


@pytest.mark.realdata
def test_real_davis2016_sample(tmp_path, davis_sample):
    root = davis_sample
    seqs = ["dog-agility", "rollerblade"]
    assert set(seqs) <= set(read_sequence_list(root, year="2016", split="sample"))
    gt_res, first_res = tmp_path / "gt", tmp_path / "first"
    for s in seqs:
        for p in annotation_paths(root, s):
            (gt_res / s).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, gt_res / s / p.name)  # the 0/255 'L' GT itself as the result
        m = load_annotations(root, s, year="2016")
        assert m.size == (480, 854) and m.num_objects == 1
        write_results(first_res, s, np.repeat(m.ids[:1], m.num_frames, axis=0))
    perfect = evaluate_results(root, gt_res, year="2016", sequences=seqs, progress=False)
    assert perfect.num_scored_frames == (25 - 2) + (35 - 2)
    for c in GLOBAL_COLUMNS:
        assert perfect.global_row[c] == (0.0 if c.endswith("Decay") else 1.0)
    copy = evaluate_results(root, first_res, year="2016", sequences=seqs, progress=False)
    for s in seqs:
        m = load_annotations(root, s, year="2016")
        gt = m.ids[1:-1] == 1
        first = np.repeat(m.ids[:1] == 1, len(gt), axis=0)
        np.testing.assert_array_equal(copy.per_object[f"{s}_1"]["J"], R.db_eval_iou(gt, first))
    m = load_annotations(root, "dog-agility", year="2016")
    gt = m.ids[1:-1] == 1
    first = np.repeat(m.ids[:1] == 1, len(gt), axis=0)
    np.testing.assert_array_equal(copy.per_object["dog-agility_1"]["F"], R.db_eval_boundary(gt, first))
    assert 0.0 < copy.global_row["J-Mean"] < 1.0 and 0.0 < copy.global_row["F-Mean"] < 1.0
