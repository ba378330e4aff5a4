"""Label propagation: the pure tensor core used by ``vidssl propagate`` (spec: propagation_and_davis.md §1).

For a target frame, every query position ``q`` is compared with key positions ``(s, p)`` of the context frames
``s``: ``a(q; s, p) = <F_t[q], F_s[p]> / temperature`` when ``(q, p)`` passes the spatial restriction of frame ``s``
(else ``-inf``); the ``topk`` largest affinities over *all* keys of all context frames jointly are kept, softmaxed,
and the new soft label is ``y_t[:, q] = sum_k w_k * y_s[:, p_k]`` (the "global top-k softmax" family of CRW, VFS and
DINO).

Two implementations with the same semantics:

* :func:`label_propagation` -- memory-bounded. Queries are processed in chunks of whole tile rows. For unrestricted
  key frames every position is a candidate (one matmul per chunk). For restricted key frames the query map is cut
  into ``tile x tile`` tiles; each tile is multiplied with the key tiles grown by the window half-size on every side
  (one batched matmul ``tile^2 x (N_restricted * (tile + 2R)^2)`` per tile), and the ``(2R+1)^2``-window entries
  that satisfy the restriction are gathered from it. The dense ``(h*w) x (N*h*w)`` affinity is never built when a
  radius is set.
* :func:`dense_label_propagation` -- the straightforward reference: the full affinity with an additive ``-inf``
  mask.

Restrictions (positions in feature cells): ``circle`` keeps keys with ``dy^2 + dx^2 < radius^2`` (CRW, VFS),
``square`` keeps ``max(|dy|, |dx|) <= radius`` (DINO). ``restrict_mask[s]`` says whether the radius applies to key
frame ``s`` (CRW leaves the first frame unrestricted).

Top-k ties: selection uses :func:`torch.topk`; when several candidates share the k-th largest value exactly, which of
them is kept is unspecified (the official CRW code behaves the same way; DINO instead keeps all ties). Tied candidates
carry equal weights, so the result only depends on the choice when tied keys carry different labels. When fewer
than ``topk`` candidates pass the restriction, the remaining slots hold ``-inf`` affinities and get weight 0.

Precision: ``dtype=torch.bfloat16`` computes the affinity matmuls in bf16; top-k, softmax and the label sum are
always float32.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Container, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from vidssl.models.window_tiles import TiledWindows

RestrictShape = Literal["circle", "square"]

__all__ = [
    "FeatureCache",
    "context_indices",
    "dense_label_propagation",
    "label_propagation",
    "propagate_video",
    "window_offsets",
]


def window_offsets(*, radius: float, shape: RestrictShape, max_dy: int | None = None,
                   max_dx: int | None = None) -> torch.Tensor:
    """Offsets ``(dy, dx)`` allowed by a spatial restriction, in row-major order (dy outer, dx inner).

    Args:
        radius: restriction radius in feature cells (``> 0`` for ``circle``, ``>= 0`` for ``square``).
        shape: ``"circle"`` (``dy^2 + dx^2 < radius^2``) or ``"square"`` (``max(|dy|, |dx|) <= radius``).
        max_dy, max_dx: drop offsets with ``|dy| > max_dy`` / ``|dx| > max_dx`` (they can never land inside an
            image of height ``max_dy + 1`` / width ``max_dx + 1``).

    Returns:
        ``(O, 2)`` int64 tensor of offsets.
    """
    if shape not in ("circle", "square"):
        raise ValueError(f"restrict_shape: {shape!r}; expected 'circle' or 'square'")
    if shape == "circle" and not radius > 0:
        raise ValueError(f"radius: must be > 0 for a circle restriction (dy^2+dx^2 < r^2), got {radius}")
    if shape == "square" and not radius >= 0:
        raise ValueError(f"radius: must be >= 0 for a square restriction, got {radius}")
    r = int(math.ceil(radius))
    ry = r if max_dy is None else min(r, max_dy)
    rx = r if max_dx is None else min(r, max_dx)
    dy = torch.arange(-ry, ry + 1)
    dx = torch.arange(-rx, rx + 1)
    grid_y, grid_x = torch.meshgrid(dy, dx, indexing="ij")
    if shape == "circle":
        keep = (grid_y**2 + grid_x**2).double() < float(radius) ** 2
    else:
        keep = torch.maximum(grid_y.abs(), grid_x.abs()).double() <= float(radius)
    return torch.stack([grid_y[keep], grid_x[keep]], dim=1)


def _check_inputs(query: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, topk: int,
                  temperature: float, restrict_mask: Sequence[bool] | torch.Tensor | None) -> torch.Tensor:
    if query.ndim != 3:
        raise ValueError(f"query: expected (C, h, w), got shape {tuple(query.shape)}")
    if keys.ndim != 4 or keys.shape[1:] != query.shape:
        raise ValueError(f"keys: expected (N, C, h, w) = (N, {', '.join(map(str, query.shape))}), "
                         f"got shape {tuple(keys.shape)}")
    if key_labels.ndim != 4 or key_labels.shape[0] != keys.shape[0] or key_labels.shape[2:] != keys.shape[2:]:
        raise ValueError(f"key_labels: expected (N, K1, h, w) with N={keys.shape[0]}, (h, w)={tuple(keys.shape[2:])}, "
                         f"got shape {tuple(key_labels.shape)}")
    if keys.shape[0] < 1:
        raise ValueError("keys: need at least one context frame")
    if int(topk) < 1:
        raise ValueError(f"topk: must be >= 1, got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    n = keys.shape[0]
    if restrict_mask is None:
        return torch.ones(n, dtype=torch.bool)
    mask = torch.as_tensor(restrict_mask, dtype=torch.bool).flatten().cpu()
    if mask.numel() != n:
        raise ValueError(f"restrict_mask: expected {n} entries (one per key frame), got {mask.numel()}")
    return mask


def dense_label_propagation(query: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, *, topk: int,
                            temperature: float, radius: float | None = None,
                            restrict_shape: RestrictShape = "circle",
                            restrict_mask: Sequence[bool] | torch.Tensor | None = None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference label propagation with the full affinity matrix (memory ``O(h*w * N*h*w)``).

    Args:
        query: ``(C, h, w)`` target-frame features.
        keys: ``(N, C, h, w)`` context-frame features.
        key_labels: ``(N, K1, h, w)`` soft labels of the context frames.
        topk: number of affinities kept per query over all context frames jointly.
        temperature: affinities are divided by it before the softmax.
        radius: spatial restriction radius in feature cells, ``None`` for no restriction.
        restrict_shape: ``"circle"`` or ``"square"`` (see module docstring).
        restrict_mask: ``(N,)`` bools, whether the radius applies to each key frame (default: all).
        dtype: matmul dtype (``torch.bfloat16`` for bf16 affinities; default: the feature dtype).

    Returns:
        ``(K1, h, w)`` float32 propagated soft labels.
    """
    restricted = _check_inputs(query, keys, key_labels, topk, temperature, restrict_mask)
    n, c, h, w = keys.shape
    dt = dtype or query.dtype
    q = rearrange(query.float() / temperature, "c h w -> (h w) c").to(dt)  # temperature folded into the query
    k = rearrange(keys, "n c h w -> n (h w) c").to(dt)
    aff = einsum(q, k, "q c, n p c -> q n p").float()  # (hw, N, hw) = <q, k> / temperature
    if radius is not None and bool(restricted.any()):
        ys, xs = torch.meshgrid(torch.arange(h, device=query.device), torch.arange(w, device=query.device),
                                indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        dy = ys[:, None] - ys[None, :]  # (hw_q, hw_k)
        dx = xs[:, None] - xs[None, :]
        if restrict_shape == "circle":
            allowed = (dy**2 + dx**2).double() < float(radius) ** 2
        elif restrict_shape == "square":
            allowed = torch.maximum(dy.abs(), dx.abs()).double() <= float(radius)
        else:
            raise ValueError(f"restrict_shape: {restrict_shape!r}; expected 'circle' or 'square'")
        del dy, dx
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device)
        additive.masked_fill_(~allowed, float("-inf"))
        for s in restricted.nonzero().flatten().tolist():
            aff[:, s] += additive
    aff = rearrange(aff, "q n p -> q (n p)")
    kk = min(int(topk), aff.shape[1])
    vals, idx = torch.topk(aff, kk, dim=1)
    weights = torch.softmax(vals, dim=1)  # (hw, k)
    labels = rearrange(key_labels.float(), "n c h w -> (n h w) c")
    out = einsum(weights, labels[idx], "q k, q k c -> q c")
    return rearrange(out, "(h w) c -> c h w", h=h, w=w)


def label_propagation(query: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, *, topk: int,
                      temperature: float, radius: float | None = None, restrict_shape: RestrictShape = "circle",
                      restrict_mask: Sequence[bool] | torch.Tensor | None = None, chunk_size: int = 1024,
                      tile: int = 12, dtype: torch.dtype | None = None, stats: dict | None = None) -> torch.Tensor:
    """Propagate soft labels from context frames to one target frame, with bounded memory.

    Same semantics as :func:`dense_label_propagation` (up to float rounding and the top-k tie rule in the module
    docstring). With a radius, restricted key frames only contribute the ``(2R+1)^2`` window around each query
    (gathered from one batched per-tile matmul per chunk), unrestricted ones every position; the global top-k runs
    over the concatenation. Peak extra memory per chunk of ``Q`` queries (whole tile rows) is about
    ``Q * (n_free*h*w + n_restricted*(2R+1)^2)`` candidate floats plus the restricted frames' key tiles and tile
    affinities (``n_restricted * (tile + 2R)^2`` per tile); it never grows with ``(h*w)^2``.

    Args:
        query: ``(C, h, w)`` target-frame features.
        keys: ``(N, C, h, w)`` context-frame features.
        key_labels: ``(N, K1, h, w)`` soft labels of the context frames.
        topk: number of affinities kept per query over all context frames jointly.
        temperature: affinities are divided by it before the softmax.
        radius: spatial restriction radius in feature cells; ``None`` = no restriction.
        restrict_shape: ``"circle"`` (``dy^2+dx^2 < r^2``) or ``"square"`` (``max(|dy|,|dx|) <= r``).
        restrict_mask: ``(N,)`` bools, whether the radius applies to each key frame (default: all; CRW: frame 0
            free).
        chunk_size: approximate number of query positions processed at once (rounded to whole tile rows).
        tile: side of the query tiles used for restricted frames.
        dtype: matmul dtype (``torch.bfloat16`` for bf16 affinities); top-k/softmax always run in float32.
        stats: optional dict; when given, ``affinity_s``, ``affinity_flop``, ``select_s`` and ``chunks`` are
            accumulated into it (for benchmarks).

    Returns:
        ``(K1, h, w)`` float32 propagated soft labels.
    """
    restricted = _check_inputs(query, keys, key_labels, topk, temperature, restrict_mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    if tile < 1:
        raise ValueError(f"tile: must be >= 1, got {tile}")
    if radius is None:
        restricted = torch.zeros_like(restricted)
    elif restrict_shape not in ("circle", "square"):
        raise ValueError(f"restrict_shape: {restrict_shape!r}; expected 'circle' or 'square'")
    n, c, h, w = keys.shape
    hw = h * w
    device = query.device
    dt = dtype or query.dtype
    labels_flat = rearrange(key_labels.float(), "n k h w -> (n h w) k")  # (N*hw, K1)
    k_num = labels_flat.shape[1]
    free = (~restricted).nonzero().flatten().tolist()
    restr = restricted.nonzero().flatten().tolist()

    if radius is not None and restr:
        offsets = window_offsets(radius=radius, shape=restrict_shape, max_dy=h - 1, max_dx=w - 1).to(device)
    else:
        offsets = torch.zeros(0, 2, dtype=torch.long, device=device)
    n_off = offsets.shape[0]
    th = tw = tile
    wq = -(-w // tw) * tw
    rows_per_chunk = max(1, chunk_size // (th * wq))
    # Query tiles, and the restricted key frames' window affinities computed tile by tile (vidssl.models.window_tiles);
    # temperature folded into the query (same rounding as the dense reference). Work buffers are allocated once per
    # call and reused by every chunk, hence out= below.
    contiguous = bool(restr) and restr == list(range(restr[0], restr[-1] + 1))  # CRW 1..N-1, DINO all: a view
    windows = TiledWindows((keys[restr[0]:restr[-1] + 1] if contiguous else keys[restr])[None], offsets, tile=tile,
                           query=(query.float() / temperature).to(dt)[None],
                           buffer_rows=rows_per_chunk if restr else None, dtype=dt)
    nty, ntx = windows.tile_rows, windows.tile_cols

    n_free, n_restr = len(free), len(restr)
    free_cols, restr_cols = n_free * hw, n_restr * n_off
    kk = min(int(topk), free_cols + restr_cols)
    free_t = torch.tensor(free, dtype=torch.long, device=device)
    restr_t = torch.tensor(restr, dtype=torch.long, device=device)
    keys_free = rearrange(keys[free].to(dt), "n c h w -> c (n h w)") if free else None  # (C, nf*hw)
    t2 = th * tw
    if free:
        fbuf = torch.empty(rows_per_chunk * ntx * t2, free_cols, dtype=dt, device=device)

    out = torch.empty(nty, ntx, t2, k_num, dtype=torch.float32, device=device)
    for ty0 in range(0, nty, rows_per_chunk):
        ty1 = min(nty, ty0 + rows_per_chunk)
        nr = ty1 - ty0
        q_tiles = windows.query_tiles(ty0, ty1)  # (m, t2, C)
        q_flat = rearrange(q_tiles, "m q c -> (m q) c")  # (Q, C), tile-major query order
        n_q = q_flat.shape[0]
        t0 = time.perf_counter()
        flop = 0
        picks = []  # (values (Q, k'), indices (Q, k')) of the free part and of the restricted part
        if free:
            aff_f = torch.matmul(q_flat, keys_free, out=fbuf[:n_q])  # (Q, nf*hw): q c, c p -> q p
            flop += 2 * n_q * c * free_cols
        if restr:
            # Absolute key position of every (query, offset) pair of this chunk, and whether it is inside the image.
            win_pos, valid = windows.key_positions(ty0, ty1)  # (m, t2, O)
            win_pos = rearrange(win_pos, "m q o -> (m q) o")
            picked = windows.affinity(ty0, ty1, q_tiles)  # (m, t2, Nr, O); one batched matmul for all frames
            flop += 2 * n_q * c * n_restr * windows.win_h * windows.win_w
            picked.masked_fill_(rearrange(~valid, "m q o -> m q 1 o"), float("-inf"))
        t1 = time.perf_counter()
        # Global top-k = top-k of the union of the free part's and the restricted part's top-k.
        if free:
            picks.append(torch.topk(aff_f, min(kk, free_cols), dim=1))
        if restr:
            picks.append(torch.topk(rearrange(picked, "m q n o -> (m q) (n o)"), min(kk, restr_cols), dim=1))
        if len(picks) == 2:
            both = torch.cat([picks[0].values, picks[1].values], dim=1).float()
            vals, sel = torch.topk(both, kk, dim=1)
            k_f = picks[0].values.shape[1]
            from_free = sel < k_f
            idx_f = torch.gather(picks[0].indices, 1, sel.clamp(max=k_f - 1))
            idx_r = torch.gather(picks[1].indices, 1, (sel - k_f).clamp(min=0))
        elif free:
            vals, idx_f = picks[0].values.float(), picks[0].indices
            from_free = torch.ones_like(idx_f, dtype=torch.bool)
            idx_r = torch.zeros_like(idx_f)
        else:
            vals, idx_r = picks[0].values.float(), picks[0].indices
            from_free = torch.zeros_like(idx_r, dtype=torch.bool)
            idx_f = torch.zeros_like(idx_r)
        weights = torch.softmax(vals, dim=1)  # (Q, k) float32
        if free:
            f_frame, f_pos = free_t[(idx_f // hw).clamp(max=n_free - 1)], idx_f % hw
        if restr:
            r_frame = restr_t[(idx_r // n_off).clamp(max=n_restr - 1)]
            r_pos = torch.gather(win_pos, 1, idx_r % n_off)
        if free and restr:
            frame, pos = torch.where(from_free, f_frame, r_frame), torch.where(from_free, f_pos, r_pos)
        elif free:
            frame, pos = f_frame, f_pos
        else:
            frame, pos = r_frame, r_pos
        picked_labels = labels_flat[frame * hw + pos]  # (Q, k, K1)
        res = einsum(weights, picked_labels, "q k, q k c -> q c")
        out[ty0:ty1] = rearrange(res, "(a b q) c -> a b q c", a=nr, b=ntx)
        if stats is not None:
            stats["affinity_s"] = stats.get("affinity_s", 0.0) + (t1 - t0)
            stats["affinity_flop"] = stats.get("affinity_flop", 0) + flop
            stats["select_s"] = stats.get("select_s", 0.0) + (time.perf_counter() - t1)
            stats["chunks"] = stats.get("chunks", 0) + 1
    full = rearrange(out, "a b (i j) c -> c (a i) (b j)", i=th, j=tw)
    return full[:, :h, :w].contiguous()


def context_indices(t: int, *, context: int, pad_prev_with_first: bool, use_first: bool = True) -> list[int]:
    """Context frames for target ``t >= 1``: ``[0]`` (if ``use_first``) followed by the ``context`` preceding frames.

    With ``pad_prev_with_first`` (CRW) the preceding list always has ``context`` entries, frame indices below 0
    replaced by 0 (copies of the first frame, restricted like any short-term frame). Without it (DINO, VFS) the
    preceding list holds only the real frames ``max(1, t - context) .. t - 1`` (fewer early on; frame 0 appears only
    as the first-frame entry).

    Returns:
        frame indices, oldest first among the preceding ones.
    """
    if t < 1:
        raise ValueError(f"t: targets start at 1, got {t}")
    if context < 0:
        raise ValueError(f"context: must be >= 0, got {context}")
    if pad_prev_with_first:
        prev = [max(0, i) for i in range(t - context, t)]
    else:
        prev = list(range(max(1, t - context), t))
    first = [0] if use_first else []
    out = first + prev
    if not out:
        raise ValueError(f"target {t} has an empty context (context={context}, use_first={use_first})")
    return out


class FeatureCache:
    """Features by frame index for the propagation loops (CRW/DINO here, MAST/CorrFlow in ``mast_propagation``).

    ``feats`` is a ``(T, C, h, w)`` tensor or a callable ``t -> (C, h, w)`` (such as
    :class:`~vidssl.evaluation.features.FrameFeatures`); each frame is fetched once and kept until :meth:`retain`
    drops it, so a callable sees every frame requested once, in the order the loop first needs them.

    Args:
        feats: the features or the provider.
        num_frames: ``T`` (required with a callable; at most ``feats.shape[0]`` with a tensor).
        size: when given, every frame's features must be ``(C, *size)`` (errors name the frame).
    """

    def __init__(self, feats: torch.Tensor | Callable[[int], torch.Tensor], num_frames: int | None = None, *,
                 size: tuple[int, int] | None = None) -> None:
        if callable(feats) and not isinstance(feats, torch.Tensor):
            if num_frames is None:
                raise ValueError("num_frames: required when feats is a callable")
            self.get, self.total = feats, int(num_frames)
        else:
            if feats.ndim != 4:
                raise ValueError(f"feats: expected (T, C, h, w), got shape {tuple(feats.shape)}")
            self.total = feats.shape[0] if num_frames is None else int(num_frames)
            if self.total > feats.shape[0]:
                raise ValueError(f"num_frames: {self.total} exceeds the {feats.shape[0]} frames of feats")
            self.get = feats.__getitem__
        self.size = None if size is None else tuple(int(s) for s in size)
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            f = self.get(i)
            if self.size is not None and (f.ndim != 3 or tuple(f.shape[1:]) != self.size):
                raise ValueError(f"features of frame {i}: expected (C, {self.size[0]}, {self.size[1]}), got shape "
                                 f"{tuple(f.shape)}")
            self.cache[i] = f
        return self.cache[i]

    def retain(self, keep: Container[int]) -> None:
        """Drop the cached frames not in ``keep``."""
        for i in [i for i in self.cache if i not in keep]:
            del self.cache[i]


def propagate_video(feats: torch.Tensor | Callable[[int], torch.Tensor], first_labels: torch.Tensor, *,
                    topk: int, temperature: float, context: int, radius: float | None = None,
                    restrict_shape: RestrictShape = "circle", first_frame_restricted: bool = False,
                    pad_prev_with_first: bool = True, use_first: bool = True,
                    feedback: Literal["soft", "hard"] = "soft", num_frames: int | None = None,
                    chunk_size: int = 1024, tile: int = 12, dtype: torch.dtype | None = None,
                    impl: Literal["auto", "sparse", "dense"] = "auto", dense_max_entries: int = 1 << 22,
                    on_frame: Callable[[int, torch.Tensor], None] | None = None,
                    stats: dict | None = None) -> torch.Tensor:
    """Propagate first-frame labels through a video (semi-supervised VOS protocol).

    Args:
        feats: ``(T, C, h, w)`` features of every frame, or a callable ``t -> (C, h, w)``. With a callable each frame
            is requested once and cached while it can still appear in a context (frame 0 for the whole video).
        first_labels: ``(K1, h, w)`` first-frame labels at feature resolution (soft or one-hot).
        topk, temperature, radius, restrict_shape: see :func:`label_propagation`.
        context: number of preceding frames in each target's context (see :func:`context_indices`).
        first_frame_restricted: whether the radius also applies to the first frame (DINO, VFS) or not (CRW).
        pad_prev_with_first: CRW's padding of the history with copies of frame 0.
        use_first: include frame 0 in every context.
        feedback: ``"soft"`` stores the propagated soft label as the key label of frame t; ``"hard"`` stores the
            one-hot of its argmax (at feature resolution).
        num_frames: ``T``; required when ``feats`` is a callable.
        chunk_size, tile, dtype: memory/precision knobs of :func:`label_propagation`.
        impl: ``"sparse"`` (:func:`label_propagation`), ``"dense"`` (:func:`dense_label_propagation`, reference) or
            ``"auto"``: dense when one target's full affinity has at most ``dense_max_entries`` entries (small
            feature maps, where the windowed path's per-chunk overhead dominates; same results), else sparse. Memory
            stays bounded either way.
        on_frame: optional callback ``(t, labels (K1, h, w))`` called after each frame (frame 0 included).
        stats: forwarded to :func:`label_propagation`.

    Returns:
        ``(T, K1, h, w)`` float32 soft labels; entry 0 is ``first_labels``.

    Example (CRW protocol)::

        feats = F.normalize(torch.randn(5, 64, 30, 40), dim=1)  # (T, C, h, w)
        first = torch.zeros(2, 30, 40); first[0] = 1; first[:, 10:20, 10:20] = torch.tensor([0., 1.])[:, None, None]
        labels = propagate_video(feats, first, topk=10, temperature=0.05, context=20, radius=12)  # (5, 2, 30, 40)
    """
    if first_labels.ndim != 3:
        raise ValueError(f"first_labels: expected (K1, h, w), got shape {tuple(first_labels.shape)}")
    if feedback not in ("soft", "hard"):
        raise ValueError(f"feedback: {feedback!r}; expected 'soft' or 'hard'")
    if impl not in ("auto", "sparse", "dense"):
        raise ValueError(f"impl: {impl!r}; expected 'auto', 'sparse' or 'dense'")
    feat = FeatureCache(feats, num_frames, size=tuple(first_labels.shape[1:]))
    total = feat.total
    k1, h, w = first_labels.shape
    y0 = first_labels.float()
    preds = torch.empty(total, k1, h, w, dtype=torch.float32, device=y0.device)
    preds[0] = y0
    stored: dict[int, torch.Tensor] = {0: y0}  # key labels (soft or hard feedback)
    if on_frame is not None:
        on_frame(0, y0)
    feat(0)
    for t in range(1, total):
        ctx = context_indices(t, context=context, pad_prev_with_first=pad_prev_with_first, use_first=use_first)
        keys = torch.stack([feat(i) for i in ctx])
        key_labels = torch.stack([stored[i] for i in ctx])
        rmask = [first_frame_restricted if (use_first and j == 0) else True for j in range(len(ctx))]
        query = feat(t)
        use_sparse = impl == "sparse" or (impl == "auto" and (h * w) ** 2 * len(ctx) > dense_max_entries)
        if use_sparse:
            y = label_propagation(query, keys, key_labels, topk=topk, temperature=temperature, radius=radius,
                                  restrict_shape=restrict_shape, restrict_mask=rmask, chunk_size=chunk_size,
                                  tile=tile, dtype=dtype, stats=stats)
        else:
            y = dense_label_propagation(query, keys, key_labels, topk=topk, temperature=temperature, radius=radius,
                                        restrict_shape=restrict_shape, restrict_mask=rmask, dtype=dtype)
        preds[t] = y
        if feedback == "soft":
            stored[t] = y
        else:
            stored[t] = rearrange(F.one_hot(y.argmax(0), k1).float(), "h w k -> k h w")
        if on_frame is not None:
            on_frame(t, y)
        # Drop features and labels that no later target can use (frame 0 stays).
        oldest = t + 1 - context
        feat.retain({0, *range(oldest, t + 1)})
        for i in [i for i in stored if i != 0 and i < oldest]:
            del stored[i]
    return preds
