"""DAVIS J / F / statistics: hand-computed cases, the upstream void test, and fast == per-frame reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vidssl.evaluation import metrics as M
from vidssl.evaluation import metrics_reference as R


def _frames(*masks: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(m, dtype=bool) for m in masks])


def _square(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(H, W) bool with rows y0..y1-1, columns x0..x1-1 set."""
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _blobs(rng: np.random.Generator, t: int, h: int, w: int, *, cell: int = 6, noise: float = 0.0) -> np.ndarray:
    """Random blob masks: thresholded block noise (optionally speckled)."""
    lo = rng.random((t, h // cell + 1, w // cell + 1))
    up = np.repeat(np.repeat(lo, cell, axis=1), cell, axis=2)[:, :h, :w]
    return (up + noise * rng.random((t, h, w))) > 0.7


# ---------------------------------------------------------------- boundaries


def test_seg2bmap_square_is_ring_shifted_towards_origin():
    # 2x2 square at rows/cols 1..2: every pixel differing from its E, S or SE neighbour -> the 3x3 ring at rows/cols
    # 0..2 without its centre (1, 1) (worked out pixel by pixel from the rule).
    m = _square(6, 6, 1, 3, 1, 3)
    expected = np.zeros((6, 6), dtype=bool)
    expected[0:3, 0:3] = True
    expected[1, 1] = False
    b = M.seg2bmap(m[None])[0]
    assert np.array_equal(b, expected)
    assert b.sum() == 8


def test_seg2bmap_border_is_never_a_boundary():
    # left half of a 4x6 image: only the inner edge (column 2, S != E there) is a boundary, in every row including
    # the last one; nothing along the left, top or bottom border.
    m = _square(4, 6, 0, 4, 0, 3)
    b = M.seg2bmap(m[None])[0]
    expected = np.zeros((4, 6), dtype=bool)
    expected[:, 2] = True
    assert np.array_equal(b, expected)
    # an object filling the whole frame has no boundary at all
    assert not M.seg2bmap(np.ones((1, 5, 7), dtype=bool)).any()
    # bottom-right pixel alone: the last-row rule (vs east) and last-column rule (vs south) exclude it
    corner = np.zeros((1, 4, 4), dtype=bool)
    corner[0, 3, 3] = True
    expected = np.zeros((4, 4), dtype=bool)
    expected[3, 2] = True  # last row, differs from its east neighbour
    expected[2, 3] = True  # last column, differs from its south neighbour
    expected[2, 2] = True  # interior, differs from its south-east neighbour
    assert np.array_equal(M.seg2bmap(corner)[0], expected)


def test_seg2bmap_leading_axes_and_degenerate_sizes():
    rng = np.random.default_rng(3)
    m = rng.random((2, 3, 7, 5)) > 0.5
    b = M.seg2bmap(m)
    assert b.shape == m.shape
    assert np.array_equal(b.reshape(6, 7, 5), R.seg2bmap(m.reshape(6, 7, 5)))
    for shape in [(2, 1, 9), (2, 9, 1), (1, 1, 1)]:
        x = rng.random(shape) > 0.5
        assert np.array_equal(M.seg2bmap(x), R.seg2bmap(x))


# ---------------------------------------------------------------- J


def test_iou_hand_cases():
    empty = np.zeros((5, 5), dtype=bool)
    sq = _square(5, 5, 1, 3, 1, 3)  # 4 px
    wide = _square(5, 5, 1, 3, 1, 4)  # 6 px containing sq
    j = M.db_eval_iou(_frames(empty, empty, sq, sq), _frames(empty, sq, empty, wide))
    np.testing.assert_array_equal(j, [1.0, 0.0, 0.0, 4 / 6])


def test_upstream_void_test():
    # upstream pytest/test_evaluation.py::test_void_masks: GT rows 100-149 x cols 100-149, void rows 50-99 x cols
    # 100-149, prediction rows 50-149 x cols 100-149 -> J = F = 1 when the void is honoured.
    gt = _square(200, 200, 100, 150, 100, 150)[None]
    void = _square(200, 200, 50, 100, 100, 150)[None]
    pred = _square(200, 200, 50, 150, 100, 150)[None]
    assert M.db_eval_iou(gt, pred, void)[0] == 1.0
    assert M.db_eval_boundary(gt, pred, void)[0] == 1.0
    # without the void mask the prediction is twice the GT: J = 2500 / 5000
    assert M.db_eval_iou(gt, pred)[0] == 0.5
    assert M.db_eval_boundary(gt, pred)[0] < 1.0


# ---------------------------------------------------------------- F


def test_bound_pix_davis_resolutions():
    assert M.bound_pix(480, 854) == 8  # ceil(0.008 * 979.7)
    assert M.bound_pix(480, 910) == 9  # ceil(0.008 * 1028.8)
    assert M.bound_pix(480, 1152) == 10  # ceil(0.008 * 1248.0)
    assert M.bound_pix(480, 854, bound_th=3) == 3
    with pytest.raises(ValueError, match="whole number"):
        M.bound_pix(10, 10, bound_th=2.5)
    with pytest.raises(ValueError, match="bound_th"):
        M.bound_pix(10, 10, bound_th=0)


def test_boundary_edge_cases():
    h, w = 12, 12
    empty = np.zeros((h, w), dtype=bool)
    sq = _square(h, w, 3, 7, 3, 7)
    full = np.ones((h, w), dtype=bool)
    f = M.db_eval_boundary(_frames(empty, empty, sq, sq, full), _frames(empty, sq, empty, sq, empty))
    # empty/empty: P = R = 1; GT empty, pred not: P = 0, R = 1 -> 0; pred empty: P = 1, R = 0 -> 0; identical: 1;
    # full-frame GT vs empty prediction: neither has a boundary (the border never is one) -> 1, while J = 0.
    np.testing.assert_array_equal(f, [1.0, 0.0, 0.0, 1.0, 1.0])
    assert M.db_eval_iou(full[None], empty[None])[0] == 0.0


def test_boundary_partial_match_by_hand():
    # GT 2x2 square at rows 1-2, cols 1-2 -> ring at rows 0-2, cols 0-2 (8 px). Prediction shifted 3 columns right
    # -> ring at cols 3-5 (8 px). bound_th=1 -> disk(1) = the pixel and its 4 neighbours: only the 3 pixels of
    # prediction column 3 touch GT column 2 and vice versa, so P = R = 3/8 and F = 2PR/(P+R) = 3/8.
    gt = _square(6, 10, 1, 3, 1, 3)
    pred = _square(6, 10, 1, 3, 4, 6)
    f = M.db_eval_boundary(gt[None], pred[None], bound_th=1)
    assert f[0] == pytest.approx(3 / 8, abs=1e-15)
    # one column further apart nothing is within 1 px (P = R = 0 -> F = 0); with 2 px the 3 + 3 pixels match again
    far = _square(6, 10, 1, 3, 5, 7)
    assert M.db_eval_boundary(gt[None], far[None], bound_th=1)[0] == 0.0
    assert M.db_eval_boundary(gt[None], far[None], bound_th=2)[0] == pytest.approx(3 / 8, abs=1e-15)


def test_f_from_counts_formula():
    f = M.f_from_counts(np.array([4, 0, 3, 0]), np.array([2, 5, 0, 0]), np.array([2, 0, 0, 0]), np.array([1, 0, 0, 0]))
    p, r = 2 / 4, 1 / 2
    np.testing.assert_array_equal(f, [2 * p * r / (p + r), 0.0, 0.0, 1.0])


def test_disk_half_widths_is_the_euclidean_disk():
    for r in range(0, 13):
        half = M.disk_half_widths(r)
        footprint = np.array([[abs(dx) <= half[abs(dy)] for dx in range(-r, r + 1)] for dy in range(-r, r + 1)])
        assert np.array_equal(footprint, R.disk(r))
    assert M.disk_half_widths(8) == [8, 7, 7, 7, 6, 6, 5, 3, 0]


def test_dilate_disk_matches_footprint_dilation():
    rng = np.random.default_rng(5)
    b = rng.random((3, 23, 31)) > 0.97
    for r in (0, 1, 4, 9, 40):
        expected = np.stack([R.dilate_frame(x, r) for x in b])
        assert np.array_equal(M.dilate_disk(b, r), expected)


@pytest.mark.parametrize("shape", [(3, 37, 53), (4, 61, 45), (2, 45, 91), (2, 1, 9), (2, 9, 1), (0, 5, 5)])
def test_fast_equals_reference_on_random_blobs(shape):
    rng = np.random.default_rng(sum(shape))
    t, h, w = shape
    for noise in (0.0, 0.4):
        gt = _blobs(rng, t, h, w, noise=noise)
        pred = _blobs(rng, t, h, w, noise=noise)
        void = _blobs(rng, t, h, w, cell=9)
        assert np.array_equal(M.db_eval_iou(gt, pred), R.db_eval_iou(gt, pred))
        assert np.array_equal(M.db_eval_iou(gt, pred, void), R.db_eval_iou(gt, pred, void))
        for th in (0.008, 0.05, 1, 4):
            ref = R.db_eval_boundary(gt, pred, bound_th=th)
            ref_void = R.db_eval_boundary(gt, pred, void, bound_th=th)
            for method in ("auto", "sparse", "dense"):
                assert np.array_equal(M.db_eval_boundary(gt, pred, bound_th=th, method=method), ref)
                assert np.array_equal(M.db_eval_boundary(gt, pred, void, bound_th=th, method=method), ref_void)


def test_fast_equals_reference_at_davis_size():
    # one 854x480 frame pair with bound_pix = 8 and a near-miss prediction (shifted blobs)
    rng = np.random.default_rng(11)
    gt = _blobs(rng, 2, 480, 854, cell=60)
    pred = np.roll(gt, (5, -9), axis=(1, 2))
    np.testing.assert_array_equal(M.db_eval_boundary(gt, pred), R.db_eval_boundary(gt, pred))
    assert 0.0 < M.db_eval_boundary(gt, pred).min() < 1.0


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        M.db_eval_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="same"):
        M.db_eval_boundary(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="method"):
        M.db_eval_boundary(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool), method="fast")


# ---------------------------------------------------------------- statistics


def test_decay_bins_n48():
    assert M.decay_bin_ids(48).tolist() == [0, 12, 24, 35, 47]
    assert R.decay_bin_ids(48) == [0, 12, 24, 35, 47]
    # x.5 rounds up (numpy alone would round 24.5 to even = 24); N = 47: 1, 12.5, 24, 35.5, 47 -> 1, 13, 24, 36, 47
    assert M.decay_bin_ids(47).tolist() == [0, 12, 23, 35, 46]
    assert M.decay_bin_ids(1).tolist() == [0, 0, 0, 0, 0]
    for n in range(1, 400):
        assert M.decay_bin_ids(n).tolist() == R.decay_bin_ids(n)


def test_statistics_values():
    v = np.arange(48, dtype=np.float64) / 47
    mean, recall, decay = M.db_statistics(v)
    assert mean == pytest.approx(0.5, abs=1e-15)
    assert recall == pytest.approx(24 / 48)  # v > 0.5 for indices 24..47
    # inclusive bins [0..12] and [35..47]: means 6/47 and 41/47
    assert decay == pytest.approx(6 / 47 - 41 / 47, abs=1e-12)


def test_recall_is_strict_at_half():
    assert M.db_statistics(np.array([0.5, 0.5, 0.6, 0.4]))[1] == 0.25
    assert M.db_statistics(np.array([0.5]))[1] == 0.0


def test_statistics_nan_and_short_inputs():
    mean, recall, decay = M.db_statistics(np.array([1.0, np.nan, 0.0, 1.0]))
    assert mean == pytest.approx(2 / 3)
    assert recall == 0.5  # NaN > 0.5 is False: counts as a miss, as upstream
    assert M.db_statistics(np.array([0.7])) == (0.7, 1.0, 0.0)
    assert all(math.isnan(x) for x in M.db_statistics(np.array([])))


def test_statistics_long_sequence_has_no_uint8_wrap():
    # upstream casts the bin edges to uint8: for N = 300 the last edge 299 wraps to 43. Here the last bin is
    # v[224..299] (edges 0, 75, 150, 224, 299 from round(1 + i*299/4) - 1).
    v = np.zeros(300)
    v[224:] = 1.0
    assert M.decay_bin_ids(300).tolist() == [0, 75, 150, 224, 299]
    assert M.db_statistics(v)[2] == -1.0


def test_statistics_match_reference():
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 5, 48, 67, 101):
        v = rng.random(n)
        np.testing.assert_allclose(M.db_statistics(v), R.db_statistics(v), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- optional parity with the official style


def test_parity_with_opencv_skimage_reference():
    cv2 = pytest.importorskip("cv2")
    morphology = pytest.importorskip("skimage.morphology")

    def official_style_f(fg: np.ndarray, gt: np.ndarray, bound_th: float) -> float:
        """f_measure as upstream structures it: cv2.dilate with skimage's disk, per frame."""
        bp = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
        fg_b = R.boundary_frame(fg)
        gt_b = R.boundary_frame(gt)
        se = morphology.disk(bp).astype(np.uint8)
        fg_dil = cv2.dilate(fg_b.astype(np.uint8), se)
        gt_dil = cv2.dilate(gt_b.astype(np.uint8), se)
        n_fg, n_gt = np.sum(fg_b), np.sum(gt_b)
        if n_fg == 0 and n_gt > 0:
            p, r = 1, 0
        elif n_fg > 0 and n_gt == 0:
            p, r = 0, 1
        elif n_fg == 0 and n_gt == 0:
            p, r = 1, 1
        else:
            p = np.sum(fg_b * gt_dil) / float(n_fg)
            r = np.sum(gt_b * fg_dil) / float(n_gt)
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    rng = np.random.default_rng(7)
    for t, h, w in [(4, 57, 83), (2, 120, 213)]:
        gt = _blobs(rng, t, h, w)
        pred = np.roll(_blobs(rng, t, h, w, noise=0.1) | gt, 2, axis=2)
        for th in (0.008, 0.03, 3):
            expected = np.array([official_style_f(pred[i], gt[i], th) for i in range(t)])
            np.testing.assert_array_equal(M.db_eval_boundary(gt, pred, bound_th=th), expected)
