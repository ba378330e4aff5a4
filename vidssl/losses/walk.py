"""Contrastive random walk loss (Jabri, Owens, Efros, NeurIPS 2020), following the official code.

A clip of T frames with N nodes per frame defines transition matrices between neighbouring frames. A walker that
goes forward k steps and back again along the palindrome must return to its start node; the loss is the
cross-entropy of the return probability against the identity, averaged over palindromes of every length
``k = min_length .. T-1`` (the official code uses all sub-palindromes with k >= 2).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

_EPS = 1e-20


def transition_matrices(q: torch.Tensor, *, temperature: float, edge_dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward transition matrices of a space-time graph.

    Args:
        q: ``(B, T, N, D)`` node embeddings (L2-normalised for cosine affinities).
        temperature: softmax temperature tau.
        edge_dropout: probability of removing an edge (its logit set to -1e20) before the softmax, drawn
            independently for the forward and the backward matrix.
        generator: random source for the dropout mask.

    Returns:
        ``(P_fwd, P_bwd)``, each ``(B, T-1, N, N)`` and row-stochastic; ``P_fwd[:, t]`` maps frame t to t+1 and
        ``P_bwd[:, t]`` maps frame t+1 back to t.
    """
    A = einops.einsum(q[:, :-1], q[:, 1:], "b t n d, b t m d -> b t n m")  # affinities frame t -> t+1
    A_back = einops.rearrange(A, "b t n m -> b t m n")  # frame t+1 -> t
    out = []
    for logits in (A, A_back):
        if edge_dropout > 0:
            drop = torch.rand(logits.shape, generator=generator, device=logits.device) < edge_dropout
            logits = logits.masked_fill(drop, -1e20)
        out.append(F.softmax(logits / temperature, dim=-1))  # b t n m, rows sum to 1
    return out[0], out[1]


def palindrome_returns(P_fwd: torch.Tensor, P_bwd: torch.Tensor, *, min_length: int = 2) -> list[torch.Tensor]:
    """Return-probability matrices ``Q_k = P_1 ... P_k  Pbar_k ... Pbar_1`` for ``k = min_length .. T-1``.

    Args:
        P_fwd, P_bwd: ``(B, T-1, N, N)`` from :func:`transition_matrices`.

    Returns:
        list of ``(B, N, N)`` row-stochastic matrices, shortest walk first.
    """
    steps = P_fwd.shape[1]
    if not 1 <= min_length <= steps:
        raise ValueError(f"min_length must lie in 1..T-1={steps}, got {min_length}")
    out = []
    fwd = None
    for k in range(1, steps + 1):
        fwd = P_fwd[:, 0] if fwd is None else fwd @ P_fwd[:, k - 1]  # b n n: start -> frame k
        if k < min_length:
            continue
        walk = fwd
        for t in range(k - 1, -1, -1):
            walk = walk @ P_bwd[:, t]  # back to frame t
        out.append(walk)
    return out


def walk_loss(q: torch.Tensor, *, temperature: float = 0.05, edge_dropout: float = 0.1, min_length: int = 2,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive random-walk loss.

    Args:
        q: ``(B, T, N, D)`` node embeddings (T >= 2; T >= min_length + 1).
        temperature: tau of the transition softmax (0.05 in the official recipe).
        edge_dropout: edge dropout rate (0.1 in the official recipe).
        min_length: shortest palindrome half-length k (2 in the official code, which skips k = 1).
        generator: random source for edge dropout.

    Returns:
        ``(loss, logs)``: the mean over palindrome lengths of the mean over batch and start nodes of
        ``-log Q_k[i, i]``; logs hold the loss and return accuracy of each length (``xent_k``, ``acc_k``).
        With uniform affinities the loss is ``log N``. The walk is computed with autocast off, in float32 for a
        float16 / bfloat16 ``q``.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be (B, T, N, D), got shape {tuple(q.shape)}")
    B, T, N, _ = q.shape
    if T < min_length + 1:
        raise ValueError(f"a clip of T={T} frames has no palindrome of length >= {min_length}; "
                         f"need T >= {min_length + 1}")
    target = torch.arange(N, device=q.device).repeat(B)  # (B*N,)
    losses, logs = [], {}
    # float32 with autocast off: under bf16 the products of T-1 stochastic matrices and their logs lose precision
    with torch.autocast(q.device.type, enabled=False):
        q = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q  # float64 stays float64
        P_fwd, P_bwd = transition_matrices(q, temperature=temperature, edge_dropout=edge_dropout,
                                           generator=generator)
        returns = palindrome_returns(P_fwd, P_bwd, min_length=min_length)
        for k, Q in zip(range(min_length, T), returns):
            logp = einops.rearrange(torch.log(Q + _EPS), "b n m -> (b n) m")
            xent = F.nll_loss(logp, target)
            losses.append(xent)
            logs[f"xent_{k}"] = float(xent.detach())
            logs[f"acc_{k}"] = float((logp.argmax(-1) == target).float().mean())
        loss = torch.stack(losses).mean()
    logs["loss"] = float(loss.detach())
    logs["log_n"] = math.log(N)
    return loss, logs


class WalkLoss(nn.Module):
    """Module form of :func:`walk_loss`.

    Example:
        >>> loss_fn = WalkLoss(temperature=0.05, edge_dropout=0.1)
        >>> q = torch.nn.functional.normalize(torch.randn(2, 4, 49, 128), dim=-1)
        >>> loss, logs = loss_fn(q)
    """

    def __init__(self, *, temperature: float = 0.05, edge_dropout: float = 0.1, min_length: int = 2) -> None:
        super().__init__()
        self.temperature, self.edge_dropout, self.min_length = temperature, edge_dropout, min_length

    def forward(self, q: torch.Tensor, generator: torch.Generator | None = None):
        """``q: (B, T, N, D)`` -> ``(loss, logs)``."""
        return walk_loss(q, temperature=self.temperature, edge_dropout=self.edge_dropout if self.training else 0.0,
                         min_length=self.min_length, generator=generator)
