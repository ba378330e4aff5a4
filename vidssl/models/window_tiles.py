"""The one tiled window-affinity kernel: every query position against a local window of key positions.

``aff[b, q, n, o] = < query[b, :, q], keys[b, n, :, q + offset_o] >`` (0 where ``q + offset_o`` is outside the image)
for ``O`` arbitrary integer offsets (a square window, a circle, a clipped window) and ``N`` key maps per query map,
without the ``(h*w)^2`` affinity and without a ``C * O`` unfold:

* the query map is cut into ``tile x tile`` tiles; the keys are zero-padded by the window half-sizes ``(ry, rx)`` and
  stored channels-last, so the key block a tile can see is a ``(tile + 2 ry) x (tile + 2 rx)`` "grown" tile;
* one batched matmul per group of tiles multiplies each query tile with the grown tiles of all ``N`` key maps
  (``tile^2 x (N (tile + 2ry)(tile + 2rx))``), and the ``O`` window entries of every query are gathered from it.

Used by :func:`vidssl.models.local_attention.local_correlation` (CorrFlow / MAST windows, with autograd) and by the
sparse label propagation of :mod:`vidssl.evaluation.propagation` (circle/square restrictions, tile rows processed in
chunks into preallocated buffers). :func:`window_tile_index` and :meth:`TiledWindows.key_tiles` also serve the
transposed operation (aggregating values over windows, :func:`vidssl.models.local_attention.local_aggregate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["TiledWindows", "window_tile_index"]


def window_tile_index(tile: int, offsets: torch.Tensor, ry: int, rx: int) -> torch.Tensor:
    """Index of each (query in a tile, offset) into the flattened grown key tile of ``(tile + 2ry) x (tile + 2rx)``.

    Args:
        offsets: ``(O, 2)`` int64 ``(dy, dx)`` with ``|dy| <= ry`` and ``|dx| <= rx``.

    Returns:
        ``(tile^2, O)`` int64 on ``offsets.device``; queries row-major within the tile.
    """
    device = offsets.device
    li, lj = torch.meshgrid(torch.arange(tile, device=device), torch.arange(tile, device=device), indexing="ij")
    li, lj = li.flatten(), lj.flatten()
    return (li[:, None] + ry + offsets[None, :, 0]) * (tile + 2 * rx) + (lj[:, None] + rx + offsets[None, :, 1])


class TiledWindows:
    """Query tiles, grown key tiles and window affinities of one query map against ``N`` key maps.

    Args:
        keys: ``(B, N, C, h, w)`` (a view is fine: they are copied once, padded, in ``dtype``).
        offsets: ``(O, 2)`` int64 window offsets ``(dy, dx)`` (any set, in the order the output should have).
        tile: query tile side.
        query: ``(B, C, h, w)`` (scale it first, e.g. by ``1 / temperature``); may be omitted when only
            :meth:`key_tiles` are needed (window aggregation).
        buffer_rows: when given, the key tiles, the tile affinities and the picked window entries are written into
            buffers sized for this many tile rows, allocated once and reused by every call (large fresh allocations
            per chunk cost as much system time in page faults as the matmuls take). Inference only: the results
            are views of the buffers, overwritten by the next call.
        dtype: matmul dtype (default: the keys' dtype); query and keys are converted while they are padded.

    Tiles are numbered row-major; tile row ``a`` covers query rows ``a*tile .. (a+1)*tile - 1``. Positions past the
    image (the query map is padded to whole tiles) get affinities with zero queries; callers crop them.

    Example::

        tw = TiledWindows(k[None, None], window_offsets(6), tile=8, query=q[None])
        aff = tw.affinity(0, tw.tile_rows)  # (num_tiles, 64, 1, 169)
    """

    def __init__(self, keys: torch.Tensor, offsets: torch.Tensor, *, tile: int, query: torch.Tensor | None = None,
                 buffer_rows: int | None = None, dtype: torch.dtype | None = None) -> None:
        if keys.ndim != 5 or (query is not None and (query.ndim != 4 or keys.shape[0] != query.shape[0]
                                                      or keys.shape[2:] != query.shape[1:])):
            raise ValueError(f"query/keys: expected (B, C, h, w) and (B, N, C, h, w), got "
                             f"{None if query is None else tuple(query.shape)} and {tuple(keys.shape)}")
        if offsets.ndim != 2 or offsets.shape[1] != 2:
            raise ValueError(f"offsets: expected (O, 2), got {tuple(offsets.shape)}")
        if tile < 1:
            raise ValueError(f"tile: must be >= 1, got {tile}")
        b, n, c, h, w = keys.shape
        self.batch, self.num_keys, self.channels, self.height, self.width = b, n, c, h, w
        self.tile = int(tile)
        self.offsets = offsets
        if offsets.shape[0]:
            self.ry, self.rx = int(offsets[:, 0].abs().max()), int(offsets[:, 1].abs().max())
        else:
            self.ry = self.rx = 0
        th = self.tile
        hq, wq = -(-h // th) * th, -(-w // th) * th
        self.tile_rows, self.tile_cols = hq // th, wq // th
        self.win_h, self.win_w = th + 2 * self.ry, th + 2 * self.rx
        dtype = dtype or keys.dtype
        self.qpad = None if query is None else self.pad(query.to(dtype))  # (B, C, hq, wq)
        self.index = window_tile_index(th, offsets, self.ry, self.rx)  # (t2, O)
        self.buffers = None
        if buffer_rows is None:
            # Keys padded by the window half-sizes, channels-first: key tiles are views where the layout allows
            # (differentiable; the matmul reads them in place).
            self.kpad = F.pad(keys.to(dtype), (self.rx, wq - w + self.rx, self.ry, hq - h + self.ry))
        else:
            # Channels-last, so that copying key tiles into the buffer moves contiguous C-vectors.
            self.kpad = keys.new_zeros(b, n, hq + 2 * self.ry, wq + 2 * self.rx, c, dtype=dtype)
            self.kpad[:, :, self.ry:self.ry + h, self.rx:self.rx + w] = rearrange(keys, "b n c h w -> b n h w c")
            m_max = b * min(int(buffer_rows), self.tile_rows) * self.tile_cols
            t2, p = th * th, self.win_h * self.win_w
            self.buffers = (keys.new_empty(m_max, n, self.win_h, self.win_w, c, dtype=dtype),
                            keys.new_empty(m_max, t2, n * p, dtype=dtype),
                            keys.new_empty(m_max, t2, n, offsets.shape[0], dtype=dtype))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` -> zero-padded to whole tiles ``(B, K, tile_rows * tile, tile_cols * tile)``."""
        return F.pad(x, (0, self.tile_cols * self.tile - self.width, 0, self.tile_rows * self.tile - self.height))

    def query_tiles(self, row0: int, row1: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """Queries of tile rows ``row0 .. row1 - 1``: ``(B * tiles, tile^2, C)``, tiles row-major.

        With ``x`` (a :meth:`pad`-ded ``(B, K, ...)`` map, e.g. window weights) the same tiling of ``x``.
        """
        th = self.tile
        x = self.qpad if x is None else x
        return rearrange(x[:, :, row0 * th:row1 * th], "b c (a i) (d j) -> (b a d) (i j) c", i=th, j=th)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`query_tiles` over all rows: ``(B * tiles, tile^2, ...)`` -> ``(B, ..., h, w)``
        (trailing dimensions flattened into channels, the padding cropped)."""
        th = self.tile
        out = rearrange(x, "(b a d) (i j) ... -> b (...) (a i) (d j)", b=self.batch, a=self.tile_rows, i=th)
        return out[:, :, :self.height, :self.width]

    def key_tiles(self, row0: int, row1: int) -> torch.Tensor:
        """Grown key tiles of tile rows ``row0 .. row1 - 1``: ``(B * tiles, N * win_h * win_w, C)``."""
        th = self.tile
        if self.buffers is None:
            band = self.kpad[..., row0 * th:row1 * th + 2 * self.ry, :]  # (B, N, C, rows*th + 2ry, wq + 2rx)
            view = band.unfold(3, self.win_h, th).unfold(4, self.win_w, th)  # (B, N, C, a, d, win_h, win_w) view
            return rearrange(view, "b n c a d y x -> (b a d) (n y x) c")
        band = self.kpad[:, :, row0 * th:row1 * th + 2 * self.ry]  # (B, N, rows*th + 2ry, wq + 2rx, C)
        view = band.unfold(2, self.win_h, th).unfold(3, self.win_w, th)  # (B, N, a, d, C, win_h, win_w) view
        m = self.batch * (row1 - row0) * self.tile_cols
        k_tiles = self.buffers[0][:m]
        k_tiles.view(self.batch, row1 - row0, self.tile_cols, self.num_keys, self.win_h, self.win_w,
                     self.channels).copy_(rearrange(view, "b n a d c y x -> b a d n y x c"))
        return rearrange(k_tiles, "m n y x c -> m (n y x) c")

    def affinity(self, row0: int, row1: int, q_tiles: torch.Tensor | None = None) -> torch.Tensor:
        """Window affinities of the queries of tile rows ``row0 .. row1 - 1``.

        Args:
            q_tiles: the :meth:`query_tiles` of these rows when the caller already has them.

        Returns:
            ``(B * tiles, tile^2, N, O)``; entries whose key position is outside the image are 0.
        """
        q = self.query_tiles(row0, row1) if q_tiles is None else q_tiles
        k = self.key_tiles(row0, row1)
        m, t2, n, o = q.shape[0], q.shape[1], self.num_keys, self.index.shape[1]
        idx = self.index[None, :, None, :].expand(m, t2, n, o)
        if self.buffers is None:
            aff = torch.matmul(q, k.transpose(1, 2))  # m q c, m p c -> m q p (all N key maps in one matmul)
            return torch.gather(rearrange(aff, "m q (n p) -> m q n p", n=n), 3, idx)
        aff = torch.matmul(q, k.transpose(1, 2), out=self.buffers[1][:m])
        return torch.gather(rearrange(aff, "m q (n p) -> m q n p", n=n), 3, idx, out=self.buffers[2][:m])

    def key_positions(self, row0: int, row1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat key position ``y * w + x`` of every (query, offset) of tile rows ``row0 .. row1 - 1`` and whether
        it lies inside the image (outside: position 0).

        Returns:
            ``(tiles, tile^2, O)`` int64 positions and bools (the same for every batch entry and key map).
        """
        th, device = self.tile, self.offsets.device
        li, lj = torch.meshgrid(torch.arange(th, device=device), torch.arange(th, device=device), indexing="ij")
        ty = torch.arange(row0, row1, device=device)[:, None, None, None]
        tx = torch.arange(self.tile_cols, device=device)[None, :, None, None]
        ky = ty * th + li.flatten()[None, None, :, None] + self.offsets[None, None, None, :, 0]  # (a, d, t2, O)
        kx = tx * th + lj.flatten()[None, None, :, None] + self.offsets[None, None, None, :, 1]
        valid = (ky >= 0) & (ky < self.height) & (kx >= 0) & (kx < self.width)
        pos = torch.where(valid, ky * self.width + kx, torch.zeros_like(ky))
        return rearrange(pos, "a d q o -> (a d) q o"), rearrange(valid, "a d q o -> (a d) q o")
