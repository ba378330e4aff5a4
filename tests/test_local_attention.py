"""Pure-PyTorch local correlation / attention against naive loops and the dense masked reference (values and
gradients, float64)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from vidssl.models.local_attention import (dense_local_attention, expected_offset, local_aggregate,
                                           local_attention, local_correlation, shifted_local_aggregate,
                                           shifted_local_correlation, shifted_window_valid, window_offsets,
                                           window_valid)
from vidssl.models.window_tiles import TiledWindows


def naive_correlation(q, k, radius, dilation):
    """Explicit loop over offsets and positions (zero outside the image)."""
    b, c, h, w = q.shape
    out = torch.zeros(b, (2 * radius + 1) ** 2, h, w, dtype=q.dtype)
    for o, (dy, dx) in enumerate(itertools.product(range(-radius, radius + 1), repeat=2)):
        for y in range(h):
            for x in range(w):
                yy, xx = y + dy * dilation, x + dx * dilation
                if 0 <= yy < h and 0 <= xx < w:
                    out[:, o, y, x] = (q[:, :, y, x] * k[:, :, yy, xx]).sum(1)
    return out


def naive_aggregate(wts, v, radius, dilation):
    b, _, h, w = wts.shape
    out = torch.zeros(b, v.shape[1], h, w, dtype=v.dtype)
    for o, (dy, dx) in enumerate(itertools.product(range(-radius, radius + 1), repeat=2)):
        for y in range(h):
            for x in range(w):
                yy, xx = y + dy * dilation, x + dx * dilation
                if 0 <= yy < h and 0 <= xx < w:
                    out[:, :, y, x] += wts[:, o, y, x, None] * v[:, :, yy, xx]
    return out


def grid_sample_window(src, offset, radius):
    """Reference shifted window: grid_sample (align_corners=True, zeros) at q + offset(q) + delta: (B, C, O, h, w)."""
    b, c, h, w = src.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=src.dtype), torch.arange(w, dtype=src.dtype), indexing="ij")
    outs = []
    for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
        py = ys[None] + offset[:, 0] + dy
        px = xs[None] + offset[:, 1] + dx
        grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1)
        outs.append(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("radius,dilation", [(1, 1), (1, 2), (1, 4), (6, 1), (6, 2), (6, 4), (12, 1), (12, 2),
                                             (12, 4)])
def test_correlation_matches_loop(radius, dilation):
    g = torch.Generator().manual_seed(radius * 10 + dilation)
    q = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    got = local_correlation(q, k, radius=radius, dilation=dilation, tile=4)
    assert got.shape == (2, (2 * radius + 1) ** 2, 9, 11)
    torch.testing.assert_close(got, naive_correlation(q, k, radius, dilation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("radius,dilation,tile", [(1, 1, 3), (2, 2, 8), (6, 1, 5), (3, 3, 4)])
def test_aggregate_matches_loop(radius, dilation, tile):
    g = torch.Generator().manual_seed(7)
    wts = torch.rand(2, (2 * radius + 1) ** 2, 7, 10, generator=g, dtype=torch.float64)
    v = torch.randn(2, 4, 7, 10, generator=g, dtype=torch.float64)
    got = local_aggregate(wts, v, radius=radius, dilation=dilation, tile=tile)
    torch.testing.assert_close(got, naive_aggregate(wts, v, radius, dilation), rtol=1e-12, atol=1e-12)


def test_window_valid_and_offsets():
    off = window_offsets(2, dilation=3)
    assert off.shape == (25, 2) and off[0].tolist() == [-6, -6] and off[12].tolist() == [0, 0]
    assert off[1].tolist() == [-6, -3]  # row-major: dx inner
    valid = window_valid(5, 6, radius=2, dilation=3)
    assert valid[12].all()  # centre always inside
    assert valid[0].sum() == 0  # (-6, -6) lands outside a 5x6 image from everywhere
    assert valid[13, :, :3].all() and not valid[13, :, 3:].any()  # (0, +3): inside only for columns 0..2


@pytest.mark.parametrize("tile", [1, 3, 5, 16])
def test_tiled_windows_arbitrary_offsets_several_keys_and_buffers(tile):
    """The shared kernel (local_correlation and the sparse label propagation): any offset set, N key maps per query,
    chunks of tile rows into reused buffers == one unbuffered call == an explicit loop."""
    g = torch.Generator().manual_seed(tile)
    b, n, c, h, w = 2, 3, 4, 7, 10
    q = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    keys = torch.randn(b, n, c, h, w, generator=g, dtype=torch.float64)
    offsets = torch.tensor([[0, 0], [-2, 1], [3, -4], [1, 1], [-1, 0]])  # asymmetric: ry = 3, rx = 4
    ref = torch.zeros(b, n, len(offsets), h, w, dtype=torch.float64)
    for o, (dy, dx) in enumerate(offsets.tolist()):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    ref[:, :, o, y, x] = (q[:, None, :, y, x] * keys[:, :, :, y + dy, x + dx]).sum(-1)
    plain = TiledWindows(keys, offsets, tile=tile, query=q)
    assert (plain.ry, plain.rx) == (3, 4)
    full = plain.affinity(0, plain.tile_rows)  # (b tiles, tile^2, n, O)
    torch.testing.assert_close(plain.untile(full.transpose(2, 3)).reshape(b, len(offsets), n, h, w).transpose(1, 2),
                               ref, rtol=1e-12, atol=1e-12)
    buffered = TiledWindows(keys, offsets, tile=tile, query=q, buffer_rows=2)
    for row0 in range(0, plain.tile_rows, 2):
        row1 = min(plain.tile_rows, row0 + 2)
        got = buffered.affinity(row0, row1).view(b, row1 - row0, -1)  # batch-major tiles
        want = full.view(b, plain.tile_rows, -1)[:, row0:row1]
        assert torch.equal(got, want)
        pos, valid = buffered.key_positions(row0, row1)
        ys = torch.div(pos, w, rounding_mode="floor")
        assert valid.sum() > 0 and bool((pos[~valid] == 0).all()) and bool((ys[valid] < h).all())
        assert pos.shape == ((row1 - row0) * plain.tile_cols, tile * tile, len(offsets))


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_attention_equals_dense_values_and_gradients(mode):
    g = torch.Generator().manual_seed(3)
    b, c, h, w, k = 2, 5, 8, 9, 3
    q = torch.randn(b, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    keys = [torch.randn(b, c, h, w, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    vals = [torch.randn(b, k, h, w, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    kw = dict(radius=2, dilation=[1, 2, 1], temperature=0.7, out_of_image=mode)
    got = local_attention(q, keys, vals, tile=4, **kw)
    ref = dense_local_attention(q, keys, vals, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * probe).sum(), [q, *keys, *vals])
    grads_ref = torch.autograd.grad((ref * probe).sum(), [q, *keys, *vals])
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_zero_mode_differs_from_mask_at_the_border():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 6, generator=g)
    k = torch.randn(1, 4, 6, 6, generator=g)
    v = torch.rand(1, 1, 6, 6, generator=g) + 1.0  # strictly positive values
    masked = local_attention(q, [k], [v], radius=2, out_of_image="mask")
    zero = local_attention(q, [k], [v], radius=2, out_of_image="zero")
    # interior queries (all 25 window entries inside) agree; corners lose mass to the zero-valued outside entries
    torch.testing.assert_close(masked[..., 2:4, 2:4], zero[..., 2:4, 2:4])
    assert (zero[0, 0, 0, 0] < masked[0, 0, 0, 0]).item()


def test_gradcheck_blocks():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_correlation(a, b, radius=1, dilation=2, tile=3), (q, k))
    wts = torch.rand(1, 9, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_aggregate(a, b, radius=1, tile=4), (wts, v))


def test_shifted_windows_match_grid_sample():
    g = torch.Generator().manual_seed(5)
    b, c, h, w, r = 2, 3, 7, 8, 2
    q = torch.randn(b, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    off = (torch.rand(b, 2, h, w, generator=g, dtype=torch.float64) * 8 - 4).requires_grad_(True)
    win = grid_sample_window(k, off, r)  # b c o h w
    ref = (q[:, :, None] * win).sum(1)
    got = shifted_local_correlation(q, k, off, radius=r)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    probe = torch.randn(got.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((got * probe).sum(), [q, k, off])
    gr = torch.autograd.grad((ref * probe).sum(), [q, k, off])
    for a, rr in zip(ga, gr):
        torch.testing.assert_close(a, rr, rtol=1e-8, atol=1e-10)

    wts = torch.rand(b, (2 * r + 1) ** 2, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, 2, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    ref_a = (wts[:, None] * grid_sample_window(v, off, r)).sum(2)
    got_a = shifted_local_aggregate(wts, v, off, radius=r)
    torch.testing.assert_close(got_a, ref_a, rtol=1e-10, atol=1e-12)
    probe = torch.randn(got_a.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((got_a * probe).sum(), [wts, v, off])
    gr = torch.autograd.grad((ref_a * probe).sum(), [wts, v, off])
    for a, rr in zip(ga, gr):
        torch.testing.assert_close(a, rr, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("scale", [0.5, 30.0])
def test_shifted_inference_path_equals_autograd_path(scale):
    # no-grad inference uses blocked tile matmuls (smooth offsets) with a per-query fallback (scattered offsets)
    g = torch.Generator().manual_seed(8)
    b, c, h, w, r = 2, 3, 13, 18, 2
    q = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    k = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    off = torch.randn(b, 2, h, w, generator=g, dtype=torch.float64) * scale
    with torch.no_grad():
        fast = shifted_local_correlation(q, k, off, radius=r)
    slow = shifted_local_correlation(q.requires_grad_(True), k, off, radius=r)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-10, atol=1e-12)


def test_shifted_integer_offset_equals_plain_window():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 6, 7, generator=g, dtype=torch.float64)
    k = torch.randn(1, 3, 6, 7, generator=g, dtype=torch.float64)
    zero = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(shifted_local_correlation(q, k, zero, radius=2), local_correlation(q, k, radius=2))
    assert shifted_window_valid(zero, radius=2).equal(window_valid(6, 7, radius=2)[None])
    # an all-outside shift gives zero correlation
    far = torch.full((1, 2, 6, 7), 40.0, dtype=torch.float64)
    assert shifted_local_correlation(q, k, far, radius=2).abs().max() == 0


def test_shifted_align_corners_false_matches_formula():
    # MAST quirk: grid normalised with (size - 1) read with align_corners=False -> pixel p*s/(s-1) - 0.5
    g = torch.Generator().manual_seed(4)
    b, c, h, w, r = 1, 2, 6, 9, 1
    q = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    k = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    off = torch.rand(b, 2, h, w, generator=g, dtype=torch.float64) * 2 - 1
    got = shifted_local_correlation(q, k, off, radius=r, align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    outs = []
    for dy, dx in itertools.product(range(-r, r + 1), repeat=2):
        py = (ys + off[:, 0] + dy) * h / (h - 1) - 0.5  # pixel coordinate actually read
        px = (xs + off[:, 1] + dx) * w / (w - 1) - 0.5
        grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1)  # expressed in align_corners=True
        sampled = F.grid_sample(k, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        outs.append((q * sampled).sum(1))
    torch.testing.assert_close(got, torch.stack(outs, 1), rtol=1e-10, atol=1e-12)


def test_expected_offset_of_a_peaked_correlation():
    # key = query translated by (+2, -4) cells: a sharp softmax puts the expected offset there (dilation 2)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, 24, 24, generator=g)
    q = base[:, :, 4:20, 4:20]
    k = base[:, :, 2:18, 8:24]  # k[y, x] = base[y + 2, x + 8] -> q[y, x] = k[y + 2, x - 4]
    off = expected_offset(q * 20, k, radius=3, dilation=2, out_of_image="mask")
    centre = off[0, :, 6:10, 6:10]
    torch.testing.assert_close(centre[0], torch.full_like(centre[0], 2.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(centre[1], torch.full_like(centre[1], -4.0), atol=1e-3, rtol=0)


def test_bad_inputs_raise():
    q = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="key"):
        local_correlation(q, torch.zeros(1, 2, 5, 4), radius=1)
    with pytest.raises(ValueError, match="radius"):
        local_correlation(q, q, radius=-1)
    with pytest.raises(ValueError, match="dilation"):
        local_correlation(q, q, radius=1, dilation=0)
    with pytest.raises(ValueError, match="weights"):
        local_aggregate(torch.zeros(1, 8, 4, 4), q, radius=1)
    with pytest.raises(ValueError, match="out_of_image"):
        local_attention(q, [q], [q], radius=1, out_of_image="clip")
