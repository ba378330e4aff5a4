"""DPC -- Dense Predictive Coding (Han, Xie, Zisserman, ICCVW 2019): CPC for video (spec section 3).

A clip of ``num_blocks`` non-overlapping blocks of ``block_len`` frames (``data.clip_len = num_blocks * block_len``,
frame step ``data.stride`` = DPC's ``ds``) is encoded block by block into pre-ReLU feature maps ``z`` ``(C, h, w)``:

* a block-aware encoder (``takes_blocks``, the 2d3d ResNet ``r2d3d18``/``r2d3d34``) reads ``(3, T, H, W)`` and its
  ``T'`` output steps are averaged (DPC);
* any 2-D frame encoder (``resnet18`` ...) reads each frame and the block's frames are averaged (temporal pooling).

A ConvGRU ``g`` (1x1 kernels, orthogonal init, dropout on the hidden state) reads ``ReLU(z)`` of the first
``context`` blocks; the predictor ``phi`` (1x1 conv, ReLU, 1x1 conv) then predicts the next ``pred_steps`` maps
sequentially, feeding each prediction back (``c_{t+1} = g(ReLU(z^_{t+1}), c_t)``). The dense score is the raw dot
product of every predicted position with every target position of the batch,

    S[(b, p, s), (b', p', s')] = z^_{b,p,s} . z_{b',p',s'}        ((B P S^2) x (B P S^2), no temperature)

and the loss is :func:`vidssl.losses.info_nce` with the diagonal as target. DPC's taxonomy (:func:`dpc_taxonomy`)
labels every candidate: positive, temporal (same video and position, other step), spatial (same video, other
position) or easy (other video). ``negatives`` keeps the classes a row competes against: ``"all"`` (DPC), ``"easy"``,
``"spatial"``, ``"temporal"``, ``"hard"`` (spatial + temporal, no other video). Logs carry the mean score of each class
(DPC #7: easy drops first, then spatial, then temporal).

Curriculum (paper table 3, not in the released code): ``stages: [{until_step, context, pred_steps}, ...]``, each
stage running until its ``until_step``; the last one must end at ``train.steps`` and ``context + pred_steps`` must fit
``num_blocks`` (checked when built). Without ``stages`` one stage runs ``num_blocks - pred_steps`` context blocks.

Augmentation: DPC draws colour jitter and "RandomGray" (copy one random channel) independently per frame; the data
layer's jitter is clip-consistent, so ``random_gray`` (per-frame channel copy, p = 0.5 in DPC) runs here; DPC's
per-frame colour jitter is not reproduced (deviation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import torch
import torch.nn as nn

from vidssl.config import ConfigError
from vidssl.losses.contrastive import contrastive_logs, info_nce
from vidssl.models.objective import BuildContext, DataNeeds, Objective

__all__ = ["ConvGRU", "DPC", "Stage", "dpc_negative_mask", "dpc_scores", "dpc_taxonomy", "stage_at"]

#: taxonomy codes (DPC's cached int8 mask)
POSITIVE, EASY, TEMPORAL, SPATIAL = 1, 0, -1, -3
_KEEP = {"all": (EASY, TEMPORAL, SPATIAL), "easy": (EASY,), "spatial": (SPATIAL,), "temporal": (TEMPORAL,),
         "hard": (TEMPORAL, SPATIAL)}


def dpc_taxonomy(batch: int, pred_steps: int, positions: int, device: torch.device | None = None) -> torch.Tensor:
    """DPC's candidate labels for rows and columns ordered ``(b, p, s)``.

    Returns:
        ``(B P S, B P S)`` int8: 1 positive (the diagonal), -1 temporal (same b and s, other p), -3 spatial
        (same b, other s, any p), 0 easy (other b).
    """
    b = torch.arange(batch, device=device).repeat_interleave(pred_steps * positions)  # (B P S)
    p = torch.arange(pred_steps, device=device).repeat_interleave(positions).repeat(batch)  # (B P S)
    s = torch.arange(positions, device=device).repeat(batch * pred_steps)  # (B P S)
    same_b, same_p, same_s = (b[:, None] == b), (p[:, None] == p), (s[:, None] == s)  # (BPS, BPS) each
    out = torch.zeros(same_b.shape, dtype=torch.int8, device=device)  # easy everywhere
    out[same_b & ~same_s] = SPATIAL
    out[same_b & same_s & ~same_p] = TEMPORAL
    out[same_b & same_s & same_p] = POSITIVE
    return out


def dpc_negative_mask(taxonomy: torch.Tensor, negatives: str) -> torch.Tensor:
    """``valid`` mask for :func:`info_nce`: the positive plus the negative classes ``negatives`` keeps."""
    if negatives not in _KEEP:
        raise ValueError(f"negatives: {negatives!r}; expected one of {sorted(_KEEP)}")
    valid = taxonomy == POSITIVE  # (N, N)
    for code in _KEEP[negatives]:
        valid = valid | (taxonomy == code)
    return valid


def dpc_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dense scores of predicted vs true maps: ``(B, P, C, h, w)`` x ``(B, P, C, h, w)`` -> ``(B P h w, B P h w)``."""
    q = einops.rearrange(pred, "b p c h w -> (b p h w) c")  # N c
    k = einops.rearrange(target, "b p c h w -> (b p h w) c")  # N c
    return einops.einsum(q.float(), k.float(), "n c, m c -> n m")  # N N


class ConvGRU(nn.Module):
    """One ConvGRU cell (DPC's aggregator): gates from ``[x, h]`` with ``kernel`` x ``kernel`` convolutions.

    Args:
        channels: input width.
        hidden: hidden-state width.
        kernel: convolution size (DPC: 1, weights shared over positions).
        dropout: dropout on the hidden state after every step (DPC: 0.1).
    """

    def __init__(self, channels: int, hidden: int, *, kernel: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        pad = kernel // 2
        self.hidden = hidden
        self.reset_gate = nn.Conv2d(channels + hidden, hidden, kernel, padding=pad)
        self.update_gate = nn.Conv2d(channels + hidden, hidden, kernel, padding=pad)
        self.out_gate = nn.Conv2d(channels + hidden, hidden, kernel, padding=pad)
        self.dropout = dropout
        for conv in (self.reset_gate, self.update_gate, self.out_gate):
            nn.init.orthogonal_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` ``(B, C, h, w)``, ``h`` ``(B, hidden, h, w)`` or ``None`` (zeros) -> new ``h``; the dropout mask is
        drawn from ``generator`` (the objective's, so a resumed run draws the same masks)."""
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden, *x.shape[-2:])  # b H h w
        xh = torch.cat([x, h], dim=1)  # b (C+H) h w
        r = torch.sigmoid(self.reset_gate(xh))  # b H h w
        u = torch.sigmoid(self.update_gate(xh))  # b H h w
        n = torch.tanh(self.out_gate(torch.cat([x, r * h], dim=1)))  # b H h w
        h = (1 - u) * h + u * n  # b H h w
        if self.training and self.dropout > 0:
            dev = generator.device if generator is not None else h.device
            keep = torch.rand(h.shape, generator=generator, device=dev).to(h.device) >= self.dropout  # b H h w
            h = h * keep / (1 - self.dropout)
        return h


@dataclass
class Stage:
    """One curriculum stage: observe ``context`` blocks, predict ``pred_steps``, until step ``until_step``."""

    until_step: int
    context: int
    pred_steps: int


def _stages(raw: list[dict[str, Any]] | None, num_blocks: int, pred_steps: int, total_steps: int | None,
            prefix: str = "stages") -> list[Stage]:
    """Check a curriculum (increasing ``until_step``, blocks fit, the last stage ending at ``total_steps`` unless it
    is ``None``) and build it."""
    if not raw:
        return [Stage(total_steps or 1, num_blocks - pred_steps, pred_steps)]
    stages = []
    for i, st in enumerate(raw):
        if not isinstance(st, dict) or set(st) != {"until_step", "context", "pred_steps"}:
            raise ConfigError(f"{prefix}.{i}: expected {{until_step, context, pred_steps}}, got {st!r}")
        s = Stage(int(st["until_step"]), int(st["context"]), int(st["pred_steps"]))
        if s.context < 1 or s.pred_steps < 1 or s.context + s.pred_steps > num_blocks:
            raise ConfigError(f"{prefix}.{i}: context {s.context} + pred_steps {s.pred_steps} must be >= 1 each and "
                              f"fit num_blocks={num_blocks}")
        if stages and s.until_step <= stages[-1].until_step:
            raise ConfigError(f"{prefix}.{i}.until_step: {s.until_step} does not come after the previous stage's "
                              f"{stages[-1].until_step}")
        if s.until_step < 1:
            raise ConfigError(f"{prefix}.{i}.until_step: must be >= 1, got {s.until_step}")
        stages.append(s)
    if total_steps is not None and stages[-1].until_step != total_steps:
        raise ConfigError(f"{prefix}.{len(stages) - 1}.until_step: the stages end at step {stages[-1].until_step}, "
                          f"the run has train.steps={total_steps}; the curriculum must add up to the run")
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage in force at 0-based ``step`` (the last one after the end)."""
    return next((s for s in stages if step < s.until_step), stages[-1])


@dataclass
class DPCParams:
    """DPC (TengdaHan/DPC defaults; see :mod:`vidssl.models.dpc`)."""

    num_blocks: int = 8  #: blocks per clip (DPC num_seq)
    block_len: int = 5  #: frames per block (DPC seq_len); data.clip_len = num_blocks * block_len
    pred_steps: int = 3  #: predicted blocks without a curriculum (DPC pred_step)
    #: curriculum: [{until_step, context, pred_steps}] (paper: 5pred3 then 4pred4); empty = one stage
    stages: list[dict[str, int]] = field(default_factory=list)
    negatives: Literal["all", "easy", "spatial", "temporal", "hard"] = "all"  #: DPC uses all
    hidden: int = 0  #: ConvGRU width (0: the encoder's channels, DPC 256)
    gru_kernel: int = 1  #: DPC: 1x1
    dropout: float = 0.1  #: on the ConvGRU hidden state
    random_gray: float = 0.5  #: per-frame probability of copying one random channel to all three (DPC)

    def validate(self, prefix: str = "") -> None:
        if self.num_blocks < 2 or self.block_len < 1:
            raise ConfigError(f"{prefix}.num_blocks / block_len: need >= 2 blocks of >= 1 frame")
        if not 1 <= self.pred_steps < self.num_blocks:
            raise ConfigError(f"{prefix}.pred_steps: must lie in [1, num_blocks), got {self.pred_steps}")
        if not 0 <= self.random_gray <= 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.random_gray / dropout: must be probabilities")
        _stages(self.stages, self.num_blocks, self.pred_steps, None, prefix=f"{prefix}.stages")  # the run length
        # is checked when the objective is built (it knows train.steps)


class DPC(Objective):
    """Dense Predictive Coding over the shared encoder.

    Args:
        encoder: a block encoder (``takes_blocks``) or a 2-D frame encoder (frames pooled per block).
        num_blocks: blocks per clip (8).
        block_len: frames per block (5).
        pred_steps: predicted blocks when ``stages`` is empty (3).
        stages: curriculum ``[{until_step, context, pred_steps}]``.
        negatives: negative classes kept (``"all"``, ``"easy"``, ``"spatial"``, ``"temporal"``, ``"hard"``).
        hidden: ConvGRU width (0: encoder channels).
        gru_kernel: ConvGRU kernel (1).
        dropout: ConvGRU hidden dropout (0.1).
        random_gray: per-frame channel-copy probability (0.5).
        total_steps: the run length (the curriculum must end there).
    """

    Params = DPCParams

    @classmethod
    def data_needs(cls, params: DPCParams, data=None) -> DataNeeds:
        """``num_blocks * block_len`` consecutive frames (step ``data.stride``)."""
        return DataNeeds(clip_len=params.num_blocks * params.block_len)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: DPCParams, ctx: BuildContext) -> "DPC":
        return cls(encoder, num_blocks=params.num_blocks, block_len=params.block_len, pred_steps=params.pred_steps,
                   stages=params.stages, negatives=params.negatives, hidden=params.hidden,
                   gru_kernel=params.gru_kernel, dropout=params.dropout, random_gray=params.random_gray,
                   total_steps=ctx.total_steps)

    def __init__(self, encoder: nn.Module, *, num_blocks: int = 8, block_len: int = 5, pred_steps: int = 3,
                 stages: list[dict[str, int]] | None = None, negatives: str = "all", hidden: int = 0,
                 gru_kernel: int = 1, dropout: float = 0.1, random_gray: float = 0.5, total_steps: int = 1) -> None:
        super().__init__()
        if negatives not in _KEEP:
            raise ValueError(f"negatives: {negatives!r}; expected one of {sorted(_KEEP)}")
        self.encoder = encoder
        self.num_blocks, self.block_len = num_blocks, block_len
        self.negatives, self.random_gray = negatives, random_gray
        self.stages = _stages(stages, num_blocks, pred_steps, total_steps)
        channels = encoder.out_channels
        hidden = hidden or channels
        self.agg = ConvGRU(channels, hidden, kernel=gru_kernel, dropout=dropout)
        self.predictor = nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(hidden, channels, 1))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps trained (curriculum, checkpointed)

    def encode_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """``(B, N, T, 3, H, W)`` -> pre-ReLU maps ``(B, N, C, h, w)``."""
        b, n = blocks.shape[:2]
        if getattr(self.encoder, "takes_blocks", False):
            x = einops.rearrange(blocks, "b n t c h w -> (b n) c t h w")
            z = self.encoder(x).mean(dim=2)  # (b n) C h w, DPC averages the T' steps
            return einops.rearrange(z, "(b n) c h w -> b n c h w", b=b)
        x = einops.rearrange(blocks, "b n t c h w -> (b n t) c h w")
        z = self.encoder(x)  # (b n t) C h w
        return einops.reduce(z, "(b n t) c h w -> b n c h w", "mean", b=b, n=n)  # temporal pooling

    def _random_gray(self, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per frame, with probability ``random_gray``, every channel becomes one random channel."""
        b, t = video.shape[:2]
        dev = generator.device if generator is not None else video.device
        hit = (torch.rand(b, t, generator=generator, device=dev) < self.random_gray).to(video.device)  # b t
        src = torch.randint(0, 3, (b, t), generator=generator, device=dev).to(video.device)  # b t
        picked = torch.gather(video, 2, einops.repeat(src, "b t -> b t 3 h w", h=video.shape[-2], w=video.shape[-1]))
        return torch.where(hit[:, :, None, None, None], picked, video)  # b t 3 h w

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        """``batch["video"]`` ``(B, T, 3, H, W)``, ``T >= num_blocks * block_len`` -> ``(loss, logs)``."""
        video = batch["video"]
        need = self.num_blocks * self.block_len
        if video.ndim != 5 or video.shape[1] < need:
            raise ValueError(f"batch['video']: DPC needs (B, T, 3, H, W) with T >= num_blocks * block_len = {need}, "
                             f"got {tuple(video.shape)}; raise data.clip_len")
        stage = stage_at(self.stages, int(self.step))
        video = video[:, :need]  # b T 3 H W
        if self.training and self.random_gray > 0:
            video = self._random_gray(video, generator)
        blocks = einops.rearrange(video, "b (n t) c h w -> b n t c h w", n=self.num_blocks)
        used = stage.context + stage.pred_steps
        z = self.encode_blocks(blocks[:, :used])  # b used C h w, pre-ReLU
        h = None
        for i in range(stage.context):
            h = self.agg(torch.relu(z[:, i]), h, generator)  # b H h w
        preds = []
        for _ in range(stage.pred_steps):
            z_hat = self.predictor(h)  # b C h w
            preds.append(z_hat)
            h = self.agg(torch.relu(z_hat), h, generator)  # b H h w
        pred = torch.stack(preds, dim=1)  # b P C h w
        target = z[:, stage.context:used]  # b P C h w
        scores = dpc_scores(pred, target)  # N N, N = B P h w
        tax = dpc_taxonomy(pred.shape[0], stage.pred_steps, pred.shape[-1] * pred.shape[-2], scores.device)  # N N
        valid = None if self.negatives == "all" else dpc_negative_mask(tax, self.negatives)  # N N
        loss, n = info_nce(scores, None, valid=valid)
        logs = contrastive_logs(loss, n, scores, None, valid)
        with torch.no_grad():
            for name, code in (("easy", EASY), ("spatial", SPATIAL), ("temporal", TEMPORAL), ("positive", POSITIVE)):
                sel = tax == code
                if bool(sel.any()):
                    logs[f"score_{name}"] = float(scores.detach()[sel].mean())
        logs.update(context=float(stage.context), pred_steps=float(stage.pred_steps))
        if self.training:
            self.step += 1
        return loss, logs
