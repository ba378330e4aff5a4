"""Local (windowed) correlation and attention in pure PyTorch: the replacement for ``spatial_correlation_sampler``.

CorrFlow, MAST and the windowed propagation protocols compare every query position ``q = (y, x)`` of a target
feature map with the key positions ``q + d * delta`` of a reference map, ``delta`` in the square window
``[-R, R]^2`` (``O = (2R + 1)^2`` offsets, row-major: ``dy`` outer, ``dx`` inner, the layout of the official
correlation sampler) and dilation ``d``:

    corr[b, o, y, x] = < query[b, :, y, x], key[b, :, y + d*dy_o, x + d*dx_o] >      (0 outside the image)

How it is computed (no ``(h*w)^2`` matrix, no ``C * O`` unfold):

* the query map is cut into ``tile x tile`` tiles; each tile is multiplied with the key tile grown by ``R`` on every
  side (one batched matmul of ``tile^2 x (tile + 2R)^2``) and the ``O`` window entries of every query are gathered
  from it. Peak extra memory is ``(tile + 2R)^2 / O`` times the ``(B, O, h, w)`` output (about 2.4x for R = 6,
  tile = 8), whatever ``C`` is; autograd keeps the tiled key copy and the index only.
* dilation ``d > 1`` is exact via residue sub-grids: the keys a query ``(y, x)`` can see all share its residue
  ``(y mod d, x mod d)``, so the dilated problem is ``d^2`` undilated problems on the sub-sampled grids.
* the aggregation ``out[b, k, q] = sum_o w[b, o, q] * values[b, k, q + d*delta_o]`` scatters the window weights into
  the same tile layout and multiplies with the value tiles.

:func:`local_attention` combines several references with **one joint softmax** over all their windows (MAST) using
a streaming (online) softmax, so memory does not grow with the number of references. Out-of-image window entries
are either masked (``out_of_image="mask"``, CorrFlow's ``-1e10``) or kept as logit 0 with a zero value
(``"zero"``, the MAST quirk: they absorb probability mass). References may be *shifted*: each query's window is
centred at ``q + offset(q)`` (MAST's ROI localisation, see :func:`expected_offset`), sampled bilinearly with zero
padding (:func:`shifted_local_correlation`, :func:`shifted_local_aggregate`).

:func:`dense_local_attention` is the dense masked reference implementation used by the tests.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from vidssl.models.window_tiles import TiledWindows

OutOfImage = Literal["mask", "zero"]

__all__ = [
    "dense_local_attention",
    "expected_offset",
    "local_aggregate",
    "local_window",
    "local_attention",
    "local_correlation",
    "shifted_local_aggregate",
    "shifted_local_correlation",
    "shifted_window_valid",
    "window_offsets",
    "window_valid",
]


def _check_radius(radius: int, dilation: int = 1) -> None:
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius: expected an integer >= 0, got {radius!r}")
    if int(dilation) != dilation or dilation < 1:
        raise ValueError(f"dilation: expected an integer >= 1, got {dilation!r}")


def window_offsets(radius: int, *, dilation: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Window offsets ``(dy, dx) * dilation`` in feature cells, row-major (``dy`` outer).

    Returns:
        ``(O, 2)`` int64 with ``O = (2 * radius + 1)^2``.
    """
    _check_radius(radius, dilation)
    r = torch.arange(-radius, radius + 1, device=device) * dilation
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy.flatten(), dx.flatten()], dim=1)


def window_valid(height: int, width: int, *, radius: int, dilation: int = 1,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Which window entries fall inside the image.

    Returns:
        ``(O, height, width)`` bool: ``valid[o, y, x]`` iff ``(y, x) + offset_o`` lies inside the image.
    """
    off = window_offsets(radius, dilation=dilation, device=device)
    ys = torch.arange(height, device=device)[None, :, None] + off[:, 0, None, None]
    xs = torch.arange(width, device=device)[None, None, :] + off[:, 1, None, None]
    return (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)


def _corr_undilated(query: torch.Tensor, key: torch.Tensor, radius: int, tile: int) -> torch.Tensor:
    windows = TiledWindows(key[:, None], window_offsets(radius, device=query.device), tile=tile, query=query)
    return windows.untile(windows.affinity(0, windows.tile_rows))  # (b a d) q 1 o -> b o h w


def _aggregate_undilated(weights: torch.Tensor, values: torch.Tensor, radius: int, tile: int) -> torch.Tensor:
    windows = TiledWindows(values[:, None], window_offsets(radius, device=values.device), tile=tile)
    wt = windows.query_tiles(0, windows.tile_rows, windows.pad(weights))  # m q o
    # window entries placed in the grown tile, then one matmul with the grown value tiles: m q p, m p k -> m q k
    dense = wt.new_zeros(*wt.shape[:2], windows.win_h * windows.win_w).scatter(
        2, windows.index.expand(wt.shape[0], *windows.index.shape), wt)
    return windows.untile(torch.matmul(dense, windows.key_tiles(0, windows.tile_rows)))


def _check_pair(query: torch.Tensor, key: torch.Tensor, qname: str, kname: str) -> None:
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(f"{qname}/{kname}: expected (B, C, h, w) tensors, got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if query.shape[0] != key.shape[0] or query.shape[2:] != key.shape[2:]:
        raise ValueError(f"{kname}: expected batch {query.shape[0]} and spatial size {tuple(query.shape[2:])} like "
                         f"{qname}, got shape {tuple(key.shape)}")


def local_correlation(query: torch.Tensor, key: torch.Tensor, *, radius: int, dilation: int = 1,
                      tile: int = 8) -> torch.Tensor:
    """Window correlation (raw dot products) between a query and a key feature map.

    Args:
        query: ``(B, C, h, w)`` target features.
        key: ``(B, C, h, w)`` reference features.
        radius: window half-size ``R`` (``O = (2R + 1)^2`` offsets).
        dilation: step between window positions (MAST's coarse ROI search uses 2..4).
        tile: query tile side of the blocked computation (speed/memory knob only).

    Returns:
        ``(B, O, h, w)``; entries whose key position is outside the image are 0 (the correlation sampler's
        convention; mask them with :func:`window_valid`).
    """
    _check_pair(query, key, "query", "key")
    _check_radius(radius, dilation)
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"key: expected {query.shape[1]} channels like query, got {key.shape[1]}")
    if dilation == 1:
        return _corr_undilated(query, key, radius, tile)
    b, _, h, w = query.shape
    out = query.new_zeros(b, (2 * radius + 1) ** 2, h, w)
    for ry in range(min(dilation, h)):
        for rx in range(min(dilation, w)):
            out[:, :, ry::dilation, rx::dilation] = _corr_undilated(
                query[:, :, ry::dilation, rx::dilation], key[:, :, ry::dilation, rx::dilation], radius, tile)
    return out


def local_aggregate(weights: torch.Tensor, values: torch.Tensor, *, radius: int, dilation: int = 1,
                    tile: int = 8) -> torch.Tensor:
    """Weighted sum of window values: ``out[b, k, q] = sum_o weights[b, o, q] * values[b, k, q + offset_o]``.

    Args:
        weights: ``(B, O, h, w)`` window weights (e.g. a softmax over ``O``), ``O = (2R + 1)^2``.
        values: ``(B, K, h, w)`` reference values (colours, labels); values outside the image count as 0.
        radius, dilation, tile: as in :func:`local_correlation`.

    Returns:
        ``(B, K, h, w)``.
    """
    _check_pair(weights, values, "weights", "values")
    _check_radius(radius, dilation)
    if weights.shape[1] != (2 * radius + 1) ** 2:
        raise ValueError(f"weights: expected {(2 * radius + 1) ** 2} window entries for radius {radius}, "
                         f"got {weights.shape[1]}")
    if dilation == 1:
        return _aggregate_undilated(weights, values, radius, tile)
    b, _, h, w = weights.shape
    out = values.new_zeros(b, values.shape[1], h, w, dtype=torch.result_type(weights, values))
    for ry in range(min(dilation, h)):
        for rx in range(min(dilation, w)):
            out[:, :, ry::dilation, rx::dilation] = _aggregate_undilated(
                weights[:, :, ry::dilation, rx::dilation], values[:, :, ry::dilation, rx::dilation], radius, tile)
    return out


def local_window(values: torch.Tensor, *, radius: int, fill: float = 0.0) -> torch.Tensor:
    """Materialised window of every position: ``out[b, k, o, y, x] = values[b, k, (y, x) + offset_o]``.

    Memory ``K * O`` times the input: meant for few channels (e.g. CorrFlow's log-space colour copy), not features.

    Args:
        values: ``(B, K, h, w)``.
        radius: window half-size ``R``.
        fill: value outside the image.

    Returns:
        ``(B, K, O, h, w)``.
    """
    _check_radius(radius)
    if values.ndim != 4:
        raise ValueError(f"values: expected (B, K, h, w), got shape {tuple(values.shape)}")
    b, k, h, w = values.shape
    padded = F.pad(values, (radius, radius, radius, radius), value=fill)
    cols = F.unfold(padded, kernel_size=2 * radius + 1)  # b (k o) (h w)
    return rearrange(cols, "b (k o) (h w) -> b k o h w", k=k, h=h)


# ------------------------------------------------------------------------------------------ shifted windows (ROI)

def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gy, gx])  # 2 h w


def _bilinear_origin(offset: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer window origin and bilinear fractions of a shifted window (``align_corners=True`` sampling).

    For query ``q`` the window samples ``p = q + offset(q) + delta``; with ``f = floor(q + offset(q))`` and
    ``t = frac(q + offset(q))`` every sample is the bilinear mix of the integer grid points ``f + delta + (a, b)``,
    ``a, b in {0, 1}``, with weights ``(1 - t_y or t_y) * (1 - t_x or t_x)`` shared by all ``delta``.

    Returns:
        ``origin`` ``(B, 2, h*w)`` int64 (``f - R``), ``ty``, ``tx`` ``(B, h*w)``.
    """
    b, _, h, w = offset.shape
    pos = _base_grid(h, w, offset.device, offset.dtype)[None] + offset  # b 2 h w
    fl = torch.floor(pos.detach())
    frac = pos - fl  # differentiable in the offset
    return rearrange(fl.long() - radius, "b two h w -> b two (h w)"), rearrange(frac[:, 0], "b h w -> b (h w)"), \
        rearrange(frac[:, 1], "b h w -> b (h w)")


def _gather_patches(src: torch.Tensor, origin: torch.Tensor, size: int) -> torch.Tensor:
    """Patches ``src[b, :, oy + u, ox + v]``, ``u, v in [0, size)``, zero outside the image.

    Args:
        src: ``(B, C, h, w)``.
        origin: ``(B, 2, Q)`` int64 top-left corners.

    Returns:
        ``(B, Q, size*size, C)``.
    """
    b, c, h, w = src.shape
    pad = size  # a zero border at least one patch wide
    big = F.pad(src, (pad, pad, pad, pad))
    hb, wb = h + 2 * pad, w + 2 * pad
    rows_table = rearrange(big, "b c h w -> (b h w) c")  # one row per pixel: gathers copy contiguous C-vectors
    u = torch.arange(size, device=src.device)
    # A patch that is entirely outside the image is clamped onto the zero border (it reads only zeros); a patch that
    # overlaps the image is never clamped because the border is `size` wide.
    oy = (origin[:, 0] + pad).clamp(0, hb - size)  # b q
    ox = (origin[:, 1] + pad).clamp(0, wb - size)
    base = torch.arange(b, device=src.device)[:, None, None, None] * (hb * wb)
    idx = base + (oy[:, :, None, None] + u[None, None, :, None]) * wb + (ox[:, :, None, None] + u[None, None, None, :])
    g = torch.index_select(rows_table, 0, idx.reshape(-1))  # (b q u v) c
    return rearrange(g, "(b q s) c -> b q s c", b=b, s=size * size)


def _corner_weights(ty: torch.Tensor, tx: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    return [(0, 0, (1 - ty) * (1 - tx)), (0, 1, (1 - ty) * tx), (1, 0, ty * (1 - tx)), (1, 1, ty * tx)]


def _check_offset(offset: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if offset.ndim != 4 or offset.shape[1] != 2 or offset.shape[0] != ref.shape[0] or offset.shape[2:] != ref.shape[2:]:
        raise ValueError(f"{name}: expected (B, 2, h, w) = ({ref.shape[0]}, 2, {ref.shape[2]}, {ref.shape[3]}) "
                         f"(dy, dx) in feature cells, got {tuple(offset.shape)}")


def _chunk_len(size: int, channels: int, budget: int = 1 << 23) -> int:
    """Queries per chunk so that one gathered block holds about ``budget`` elements."""
    return max(1, budget // (size * size * max(1, channels)))


def _maybe_checkpoint(fn, *args):
    """Run ``fn(*args)``; under autograd recompute it in backward instead of storing the gathered patches."""
    if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _shifted_corr_chunk(q: torch.Tensor, key: torch.Tensor, origin: torch.Tensor, ty: torch.Tensor,
                        tx: torch.Tensor, radius: int) -> torch.Tensor:
    size, p = 2 * radius + 2, 2 * radius + 1
    patches = _gather_patches(key, origin, size)  # b q s c
    aff = rearrange(einsum(q, patches, "b q c, b q s c -> b q s"), "b q (u v) -> b q u v", u=size)
    out = 0
    for a, bb, wgt in _corner_weights(ty, tx):
        out = out + wgt[:, :, None, None] * aff[:, :, a:a + p, bb:bb + p]
    return rearrange(out, "b q u v -> b q (u v)")


def _shifted_aff_tiled(query: torch.Tensor, key: torch.Tensor, origin: torch.Tensor, size: int, tile: int = 8,
                       spread: int = 24) -> torch.Tensor:
    """Integer-window affinities ``aff[b, q, u, v] = <query[q], key[origin(q) + (u, v)]>`` (zero outside), blocked.

    Queries are grouped in ``tile x tile`` tiles; when the window origins of a tile (relative to the queries) vary by
    at most ``spread`` cells, the tile is multiplied once with the union of its windows (a ``(tile + spread +
    size - 1)^2`` key block) and each query's window is picked from that block; other tiles fall back to a
    per-query gather. Same values as gathering every window, several times faster (no grad path: no checkpoint).

    Args:
        query: ``(B, C, h, w)``; key: ``(B, C, h, w)``; origin: ``(B, 2, h*w)`` int64 window top-left corners.

    Returns:
        ``(B, h*w, size, size)``.
    """
    b, c, h, w = query.shape
    hp, wp = -(-h // tile) * tile, -(-w // tile) * tile
    span = tile + spread + size - 1
    dev = query.device
    gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    rel = origin - torch.stack([gy.flatten(), gx.flatten()])[None]  # b 2 q (window origin - query position)
    rel = F.pad(rearrange(rel, "b two (h w) -> b two h w", h=h), (0, wp - w, 0, hp - h), mode="replicate")
    rel_t = rearrange(rel, "b two (a i) (d j) -> b a d two (i j)", i=tile, j=tile)
    lo = rel_t.amin(dim=4)  # b a d 2
    ok = (rel_t.amax(dim=4) - lo <= spread).all(dim=3)  # b a d: tiles served by one key block
    ty0 = torch.arange(0, hp, tile, device=dev)[None, :, None]
    tx0 = torch.arange(0, wp, tile, device=dev)[None, None, :]
    anchor_y, anchor_x = ty0 + lo[..., 0], tx0 + lo[..., 1]  # b a d: top-left of the key block
    pad = span + tile + spread
    big = F.pad(key, (pad, pad + wp - w, pad, pad + hp - h))
    hb, wb = big.shape[-2:]
    table = rearrange(big, "b c h w -> (b h w) c")
    ay = (anchor_y + pad).clamp(0, hb - span)  # blocks entirely outside are clamped onto the zero border
    ax = (anchor_x + pad).clamp(0, wb - span)
    u = torch.arange(span, device=dev)
    base = torch.arange(b, device=dev)[:, None, None, None, None] * (hb * wb)
    idx = base + (ay[..., None, None] + u[:, None]) * wb + (ax[..., None, None] + u[None, :])  # b a d span span
    blocks = rearrange(torch.index_select(table, 0, idx.reshape(-1)), "(b a d p) c -> b a d p c", b=b,
                       a=hp // tile, d=wp // tile)
    qt = rearrange(F.pad(query, (0, wp - w, 0, hp - h)), "b c (a i) (d j) -> b a d (i j) c", i=tile, j=tile)
    block_aff = einsum(qt, blocks, "b a d q c, b a d p c -> b a d q p")
    # each query's window inside its tile's block
    li, lj = torch.meshgrid(torch.arange(tile, device=dev), torch.arange(tile, device=dev), indexing="ij")
    oy = (rel_t[:, :, :, 0] - lo[..., 0:1]).clamp(0, spread) + li.flatten()  # b a d q, row of the window origin
    ox = (rel_t[:, :, :, 1] - lo[..., 1:2]).clamp(0, spread) + lj.flatten()
    v = torch.arange(size, device=dev)
    pick = (oy[..., None, None] + v[:, None]) * span + (ox[..., None, None] + v[None, :])  # b a d q size size
    aff = torch.gather(block_aff, 4, rearrange(pick, "b a d q u v -> b a d q (u v)"))
    aff = rearrange(aff, "b a d (i j) (u v) -> b (a i) (d j) u v", i=tile, u=size)[:, :h, :w]
    aff = rearrange(aff, "b h w u v -> b (h w) u v")
    bad = rearrange(F.pad(~ok, (0, 0, 0, 0)).repeat_interleave(tile, 1).repeat_interleave(tile, 2)[:, :h, :w],
                    "b h w -> b (h w)")
    if bool(bad.any()):  # tiles whose windows spread too far: gather their windows one by one
        qs = rearrange(query, "b c h w -> b (h w) c")
        for bi in range(b):
            sel = bad[bi].nonzero().flatten()
            patches = _gather_patches(key[bi:bi + 1], origin[bi:bi + 1, :, sel], size)  # 1 n s c
            part = einsum(qs[bi:bi + 1, sel], patches, "b q c, b q s c -> b q s")
            aff[bi, sel] = rearrange(part, "b q (u v) -> b q u v", u=size)[0]
    return aff


def _shifted_agg_chunk(wq: torch.Tensor, values: torch.Tensor, origin: torch.Tensor, ty: torch.Tensor,
                       tx: torch.Tensor, radius: int) -> torch.Tensor:
    size, p = 2 * radius + 2, 2 * radius + 1
    wq = rearrange(wq, "b q (u v) -> b q u v", u=p)
    spread = 0
    for a, bb, wgt in _corner_weights(ty, tx):
        spread = spread + F.pad(wgt[:, :, None, None] * wq, (bb, 1 - bb, a, 1 - a))
    patches = _gather_patches(values, origin, size)  # b q s k
    return einsum(rearrange(spread, "b q u v -> b q (u v)"), patches, "b q s, b q s k -> b q k")


def _grid_window(src: torch.Tensor, offset: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` (no ``align_corners``, grid normalised with ``size - 1``: MAST's call on PyTorch >= 1.3) of
    ``src`` at ``q + offset(q) + off_g`` for a group of window offsets: ``(B, C, G, h, w)``."""
    b, c, h, w = src.shape
    shifts = rearrange(off.to(offset.dtype), "g two -> 1 two g 1 1")
    pos = _base_grid(h, w, offset.device, offset.dtype)[None, :, None] + offset[:, :, None] + shifts  # b 2 g h w
    gx = pos[:, 1] / max(w - 1, 1) * 2 - 1
    gy = pos[:, 0] / max(h - 1, 1) * 2 - 1
    grid = rearrange(torch.stack([gx, gy], dim=-1), "b g h w two -> b (g h) w two")
    out = F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return rearrange(out, "b c (g h) w -> b c g h w", h=h)


def shifted_local_correlation(query: torch.Tensor, key: torch.Tensor, offset: torch.Tensor, *, radius: int,
                              align_corners: bool = True) -> torch.Tensor:
    """Window correlation around shifted centres: ``corr[b, o, q] = <query[q], key~(q + offset(q) + delta_o)>``.

    ``key~`` is the bilinear interpolation of ``key`` at real positions, zero outside the image: ``grid_sample`` with
    zero padding and ``align_corners=True``, which is what MAST's deformable im2col computed on the PyTorch it was
    written for. Computed exactly by gathering, per query, the ``(2R + 2)^2`` integer key positions around the
    window and mixing four shifted correlations with the shared bilinear weights; queries are processed in chunks
    and, under autograd, each chunk is recomputed in backward (memory stays bounded).

    Args:
        query: ``(B, C, h, w)``.
        key: ``(B, C, h, w)``.
        offset: ``(B, 2, h, w)`` window-centre shift ``(dy, dx)`` in feature cells (differentiable).
        radius: window half-size ``R``.
        align_corners: ``False`` reproduces MAST's ``grid_sample`` call on PyTorch >= 1.3 (quirk: a grid normalised
            with ``size - 1`` read with ``align_corners=False``; slower ``grid_sample`` path).

    Returns:
        ``(B, O, h, w)`` with ``O = (2R + 1)^2``.
    """
    _check_pair(query, key, "query", "key")
    _check_offset(offset, query, "offset")
    _check_radius(radius)
    b, c, h, w = query.shape
    offset = offset.to(query.dtype)
    if not align_corners:
        off = window_offsets(radius, device=query.device)
        outs = []
        for s in range(0, off.shape[0], 32):
            sampled = _grid_window(key, offset, off[s:s + 32])
            outs.append(einsum(query, sampled, "b c h w, b c g h w -> b g h w"))
        return torch.cat(outs, dim=1)
    origin, ty, tx = _bilinear_origin(offset, radius)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, offset))
    if not needs_grad:  # inference: blocked matmuls over tiles
        size, p = 2 * radius + 2, 2 * radius + 1
        aff = _shifted_aff_tiled(query, key, origin, size)
        out = 0
        for a, bb, wgt in _corner_weights(ty, tx):
            out = out + wgt[:, :, None, None] * aff[:, :, a:a + p, bb:bb + p]
        return rearrange(out, "b (h w) u v -> b (u v) h w", h=h)
    q = rearrange(query, "b c h w -> b (h w) c")
    step = _chunk_len(2 * radius + 2, c)
    outs = [_maybe_checkpoint(_shifted_corr_chunk, q[:, s:s + step], key, origin[:, :, s:s + step],
                              ty[:, s:s + step], tx[:, s:s + step], radius)
            for s in range(0, h * w, step)]
    return rearrange(torch.cat(outs, dim=1), "b (h w) o -> b o h w", h=h)


def shifted_local_aggregate(weights: torch.Tensor, values: torch.Tensor, offset: torch.Tensor, *, radius: int,
                            align_corners: bool = True) -> torch.Tensor:
    """``out[b, k, q] = sum_o weights[b, o, q] * values~(q + offset(q) + delta_o)`` (bilinear, zero outside).

    Args:
        weights: ``(B, O, h, w)``.
        values: ``(B, K, h, w)``.
        offset: ``(B, 2, h, w)`` window-centre shift ``(dy, dx)`` in feature cells.
        radius: window half-size ``R``.
        align_corners: see :func:`shifted_local_correlation`.

    Returns:
        ``(B, K, h, w)``.
    """
    _check_pair(weights, values, "weights", "values")
    _check_offset(offset, weights, "offset")
    _check_radius(radius)
    b, o, h, w = weights.shape
    if o != (2 * radius + 1) ** 2:
        raise ValueError(f"weights: expected {(2 * radius + 1) ** 2} window entries for radius {radius}, got {o}")
    dt = torch.result_type(weights, values)
    weights, values, offset = weights.to(dt), values.to(dt), offset.to(dt)
    if not align_corners:
        off = window_offsets(radius, device=weights.device)
        out = 0
        for s in range(0, o, 32):
            sampled = _grid_window(values, offset, off[s:s + 32])
            out = out + einsum(weights[:, s:s + 32], sampled, "b g h w, b k g h w -> b k h w")
        return out
    origin, ty, tx = _bilinear_origin(offset, radius)
    wq = rearrange(weights, "b o h w -> b (h w) o")
    step = _chunk_len(2 * radius + 2, values.shape[1])
    outs = [_maybe_checkpoint(_shifted_agg_chunk, wq[:, s:s + step], values, origin[:, :, s:s + step],
                              ty[:, s:s + step], tx[:, s:s + step], radius)
            for s in range(0, h * w, step)]
    return rearrange(torch.cat(outs, dim=1), "b (h w) k -> b k h w", h=h)


def shifted_window_valid(offset: torch.Tensor, *, radius: int) -> torch.Tensor:
    """Whether each shifted window sample ``q + offset(q) + delta`` lies in ``[0, h-1] x [0, w-1]``.

    Returns:
        ``(B, O, h, w)`` bool.
    """
    b, _, h, w = offset.shape
    pos = _base_grid(h, w, offset.device, offset.dtype)[None] + offset  # b 2 h w
    off = window_offsets(radius, device=offset.device).to(offset.dtype)
    py = pos[:, 0, None] + off[None, :, 0, None, None]
    px = pos[:, 1, None] + off[None, :, 1, None, None]
    return (py >= 0) & (py <= h - 1) & (px >= 0) & (px <= w - 1)


def expected_offset(query: torch.Tensor, key: torch.Tensor, *, radius: int, dilation: int,
                    temperature: float = 1.0, out_of_image: OutOfImage = "zero", tile: int = 8) -> torch.Tensor:
    """MAST's ROI localisation: soft-argmax of a coarse dilated window correlation.

    ``p = softmax_o(corr[o] / temperature)`` over the ``(2R + 1)^2`` dilated window entries (out-of-image entries are
    logit 0 with ``"zero"``, as the official correlation sampler, or excluded with ``"mask"``), and the expected
    offset ``sum_o p_o * delta_o * dilation``.

    Args:
        query, key: ``(B, C, h, w)``.
        radius: coarse window half-size (MAST: 12).
        dilation: coarse step (MAST: ``min(4, gap // 15 + 1)``).

    Returns:
        ``(B, 2, h, w)`` offsets ``(dy, dx)`` in feature cells.
    """
    corr = local_correlation(query, key, radius=radius, dilation=dilation, tile=tile) / temperature
    if out_of_image == "mask":
        valid = window_valid(query.shape[2], query.shape[3], radius=radius, dilation=dilation, device=query.device)
        corr = corr.masked_fill(~valid[None], float("-inf"))
    elif out_of_image != "zero":
        raise ValueError(f"out_of_image: {out_of_image!r}; expected 'mask' or 'zero'")
    prob = torch.softmax(corr, dim=1)
    off = window_offsets(radius, dilation=dilation, device=query.device).to(prob.dtype)  # O 2
    return einsum(prob, off, "b o h w, o two -> b two h w")


# ------------------------------------------------------------------------------------------ joint attention

def local_attention(query: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                    radius: int, dilation: int | Sequence[int] = 1, temperature: float = 1.0,
                    out_of_image: OutOfImage = "mask",
                    centres: Sequence[torch.Tensor | None] | None = None,
                    value_centres: Sequence[torch.Tensor | None] | None = None,
                    align_corners: bool = True, tile: int = 8) -> torch.Tensor:
    """Copy values from N references through one softmax over all their window entries.

    ``logits = corr / temperature`` for every window entry of every reference; ``w = softmax`` over all
    ``N * O`` entries jointly; ``out[q] = sum w * value``. Computed reference by reference with a streaming
    softmax (memory independent of N).

    Args:
        query: ``(B, C, h, w)`` target features.
        keys: N tensors ``(B, C, h, w)``, reference features.
        values: N tensors ``(B, K, h, w)``, what is copied (quantised colours, a Lab channel, one-hot labels).
        radius: window half-size ``R``.
        dilation: one int, or one per reference.
        temperature: logits are divided by it (1 = raw dot products; ``sqrt(C)`` = the MAMP fix for MAST).
        out_of_image: ``"mask"`` (excluded from the softmax) or ``"zero"`` (logit 0, value 0: MAST quirk).
        centres: optional per-reference ``(B, 2, h, w)`` window-centre shifts for the correlation (ROI; ``None``
            entries = unshifted windows); shifted references must have dilation 1.
        value_centres: shifts used to gather the values (default: ``centres``; MAST's quirk (i) passes the last ROI
            reference's shift for every ROI reference).
        align_corners: bilinear convention of shifted windows (see :func:`shifted_local_correlation`).
        tile: tile side of the blocked correlation.

    Returns:
        ``(B, K, h, w)``.
    """
    n = len(keys)
    if n == 0 or len(values) != n:
        raise ValueError(f"keys/values: need the same number (>= 1) of references, got {len(keys)} and "
                         f"{len(values)}")
    if out_of_image not in ("mask", "zero"):
        raise ValueError(f"out_of_image: {out_of_image!r}; expected 'mask' or 'zero'")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    dils = [int(dilation)] * n if isinstance(dilation, int) else [int(d) for d in dilation]
    if len(dils) != n:
        raise ValueError(f"dilation: expected one value or {n}, got {len(dils)}")
    centres = list(centres) if centres is not None else [None] * n
    value_centres = list(value_centres) if value_centres is not None else list(centres)
    if len(centres) != n or len(value_centres) != n:
        raise ValueError(f"centres/value_centres: expected {n} entries (None for unshifted references)")
    b, _, h, w = query.shape
    run_max = run_den = run_num = None
    for i in range(n):
        _check_pair(query, keys[i], "query", f"keys[{i}]")
        _check_pair(query, values[i], "query", f"values[{i}]")
        if centres[i] is not None:
            if dils[i] != 1:
                raise ValueError(f"dilation[{i}]: shifted (ROI) references use dilation 1, got {dils[i]}")
            corr = shifted_local_correlation(query, keys[i], centres[i], radius=radius, align_corners=align_corners)
            valid = shifted_window_valid(centres[i], radius=radius) if out_of_image == "mask" else None
        else:
            corr = local_correlation(query, keys[i], radius=radius, dilation=dils[i], tile=tile)
            valid = (window_valid(h, w, radius=radius, dilation=dils[i], device=query.device)[None]
                     if out_of_image == "mask" else None)
        logits = corr / temperature
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        m = logits.detach().amax(dim=1)  # b h w (finite: the centre offset of an unshifted window is valid)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        new_max = m if run_max is None else torch.maximum(run_max, m)
        p = torch.exp(logits - new_max[:, None])
        if value_centres[i] is not None:
            num = shifted_local_aggregate(p, values[i], value_centres[i], radius=radius, align_corners=align_corners)
        else:
            num = local_aggregate(p, values[i], radius=radius, dilation=dils[i], tile=tile)
        den = p.sum(dim=1)
        if run_max is None:
            run_num, run_den = num, den
        else:
            scale = torch.exp(run_max - new_max)
            run_num = run_num * scale[:, None] + num
            run_den = run_den * scale + den
        run_max = new_max
    # a query whose every window entry is masked (shifted windows entirely outside the image) copies nothing
    return run_num / run_den.clamp_min(torch.finfo(run_den.dtype).tiny)[:, None]


def dense_local_attention(query: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                          radius: int, dilation: int | Sequence[int] = 1, temperature: float = 1.0,
                          out_of_image: OutOfImage = "mask") -> torch.Tensor:
    """Reference for :func:`local_attention` (unshifted windows): the full ``(h*w) x (N*h*w)`` affinity with an
    additive ``-inf`` mask outside the windows (memory ``O(N (h w)^2)``; tests only).

    With ``out_of_image="zero"`` each query also gets one extra candidate of logit 0 and value 0 per window entry
    that falls outside the image.

    Returns:
        ``(B, K, h, w)``.
    """
    n = len(keys)
    dils = [int(dilation)] * n if isinstance(dilation, int) else [int(d) for d in dilation]
    b, c, h, w = query.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=query.device), torch.arange(w, device=query.device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    q = rearrange(query, "b c h w -> b (h w) c")
    logits, vals, extra = [], [], []
    for i in range(n):
        d = dils[i]
        k = rearrange(keys[i], "b c h w -> b (h w) c")
        aff = einsum(q, k, "b q c, b p c -> b q p") / temperature
        dy = ys[None, :] - ys[:, None]  # key - query
        dx = xs[None, :] - xs[:, None]
        inside = ((dy % d == 0) & (dx % d == 0) & ((dy // d).abs() <= radius) & ((dx // d).abs() <= radius))
        logits.append(aff.masked_fill(~inside[None], float("-inf")))
        vals.append(rearrange(values[i], "b k h w -> b (h w) k"))
        n_in = inside.sum(dim=1)  # valid window entries per query
        extra.append((2 * radius + 1) ** 2 - n_in)
    logits_all = torch.cat(logits, dim=2)  # b q (n p)
    vals_all = torch.cat(vals, dim=1)  # b (n p) k
    if out_of_image == "zero":
        n_extra = torch.stack(extra).sum(0).to(logits_all.dtype)  # q
        m = torch.maximum(logits_all.amax(dim=2), torch.zeros((), dtype=logits_all.dtype))
        p = torch.exp(logits_all - m[..., None])
        den = p.sum(dim=2) + n_extra[None] * torch.exp(-m)
        out = einsum(p, vals_all, "b q p, b p k -> b q k") / den[..., None]
    else:
        out = einsum(torch.softmax(logits_all, dim=2), vals_all, "b q p, b p k -> b q k")
    return rearrange(out, "b (h w) k -> b k h w", h=h)
