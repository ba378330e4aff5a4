"""Contrastive losses as pure functions with shape docstrings, plus thin ``nn.Module`` wrappers.

Every softmax-family loss is a *score builder* followed by :func:`info_nce`:

=====================  ====================================  ==============================================
loss                   score builder                         candidates of a row
=====================  ====================================  ==============================================
:func:`info_nce`       any ``(B, N)`` matrix                 the N columns (``valid`` excludes some)
in-batch InfoNCE       :func:`in_batch_scores`               every key of the (gathered) batch
:func:`nt_xent`        :func:`nt_xent_scores`                the other 2B - 1 views (self masked)
:func:`moco_loss`      :func:`moco_scores`                   its key, then the K queued keys
memory bank softmax    :func:`memory_bank_scores`            all N bank entries, or [positive, m sampled]
:func:`npair_loss`     :func:`in_batch_scores` (raw dot)     every positive of the batch
:func:`cmc_loss`       :func:`cmc_scores`                    the other view, in-batch or from its bank
=====================  ====================================  ==============================================

They return ``(loss, num_candidates)``: ``log N - loss`` is the InfoNCE lower bound on mutual information in nats
(chance level gives exactly ``loss = log N``). :func:`nce_loss` (binary data-vs-noise classification, Gutmann &
Hyvarinen 2010) and :func:`memory_bank_nce` return the loss alone.

Numerics: scores and losses are computed in float32 with autocast disabled, whatever the input dtype (a bf16
similarity matmul loses ~3 significant digits of the logits); log-sum-exp throughout (``F.cross_entropy``,
``torch.logsumexp``, ``F.logsigmoid``); excluded entries are filled with ``finfo(float32).min``, never ``-inf``.

Cross-rank negatives: ``gather=True`` concatenates the candidates of every rank with :func:`gather_with_grad`, so the
mean over ranks of the per-rank losses -- what DDP's gradient averaging optimises -- equals the loss of one process
over the concatenated batch. Queues and memory banks are replicated: their updates all-gather the new entries.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.losses.distributed import broadcast_, gather_no_grad, gather_with_grad, rank_and_world

__all__ = ["CMCLoss", "MemoryBank", "MemoryBankLoss", "MoCoLoss", "MoCoQueue", "NCELoss", "NPairLoss", "InfoNCELoss",
           "NTXentLoss", "batch_shuffle", "batch_unshuffle", "cmc_loss", "cmc_scores", "contrastive_logs",
           "estimate_log_normaliser", "in_batch_scores", "info_nce", "memory_bank_nce", "memory_bank_scores",
           "moco_loss", "moco_scores", "momentum_update", "nce_loss", "npair_loss", "nt_xent", "nt_xent_scores"]

_MASKED = torch.finfo(torch.float32).min  # logit of an excluded candidate (scores are float32 here)


def _fp32_region(x: torch.Tensor) -> torch.autocast:
    """Context in which autocast is off, so float32 operands give float32 matmuls and reductions."""
    return torch.autocast(x.device.type, enabled=False)


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must both be (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")


# ----------------------------------------------------------------------------------------------------- InfoNCE core


def _positives(target: torch.Tensor | int | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Target as ``(B,)`` int64 column indices or a ``(B, N)`` bool positive mask."""
    if target is None:  # in-batch: row i's positive is column i
        if n < batch:
            raise ValueError(f"target=None means the diagonal, which needs N >= B; got scores of shape ({batch}, {n})")
        return torch.arange(batch, device=device)  # (B,)
    if isinstance(target, int):
        if not 0 <= target < n:
            raise ValueError(f"target={target} is not a column of scores with N={n}")
        return torch.full((batch,), target, dtype=torch.long, device=device)  # (B,)
    if target.dtype == torch.bool:
        if target.shape != (batch, n):
            raise ValueError(f"a bool target must be (B, N)=({batch}, {n}), got {tuple(target.shape)}")
        return target.to(device)  # (B, N)
    if target.shape != (batch,):
        raise ValueError(f"an index target must be (B,)=({batch},), got {tuple(target.shape)}")
    return target.to(device=device, dtype=torch.long)  # (B,)


def info_nce(scores: torch.Tensor, target: torch.Tensor | int | None = None, *,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """InfoNCE (van den Oord et al. 2018): an N-way softmax cross-entropy with the positive as the target.

    Args:
        scores: ``(B, N)`` logits (similarity / temperature, or a CPC density-ratio score), any float dtype.
        target: which columns are positives. ``None``: the diagonal (row i -> column i, in-batch negatives);
            an ``int``: that column for every row (MoCo's positive at 0); ``(B,)`` int64: one column per row;
            ``(B, N)`` bool: several positives per row, loss ``-log(sum_pos exp s / sum_valid exp s)`` (MIL-NCE).
        valid: ``(B, N)`` bool, ``False`` removes a candidate from the row (self-similarity, known false negatives).
            Every positive must be valid.

    Returns:
        ``(loss, num_candidates)``: the float32 mean over rows, and N, the candidates per row (the geometric mean
        over rows when ``valid`` leaves rows with different counts, so ``log N - loss`` is the mean MI bound).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    batch, n = scores.shape
    pos = _positives(target, batch, n, scores.device)  # (B,) or (B, N)
    with _fp32_region(scores):
        logits = scores.float()  # (B, N)
        if valid is not None:
            if valid.shape != (batch, n) or valid.dtype != torch.bool:
                raise ValueError(f"valid must be a (B, N)=({batch}, {n}) bool mask, got {tuple(valid.shape)} "
                                 f"{valid.dtype}")
            excluded = pos & ~valid if pos.dtype == torch.bool else ~valid.gather(1, pos[:, None])  # (B, N | 1)
            if bool(excluded.any()):
                raise ValueError("valid excludes a positive of target")
            logits = logits.masked_fill(~valid, _MASKED)  # (B, N)
        if pos.dtype == torch.bool:
            if not bool(pos.any(dim=1).all()):
                raise ValueError("every row of a bool target needs at least one positive")
            lse_pos = torch.logsumexp(logits.masked_fill(~pos, _MASKED), dim=1)  # (B,)
            loss = (torch.logsumexp(logits, dim=1) - lse_pos).mean()
        else:
            loss = F.cross_entropy(logits, pos)
    if valid is None:
        return loss, float(n)
    counts = valid.sum(dim=1)  # (B,)
    if bool((counts == counts[0]).all()):
        return loss, float(counts[0])
    return loss, math.exp(float(counts.double().log().mean()))


def contrastive_logs(loss: torch.Tensor, num_candidates: float, scores: torch.Tensor,
                     target: torch.Tensor | int | None = None, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Monitors of an :func:`info_nce` call (same ``scores``, ``target``, ``valid``).

    Returns:
        ``loss``; ``mi_bound_nats = log N - loss``; ``top1``: the fraction of rows whose highest valid score is a
        positive (contrastive accuracy); ``num_candidates`` = N.
    """
    with torch.no_grad():
        logits = scores.detach().float()  # (B, N)
        if valid is not None:
            logits = logits.masked_fill(~valid, _MASKED)
        best = logits.argmax(dim=1)  # (B,)
        pos = _positives(target, *logits.shape, logits.device)  # (B,) or (B, N)
        hit = pos.gather(1, best[:, None])[:, 0] if pos.dtype == torch.bool else best == pos  # (B,) bool
    value = float(loss.detach())
    return {"loss": value, "mi_bound_nats": math.log(num_candidates) - value, "top1": float(hit.float().mean()),
            "num_candidates": float(num_candidates)}


def in_batch_scores(query: torch.Tensor, keys: torch.Tensor, *, temperature: float = 1.0, normalize: bool = False,
                    gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense in-batch scores: row i's positive is key i, every other key (of every rank) a negative.

    Args:
        query: ``(B, D)``.
        keys: ``(B, D)``, ``keys[i]`` the positive of ``query[i]``.
        temperature: divides the dot products.
        normalize: L2-normalise both first (cosine similarity).
        gather: candidates are the keys of all ranks (:func:`gather_with_grad`); identity for one process.

    Returns:
        ``(scores, target)``: ``(B, world * B)`` float32 and ``(B,)`` int64 (the diagonal shifted by ``rank * B``),
        ready for :func:`info_nce`.
    """
    _check_pair(query, keys, ("query", "keys"))
    with _fp32_region(query):
        q, k = query.float(), keys.float()  # (B, D)
        if normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        offset = 0
        if gather:
            k = gather_with_grad(k)  # (world * B, D)
            offset = rank_and_world()[0] * q.shape[0]
        scores = einops.einsum(q, k, "b d, m d -> b m") / temperature
    return scores, torch.arange(q.shape[0], device=q.device) + offset


# ----------------------------------------------------------------------------------------------------------- NCE


def _nce_logits(pos_scores: torch.Tensor, noise_scores: torch.Tensor, pos_log_noise: torch.Tensor | float,
                noise_log_noise: torch.Tensor | float, log_normaliser: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``G(u) = s(u) - log Z - log(k Pn(u))`` of the data ``(B,)`` and the noise ``(B, k)`` samples, float32."""
    if noise_scores.ndim != 2 or pos_scores.shape != noise_scores.shape[:1] or noise_scores.shape[1] < 1:
        raise ValueError(f"pos_scores must be (B,) and noise_scores (B, k) with k >= 1, got "
                         f"{tuple(pos_scores.shape)} and {tuple(noise_scores.shape)}")
    shift = log_normaliser + math.log(noise_scores.shape[1])  # log Z + log k
    g_pos = pos_scores.float() - shift - torch.as_tensor(pos_log_noise, dtype=torch.float32,
                                                         device=pos_scores.device)  # (B,)
    g_noise = noise_scores.float() - shift - torch.as_tensor(noise_log_noise, dtype=torch.float32,
                                                             device=pos_scores.device)  # (B, k)
    return g_pos, g_noise


def nce_loss(pos_scores: torch.Tensor, noise_scores: torch.Tensor, pos_log_noise: torch.Tensor | float,
             noise_log_noise: torch.Tensor | float, *, log_normaliser: float = 0.0) -> torch.Tensor:
    """Noise-contrastive estimation with k noise samples per data sample and a fixed normaliser.

    The model density is ``p_m(u) = exp(s(u)) / Z`` with ``log Z = log_normaliser`` held constant (Mnih & Teh 2012
    fix it; Wu et al. 2018 estimate it once). Data and noise are told apart by logistic regression on
    ``G(u) = s(u) - log Z - log(k Pn(u))``, i.e. ``P(D=1|u) = exp(s) / (exp(s) + k Pn(u) Z) = sigmoid(G(u))``:

    ``loss = mean_b [ -log sigmoid(G(x_b)) - sum_j log sigmoid(-G(y_bj)) ]`` (Gutmann & Hyvarinen's J per data point).

    Args:
        pos_scores: ``(B,)`` unnormalised log-densities ``s(x)`` of the data samples.
        noise_scores: ``(B, k)`` ``s(y)`` of k noise samples per data sample.
        pos_log_noise: ``(B,)`` or a float: ``log Pn(x)`` of the data samples under the noise distribution.
        noise_log_noise: ``(B, k)`` or a float: ``log Pn(y)`` of the noise samples.
        log_normaliser: ``log Z``.

    Returns:
        ``()`` float32 loss. Its gradient is ``-(1 - sigmoid(G(x)))/B`` w.r.t. a data score and
        ``sigmoid(G(y))/B`` w.r.t. a noise score.
    """
    with _fp32_region(pos_scores):
        g_pos, g_noise = _nce_logits(pos_scores, noise_scores, pos_log_noise, noise_log_noise, log_normaliser)
        return -(F.logsigmoid(g_pos) + F.logsigmoid(-g_noise).sum(dim=1)).mean()


# -------------------------------------------------------------------------------------------------------- SimCLR


def nt_xent_scores(z_a: torch.Tensor, z_b: torch.Tensor, *, temperature: float = 0.1,
                   gather: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of SimCLR's NT-Xent: cosine similarity / temperature of each view against all 2B views.

    Args:
        z_a, z_b: ``(B, D)`` the two views' projections; ``z_a[i]`` and ``z_b[i]`` come from the same sample.
        temperature: tau.
        gather: candidates are the views of all ranks.

    Returns:
        ``(scores, target, valid)``: ``(2B, 2 world B)`` float32 with rows ``[z_a; z_b]`` and columns
        ``[z_a of ranks 0..W-1; z_b of ranks 0..W-1]``; ``(2B,)`` the column of the other view; ``(2B, 2 world B)``
        bool, False only at the row's own column.
    """
    _check_pair(z_a, z_b, ("z_a", "z_b"))
    with _fp32_region(z_a):
        a, b = F.normalize(z_a.float(), dim=-1), F.normalize(z_b.float(), dim=-1)  # (B, D)
        queries = einops.rearrange([a, b], "v b d -> (v b) d")  # (2B, D)
        rank, world = rank_and_world() if gather else (0, 1)
        if gather:
            a, b = gather_with_grad(a), gather_with_grad(b)  # (W B, D)
        cands = einops.rearrange([a, b], "v m d -> (v m) d")  # (2 W B, D)
        scores = einops.einsum(queries, cands, "q d, c d -> q c") / temperature  # (2B, 2 W B)
    local = torch.arange(z_a.shape[0], device=z_a.device) + rank * z_a.shape[0]  # (B,) this rank's rows in a view
    half = world * z_a.shape[0]
    own = torch.cat([local, local + half])  # (2B,)
    target = torch.cat([local + half, local])  # (2B,)
    valid = torch.ones_like(scores, dtype=torch.bool).scatter_(1, own[:, None], False)  # (2B, 2 W B)
    return scores, target, valid


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, *, temperature: float = 0.1,
            gather: bool = False) -> tuple[torch.Tensor, float]:
    """NT-Xent (Chen et al. 2020): ``l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)``, mean over the 2B views.

    Args:
        z_a, z_b: ``(B, D)`` projections of two views of the same B samples.
        temperature: tau (0.1 for ImageNet, 0.5 for CIFAR-10 in SimCLR).
        gather: negatives from every rank.

    Returns:
        ``(loss, num_candidates = 2 world B - 1)``.
    """
    scores, target, valid = nt_xent_scores(z_a, z_b, temperature=temperature, gather=gather)
    return info_nce(scores, target, valid=valid)


# ---------------------------------------------------------------------------------------------------------- MoCo


def moco_scores(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, *,
                temperature: float = 0.07) -> tuple[torch.Tensor, int]:
    """MoCo logits ``[l_pos, l_neg] / T``: positive first, then the K queued keys.

    Args:
        q: ``(B, D)`` queries (L2-normalised here).
        k: ``(B, D)`` keys of the momentum encoder (L2-normalised and detached here: no gradient to the key side).
        queue: ``(K, D)`` L2-normalised negatives (:attr:`MoCoQueue.queue`), detached.
        temperature: T (0.07 in v1, 0.2 in v2).

    Returns:
        ``(scores, target)``: ``(B, 1 + K)`` float32 and ``0``, the positive's column.
    """
    _check_pair(q, k, ("q", "k"))
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K, D={q.shape[1]}), got {tuple(queue.shape)}")
    with _fp32_region(q):
        q = F.normalize(q.float(), dim=-1)  # (B, D)
        k = F.normalize(k.detach().float(), dim=-1)  # (B, D)
        l_pos = einops.einsum(q, k, "b d, b d -> b")  # (B,)
        l_neg = einops.einsum(q, queue.detach().float(), "b d, k d -> b k")  # (B, K)
        scores = torch.cat([l_pos[:, None], l_neg], dim=1) / temperature  # (B, 1 + K)
    return scores, 0


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, *,
              temperature: float = 0.07) -> tuple[torch.Tensor, float]:
    """MoCo's contrastive loss ``-log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.Q_i/T))`` (He et al. 2020).

    Args: as :func:`moco_scores`. Returns ``(loss, num_candidates = K + 1)``.
    """
    return info_nce(*moco_scores(q, k, queue, temperature=temperature))


class MoCoQueue(nn.Module):
    """FIFO queue of K keys with MoCo's pointer: a batch overwrites rows ``[ptr, ptr + B)``, then
    ``ptr <- (ptr + B) mod K``; ``K`` must be a multiple of the global batch so a batch never wraps.

    Args:
        dim: key dimension D.
        queue_size: K (65536 in MoCo).
        generator: random source of the initial keys (random normal, L2-normalised, as MoCo).

    Buffers: ``queue`` ``(K, D)`` (MoCo stores the transpose), ``queue_ptr`` ``()`` int64.
    """

    def __init__(self, dim: int, queue_size: int = 65536, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ValueError(f"queue_size and dim must be >= 1, got queue_size={queue_size}, dim={dim}")
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=generator), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``world * B`` keys by ``keys`` of all ranks (gathered; rank order).

        Args:
            keys: ``(B, D)`` this rank's keys (store them L2-normalised).
        """
        size, dim = self.queue.shape
        if keys.ndim != 2 or keys.shape[1] != dim:
            raise ValueError(f"keys must be (B, D={dim}), got {tuple(keys.shape)}")
        keys = gather_no_grad(keys)  # (world * B, D)
        batch = keys.shape[0]
        if size % batch:
            raise ValueError(f"queue_size={size} must be a multiple of the global batch size {batch} (MoCo's FIFO "
                             f"pointer never wraps inside a batch): choose queue_size accordingly and drop the last "
                             f"incomplete batch (DataLoader(drop_last=True))")
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + batch] = keys.to(self.queue.dtype)  # (B_global, D) into the oldest rows
        self.queue_ptr.fill_((ptr + batch) % size)


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float, *, copy_buffers: bool = True) -> None:
    """Momentum (EMA) update of the key encoder: ``theta_k <- m theta_k + (1 - m) theta_q``.

    Args:
        key_encoder, query_encoder: modules with the same parameter names and shapes.
        m: momentum in ``[0, 1]`` (0.999 in MoCo).
        copy_buffers: copy the query encoder's buffers (BatchNorm running statistics) into the key encoder.
            MoCo's code leaves the key encoder's buffers to its own forward passes: ``copy_buffers=False``.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"m must lie in [0, 1], got {m}")
    params = _matching(key_encoder.named_parameters(), query_encoder.named_parameters(), "parameters")
    buffers = _matching(key_encoder.named_buffers(), query_encoder.named_buffers(), "buffers")
    for k, q in params:
        k.mul_(m).add_(q.detach(), alpha=1.0 - m)
    if copy_buffers:
        for k, q in buffers:
            k.copy_(q)


def _matching(key_named, query_named, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs ``(key tensor, query tensor)``; the two encoders must agree in names and shapes."""
    ks, qs = list(key_named), list(query_named)
    if [(n, t.shape) for n, t in ks] != [(n, t.shape) for n, t in qs]:
        raise ValueError(f"key_encoder and query_encoder differ in the names or shapes of their {what}")
    return [(k, q) for (_, k), (_, q) in zip(ks, qs)]


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch across ranks before the key encoder (MoCo's ``_batch_shuffle_ddp``), so BatchNorm statistics
    of a rank do not come from the same samples as its queries.

    All ranks' inputs are gathered, rank 0 draws one permutation of the global batch and broadcasts it, and each rank
    keeps its share. With one process this is a random permutation of the batch -- which leaves whole-batch BatchNorm
    statistics unchanged: there use GroupNorm, BN over sub-batches, or ``nn.SyncBatchNorm`` under DDP instead.

    Args:
        x: ``(B, ...)`` this rank's key-encoder inputs (no gradient).
        generator: source of the permutation (any device; only rank 0's is used).

    Returns:
        ``(x_shuffled, idx_unshuffle)``: ``(B, ...)`` and ``(world * B,)`` for :func:`batch_unshuffle`.
    """
    rank, world = rank_and_world()
    x_all = gather_no_grad(x)  # (W B, ...)
    idx_shuffle = torch.randperm(x_all.shape[0], generator=generator,
                                 device=generator.device if generator is not None else x.device).to(x.device)  # (W B,)
    broadcast_(idx_shuffle, src=0)
    idx_this = einops.rearrange(idx_shuffle, "(w b) -> w b", w=world)[rank]  # (B,)
    return x_all[idx_this], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the key encoder's outputs (MoCo's ``_batch_unshuffle_ddp``).

    Args:
        x: ``(B, ...)`` outputs for this rank's shuffled inputs.
        idx_unshuffle: ``(world * B,)`` from :func:`batch_shuffle`.

    Returns:
        ``(B, ...)`` outputs in the order of this rank's original inputs (detached).
    """
    rank, world = rank_and_world()
    x_all = gather_no_grad(x)  # (W B, ...)
    return x_all[einops.rearrange(idx_unshuffle.to(x.device), "(w b) -> w b", w=world)[rank]]


class MoCoLoss(nn.Module):
    """MoCo's loss with its queue: ``forward(q, k)`` scores against the queue, then (in training) enqueues ``k``.

    Args:
        dim: embedding dimension. queue_size: K. temperature: T. generator: initial queue.

    Example:
        >>> loss_fn = MoCoLoss(dim=128, queue_size=4096, temperature=0.2)
        >>> momentum_update(encoder_k, encoder_q, 0.999)  # before the key forward
        >>> with torch.no_grad():
        ...     x, idx_unshuffle = batch_shuffle(im_k)
        ...     k = batch_unshuffle(encoder_k(x), idx_unshuffle)
        >>> loss, logs = loss_fn(encoder_q(im_q), k)
    """

    def __init__(self, dim: int = 128, queue_size: int = 65536, temperature: float = 0.07, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.queue = MoCoQueue(dim, queue_size, generator=generator)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``q, k: (B, D)`` -> ``(loss, logs)``."""
        # a copy: the enqueue below writes the buffer that the logits' backward still needs
        scores, target = moco_scores(q, k, self.queue.queue.clone(), temperature=self.temperature)
        loss, n = info_nce(scores, target)
        if self.training:
            self.queue.dequeue_and_enqueue(F.normalize(k.detach().float(), dim=-1))
        return loss, contrastive_logs(loss, n, scores, target)


# -------------------------------------------------------------------------------------------------- memory bank


class MemoryBank(nn.Module):
    """N x D bank of L2-normalised entries with Wu et al.'s proximal update
    ``v_i <- normalise(m v_i + (1 - m) f_i)``.

    Args:
        size: N (one entry per training instance). dim: D (128 in Wu et al.).
        momentum: m (0.5 in Wu et al.). generator: random source of the initial entries (random normal, normalised).

    Buffer: ``bank`` ``(N, D)``.
    """

    def __init__(self, size: int, dim: int, *, momentum: float = 0.5, generator: torch.Generator | None = None
                 ) -> None:
        super().__init__()
        if size < 2 or dim < 1:
            raise ValueError(f"need size >= 2 and dim >= 1, got size={size}, dim={dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("bank", F.normalize(torch.randn(size, dim, generator=generator), dim=1))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Proximal update of the entries of all ranks' instances (gathered; only the indexed rows change).

        Args:
            indices: ``(B,)`` int64 instance ids (unique within the global batch).
            features: ``(B, D)`` their current embeddings (L2-normalised).
        """
        if indices.ndim != 1 or features.shape != (indices.shape[0], self.bank.shape[1]):
            raise ValueError(f"indices must be (B,) and features (B, D={self.bank.shape[1]}), got "
                             f"{tuple(indices.shape)} and {tuple(features.shape)}")
        indices, features = gather_no_grad(indices), gather_no_grad(features)  # (W B,), (W B, D)
        mixed = self.momentum * self.bank[indices] + (1.0 - self.momentum) * features.to(self.bank.dtype)  # (W B, D)
        self.bank.index_copy_(0, indices, F.normalize(mixed, dim=1))


def memory_bank_scores(features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, *,
                       temperature: float = 0.07, num_negatives: int | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Non-parametric softmax scores ``v_j . f / tau`` of instances against a memory bank (Wu et al. 2018).

    Args:
        features: ``(B, D)`` embeddings (L2-normalised here).
        bank: ``(N, D)`` L2-normalised entries (:attr:`MemoryBank.bank`), read without gradient.
        indices: ``(B,)`` int64: each feature's own entry, its positive.
        temperature: tau (0.07).
        num_negatives: ``None``: score the whole bank; m: the positive, then m negatives drawn uniformly with
            replacement from the other N - 1 entries (m <= N - 1).
        generator: source of the negatives (any device).

    Returns:
        ``(scores, target)``: ``(B, N)`` and ``indices``, or ``(B, 1 + m)`` and ``0``; float32.
    """
    size = bank.shape[0]
    if features.ndim != 2 or bank.ndim != 2 or features.shape[1] != bank.shape[1] or \
            indices.shape != features.shape[:1]:
        raise ValueError(f"features must be (B, D), bank (N, D), indices (B,); got {tuple(features.shape)}, "
                         f"{tuple(bank.shape)}, {tuple(indices.shape)}")
    with _fp32_region(features):
        f = F.normalize(features.float(), dim=-1)  # (B, D)
        if num_negatives is None:
            return einops.einsum(f, bank.detach().float(), "b d, n d -> b n") / temperature, indices
        if not 1 <= num_negatives <= size - 1:
            raise ValueError(f"num_negatives={num_negatives} but a bank of {size} entries holds only {size - 1} "
                             f"negatives per instance")
        noise = torch.randint(0, size - 1, (f.shape[0], num_negatives), generator=generator,
                              device=generator.device if generator is not None else bank.device
                              ).to(bank.device)  # (B, m) in [0, N - 1)
        noise = noise + (noise >= indices[:, None]).long()  # (B, m): skips the positive
        idx = torch.cat([indices[:, None], noise], dim=1)  # (B, 1 + m)
        cands = bank.detach()[idx].float()  # (B, 1 + m, D)
        return einops.einsum(f, cands, "b d, b m d -> b m") / temperature, 0


def estimate_log_normaliser(scores: torch.Tensor, bank_size: int) -> float:
    """Wu et al.'s one-off estimate ``Z = N mean_j exp(s_j)`` over the scores of a batch, as ``log Z``.

    Args:
        scores: ``(B, 1 + m)`` (or any shape) bank scores ``v_j . f / tau``.
        bank_size: N.
    """
    s = scores.detach().double().flatten()  # (B (1 + m),)
    return math.log(bank_size) + float(torch.logsumexp(s, dim=0)) - math.log(s.numel())


def memory_bank_nce(features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, *, log_normaliser: float,
                    num_negatives: int = 4096, temperature: float = 0.07,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Wu et al.'s NCE over a memory bank: uniform noise ``Pn = 1/N``, m noise entries, a fixed ``log Z``.

    Args: as :func:`memory_bank_scores`, plus ``log_normaliser`` (:func:`estimate_log_normaliser` of a first batch).

    Returns:
        ``()`` float32 :func:`nce_loss`.
    """
    scores, _ = memory_bank_scores(features, bank, indices, temperature=temperature, num_negatives=num_negatives,
                                   generator=generator)  # (B, 1 + m), positive first
    log_pn = -math.log(bank.shape[0])
    return nce_loss(scores[:, 0], scores[:, 1:], log_pn, log_pn, log_normaliser=log_normaliser)


def _bank_for_scores(memory: MemoryBank, num_negatives: int | None) -> torch.Tensor:
    """The bank to score against before an update: scoring the whole bank keeps it for backward, so copy it."""
    return memory.bank.clone() if num_negatives is None else memory.bank


class MemoryBankLoss(nn.Module):
    """Instance discrimination with a memory bank (Wu et al. 2018): ``forward(features, indices)`` computes the loss
    against the bank, then (in training) applies the proximal update to the batch's entries.

    Args:
        size, dim, momentum: of the :class:`MemoryBank`.
        temperature: tau (0.07).
        objective: ``"softmax"`` (non-parametric softmax cross-entropy) or ``"nce"`` (``log Z`` estimated from the
            first training batch, then frozen; buffer ``log_normaliser``).
        num_negatives: ``None`` scores the whole bank (softmax only); m samples m negatives (4096 in Wu et al.).
        generator: initial bank and negative sampling.
    """

    def __init__(self, size: int, dim: int = 128, *, temperature: float = 0.07, momentum: float = 0.5,
                 objective: str = "softmax", num_negatives: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if objective not in ("softmax", "nce"):
            raise ValueError(f"objective must be 'softmax' or 'nce', got {objective!r}")
        if objective == "nce" and num_negatives is None:
            raise ValueError("objective='nce' needs num_negatives (Wu et al. use 4096)")
        self.temperature, self.objective, self.num_negatives, self.generator = (temperature, objective,
                                                                                 num_negatives, generator)
        self.memory = MemoryBank(size, dim, momentum=momentum, generator=generator)
        self.register_buffer("log_normaliser", torch.tensor(float("nan"), dtype=torch.float64))

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``features: (B, D)``, ``indices: (B,)`` -> ``(loss, logs)``."""
        scores, target = memory_bank_scores(features, _bank_for_scores(self.memory, self.num_negatives), indices,
                                            temperature=self.temperature, num_negatives=self.num_negatives,
                                            generator=self.generator)
        if self.objective == "softmax":
            loss, n = info_nce(scores, target)
            logs = contrastive_logs(loss, n, scores, target)
        else:
            if torch.isnan(self.log_normaliser):
                self.log_normaliser.fill_(estimate_log_normaliser(gather_no_grad(scores), self.memory.bank.shape[0]))
            log_pn = -math.log(self.memory.bank.shape[0])
            loss = nce_loss(scores[:, 0], scores[:, 1:], log_pn, log_pn, log_normaliser=float(self.log_normaliser))
            logs = {"loss": float(loss.detach()), "log_normaliser": float(self.log_normaliser),
                    "top1": float((scores.detach().argmax(dim=1) == 0).float().mean())}
        if self.training:
            self.memory.update(indices, F.normalize(features.detach().float(), dim=-1))
        return loss, logs


# --------------------------------------------------------------------------------------------------- N-pair, CMC


def npair_loss(anchors: torch.Tensor, positives: torch.Tensor, *, l2_reg: float = 0.002,
               gather: bool = False) -> tuple[torch.Tensor, float]:
    """Multi-class N-pair loss (Sohn 2016): ``mean_i log(1 + sum_{j != i} exp(f_i.f+_j - f_i.f+_i))``, raw dot
    products, plus ``l2_reg / 4 * (mean_i |f_i|^2 + mean_i |f+_i|^2)`` (the form and default of TensorFlow's
    ``npairs_loss``; ``l2_reg=0`` switches it off).

    Args:
        anchors: ``(B, D)`` one anchor per class. positives: ``(B, D)`` ``positives[i]`` of the class of ``anchors[i]``.
        gather: the positives of all ranks are candidates.

    Returns:
        ``(loss, num_candidates = world B)``; the loss includes the regulariser.
    """
    loss, n = info_nce(*in_batch_scores(anchors, positives, gather=gather))
    return loss + _npair_l2(anchors, positives, l2_reg), n


def _npair_l2(anchors: torch.Tensor, positives: torch.Tensor, l2_reg: float) -> torch.Tensor:
    """``l2_reg / 4 * (mean_i |f_i|^2 + mean_i |f+_i|^2)`` in float32, ``()``."""
    with _fp32_region(anchors):
        return 0.25 * l2_reg * (anchors.float().pow(2).sum(-1).mean() + positives.float().pow(2).sum(-1).mean())


def cmc_scores(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.07, gather: bool = False,
               banks: tuple[torch.Tensor, torch.Tensor] | None = None, indices: torch.Tensor | None = None,
               num_negatives: int | None = None, generator: torch.Generator | None = None
               ) -> tuple[tuple[torch.Tensor, torch.Tensor | int], tuple[torch.Tensor, torch.Tensor | int]]:
    """Scores of the two directions of CMC's two-view loss, cosine similarity / tau.

    Args:
        z1, z2: ``(B, D)`` embeddings of views 1 and 2 of the same B samples.
        gather: in-batch negatives from every rank.
        banks: ``(bank1, bank2)``, each ``(N, D)``: view-1 anchors score against view 2's memory and vice versa
            (CMC's memory-bank form; the positive is the bank entry ``indices[i]``); ``None``: in-batch negatives.
        indices, num_negatives, generator: as :func:`memory_bank_scores` (with ``banks`` only).

    Returns:
        ``((scores_12, target_12), (scores_21, target_21))`` for :func:`info_nce`.
    """
    _check_pair(z1, z2, ("z1", "z2"))
    if banks is None:
        return (in_batch_scores(z1, z2, temperature=temperature, normalize=True, gather=gather),
                in_batch_scores(z2, z1, temperature=temperature, normalize=True, gather=gather))
    if gather:
        raise ValueError("gather applies to in-batch negatives; with banks the negatives come from the banks")
    if indices is None:
        raise ValueError("banks need the instance indices of the batch")
    kw = dict(temperature=temperature, num_negatives=num_negatives, generator=generator)
    return (memory_bank_scores(z1, banks[1], indices, **kw), memory_bank_scores(z2, banks[0], indices, **kw))


def cmc_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.07, gather: bool = False,
             banks: tuple[torch.Tensor, torch.Tensor] | None = None, indices: torch.Tensor | None = None,
             num_negatives: int | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """CMC's symmetric two-view loss ``L(v1 -> v2) + L(v2 -> v1)`` (Tian et al. 2019), each an InfoNCE.

    Args:
        z1, z2: ``(B, D)``; the other arguments as :func:`cmc_scores`.

    Returns:
        ``(loss, num_candidates)`` per direction (``log N - loss / 2`` is the mean bound of the two directions).
    """
    (s12, t12), (s21, t21) = cmc_scores(z1, z2, temperature=temperature, gather=gather, banks=banks, indices=indices,
                                        num_negatives=num_negatives, generator=generator)
    l12, n = info_nce(s12, t12)
    l21, _ = info_nce(s21, t21)
    return l12 + l21, n


# ----------------------------------------------------------------------------------------------- thin wrappers


class NCELoss(nn.Module):
    """Module form of :func:`nce_loss` with a fixed ``log_normaliser``; logs the mean ``P(D=1|u)`` of data and noise."""

    def __init__(self, log_normaliser: float = 0.0) -> None:
        super().__init__()
        self.log_normaliser = log_normaliser

    def forward(self, pos_scores: torch.Tensor, noise_scores: torch.Tensor, pos_log_noise: torch.Tensor | float,
                noise_log_noise: torch.Tensor | float) -> tuple[torch.Tensor, dict[str, float]]:
        """``pos_scores: (B,)``, ``noise_scores: (B, k)`` -> ``(loss, logs)``."""
        loss = nce_loss(pos_scores, noise_scores, pos_log_noise, noise_log_noise, log_normaliser=self.log_normaliser)
        with torch.no_grad():
            g_pos, g_noise = _nce_logits(pos_scores.detach(), noise_scores.detach(), pos_log_noise, noise_log_noise,
                                         self.log_normaliser)
        return loss, {"loss": float(loss.detach()), "p_data_pos": float(torch.sigmoid(g_pos).mean()),
                      "p_data_noise": float(torch.sigmoid(g_noise).mean())}


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`; logs ``loss``, ``mi_bound_nats``, ``top1``, ``num_candidates``.

    Example (in-batch negatives from every rank):
        >>> loss_fn = InfoNCELoss()
        >>> loss, logs = loss_fn(*in_batch_scores(pred, target_feats, temperature=0.1, normalize=True, gather=True))
    """

    def forward(self, scores: torch.Tensor, target: torch.Tensor | int | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``scores: (B, N)`` -> ``(loss, logs)``."""
        loss, n = info_nce(scores, target, valid=valid)
        return loss, contrastive_logs(loss, n, scores, target, valid)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss, logs = loss_fn(projector(encoder(x1)), projector(encoder(x2)))
    """

    def __init__(self, temperature: float = 0.1, *, gather: bool = False) -> None:
        super().__init__()
        self.temperature, self.gather = temperature, gather

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``z_a, z_b: (B, D)`` -> ``(loss, logs)``."""
        scores, target, valid = nt_xent_scores(z_a, z_b, temperature=self.temperature, gather=self.gather)
        loss, n = info_nce(scores, target, valid=valid)
        return loss, contrastive_logs(loss, n, scores, target, valid)


class NPairLoss(nn.Module):
    """Module form of :func:`npair_loss`; logs ``loss``, the cross-entropy part's monitors and ``l2``."""

    def __init__(self, l2_reg: float = 0.002, *, gather: bool = False) -> None:
        super().__init__()
        self.l2_reg, self.gather = l2_reg, gather

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``anchors, positives: (B, D)`` -> ``(loss, logs)``."""
        scores, target = in_batch_scores(anchors, positives, gather=self.gather)
        ce, n = info_nce(scores, target)
        l2 = _npair_l2(anchors, positives, self.l2_reg)
        logs = contrastive_logs(ce, n, scores, target)
        logs.update(ce=logs["loss"], l2=float(l2.detach()), loss=float((ce + l2).detach()))
        return ce + l2, logs


class CMCLoss(nn.Module):
    """Module form of :func:`cmc_loss`, optionally with one :class:`MemoryBank` per view (updated in training).

    Args:
        temperature: tau (0.07). gather: in-batch negatives from every rank (without banks).
        bank_size: N entries per bank (``None``: in-batch negatives); dim, momentum: of the banks.
        num_negatives: sampled bank negatives (``None``: the whole bank). generator: banks and sampling.
    """

    def __init__(self, temperature: float = 0.07, *, gather: bool = False, bank_size: int | None = None,
                 dim: int = 128, momentum: float = 0.5, num_negatives: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.temperature, self.gather, self.num_negatives, self.generator = (temperature, gather, num_negatives,
                                                                             generator)
        self.banks = None if bank_size is None else nn.ModuleList(
            [MemoryBank(bank_size, dim, momentum=momentum, generator=generator) for _ in range(2)])

    def forward(self, z1: torch.Tensor, z2: torch.Tensor,
                indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``z1, z2: (B, D)``, ``indices: (B,)`` with banks -> ``(loss, logs)``."""
        banks = None if self.banks is None else tuple(_bank_for_scores(b, self.num_negatives) for b in self.banks)
        directions = cmc_scores(z1, z2, temperature=self.temperature, gather=self.gather, banks=banks,
                                indices=indices, num_negatives=self.num_negatives, generator=self.generator)
        parts, logs = [], {}
        for name, (scores, target) in zip(("12", "21"), directions):
            part, n = info_nce(scores, target)
            parts.append(part)
            one = contrastive_logs(part, n, scores, target)
            logs.update({f"loss_{name}": one["loss"], f"top1_{name}": one["top1"],
                         f"mi_bound_nats_{name}": one["mi_bound_nats"]}, num_candidates=n)
        loss = parts[0] + parts[1]
        logs.update(loss=float(loss.detach()), mi_bound_nats=(logs["mi_bound_nats_12"] + logs["mi_bound_nats_21"]) / 2)
        if self.training and self.banks is not None:
            for bank, z in zip(self.banks, (z1, z2)):
                bank.update(indices, F.normalize(z.detach().float(), dim=-1))
        return loss, logs
