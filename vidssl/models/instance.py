"""Instance discrimination on video: SimCLR, MoCo v2 and Wu et al.'s memory bank as one objective.

The instance is a clip. Its two *views* are two frames of the clip (``frames``, default the first two; the temporal
gap is ``data.stride``), each with its own augmentation: the loader's random resized crop drawn per frame
(``data.per_frame_crop: true``), then, on the batch inside the objective and from the objective's generator, a
per-view horizontal flip, colour jitter (brightness, contrast, saturation, hue), random grayscale and Gaussian blur
(MoCo v2's "aug+" / SimCLR's list). The loader's own colour jitter and flip are clip-shared (the same for both views),
so the recipes switch them off and leave the per-view photometric augmentation to this module.

Each view is encoded by the shared encoder, global-average-pooled and projected by a 2-layer MLP head
(``Linear(C, hidden) -> ReLU -> Linear(hidden, dim)``, MoCo v2; SimCLR's head is the same with a BatchNorm after the
first layer, not used here) and L2-normalised. ``negatives`` picks where the negatives come from:

* ``"batch"`` -- SimCLR (Chen et al. 2020): NT-Xent over the 2B views of the batch, gathered across DDP ranks
  (:func:`vidssl.losses.nt_xent`); ``2 W B - 1`` candidates per view; tau 0.1.
* ``"queue"`` -- MoCo v2 (He et al. 2020; Chen et al. 2020b): the first view is the query, the second the key of a
  momentum encoder (a copy of encoder + head, updated ``theta_k <- m theta_k + (1 - m) theta_q`` with
  :func:`vidssl.losses.momentum_update` at the start of every training forward, i.e. after the previous optimiser
  step and before the key forward, MoCo's order); negatives are the K keys of a :class:`vidssl.losses.MoCoQueue`
  (``K + 1`` candidates); tau 0.2, K 65536, m 0.999. BatchNorm leak: under DDP the key batch is shuffled across
  ranks (:func:`vidssl.losses.batch_shuffle`; with ``model.sync_bn`` on GPU the trainer converts BN to SyncBN
  instead); in one process a shuffle changes nothing, so ``bn_splits > 1`` runs query and key encoders on that many
  sub-batches (keys after a random permutation), emulating MoCo's per-GPU BN; training a BatchNorm encoder in one
  process with ``bn_splits: 1`` is refused (the key batch's statistics would leak the positive).
* ``"memory_bank"`` -- Wu et al. 2018: one L2-normalised 128-d entry per dataset item (the batch's ``"index"``),
  each view scored against the bank (non-parametric softmax over the whole bank, ``bank_size`` candidates, or
  ``num_negatives`` sampled ones; ``bank_loss: nce`` is Wu's NCE with ``log Z`` estimated on the first batch and then
  frozen); after the loss the item's entry moves to ``normalise(0.5 v + 0.5 f)`` with ``f`` the normalised mean of
  the two views' embeddings; tau 0.07.

Queues, banks and the momentum encoder are submodules/buffers: they are in the checkpoint and restored on resume.
The momentum encoder's parameters do not require gradients and are not in any optimiser.

``forward(batch, generator)`` logs ``loss``, ``mi_bound_nats`` (``log N - loss``), ``top1`` (contrastive accuracy)
and ``num_candidates`` (N); in eval mode nothing is updated (no momentum step, no enqueue, no bank update).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.config import ConfigError, to_dict
from vidssl.losses.contrastive import (MemoryBank, MoCoQueue, batch_shuffle, batch_unshuffle, contrastive_logs,
                                       estimate_log_normaliser, info_nce, memory_bank_scores, moco_scores,
                                       momentum_update, nce_loss, nt_xent_scores)
from vidssl.losses.distributed import gather_no_grad, rank_and_world
from vidssl.models.corrflow import _rand, input_rgb
from vidssl.models.objective import BuildContext, DataNeeds, Objective

__all__ = ["InstanceDiscrimination", "InstanceParams", "ProjectionHead", "augment_views"]

_NEGATIVES = ("batch", "queue", "memory_bank")


# --------------------------------------------------------------------------------------------- augmentation


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * a + (1 - factor) * b`` clamped to [0, 1]; ``factor`` ``(B,)`` broadcast over ``(B, 3, H, W)``."""
    f = factor[:, None, None, None]  # b 1 1 1
    return (f * a + (1 - f) * b).clamp(0, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``(B, 3, H, W)``, repeated to 3 channels."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    y = einops.einsum(x, w, "b c h w, c -> b h w")  # b h w
    return einops.repeat(y, "b h w -> b c h w", c=3)


def _hue_rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue shift by ``turns`` (fraction of a full turn, ``(B,)``) as a rotation of the YIQ chroma plane."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=x.dtype, device=x.device)  # 3 3
    yiq = einops.einsum(to_yiq, x, "o c, b c h w -> b o h w")  # b 3 h w
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)  # b
    i, q = yiq[:, 1], yiq[:, 2]  # b h w
    c, s = cos[:, None, None], sin[:, None, None]  # b 1 1
    rotated = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)  # b 3 h w
    return einops.einsum(torch.linalg.inv(to_yiq), rotated, "o c, b c h w -> b o h w").clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 3, H, W)`` with a per-image ``sigma`` ``(B,)`` in pixels (reflect padding)."""
    b, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)  # k
    kern = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp_min(1e-3)) ** 2)  # b k
    kern = einops.repeat(kern / kern.sum(1, keepdim=True), "b k -> (b c) k", c=c)  # (b c) k
    flat = einops.rearrange(x, "b c h w -> 1 (b c) h w")  # 1 (b c) h w
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kern[:, None, :, None], groups=b * c)  # 1 (b c) h w+2r: vertical pass
    flat = F.conv2d(flat, kern[:, None, None, :], groups=b * c)  # 1 (b c) h w: horizontal pass
    return einops.rearrange(flat, "1 (b c) h w -> b c h w", b=b)


def augment_views(x: torch.Tensor, *, generator: torch.Generator | None, flip_prob: float = 0.5,
                  jitter_prob: float = 0.8, jitter: float = 0.4, hue: float = 0.1, grayscale_prob: float = 0.2,
                  blur_prob: float = 0.5, blur_sigma: Sequence[float] = (0.1, 2.0)) -> torch.Tensor:
    """MoCo v2 / SimCLR per-image augmentation of a batch of RGB images in [0, 1], every draw from ``generator``.

    Per image: horizontal flip (``flip_prob``); with ``jitter_prob`` brightness, contrast and saturation factors
    from ``U[1 - jitter, 1 + jitter]`` and a hue shift from ``U[-hue, hue]`` turns, applied in that fixed order
    (torchvision draws a random order; the hue shift is a YIQ chroma rotation, not torchvision's HSV shift); grayscale
    (``grayscale_prob``); Gaussian blur (``blur_prob``) with sigma from ``U[blur_sigma]`` given for 224-pixel images
    and scaled to the actual width (MoCo v2 blurs 224-px crops with sigma 0.1-2.0).

    Args:
        x: ``(B, 3, H, W)`` RGB in [0, 1].

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    b = x.shape[0]
    u = _rand(generator, b, 9).to(device=x.device, dtype=x.dtype)  # b 9 uniform draws per image
    x = torch.where((u[:, 0] < flip_prob)[:, None, None, None], x.flip(-1), x)  # b 3 h w
    lo, hi = 1 - jitter, 1 + jitter
    jittered = (x * (lo + (hi - lo) * u[:, 1])[:, None, None, None]).clamp(0, 1)  # b 3 h w: brightness
    mean_grey = _grey(jittered).mean(dim=(1, 2, 3))  # b
    jittered = _blend(jittered, mean_grey[:, None, None, None].expand_as(jittered),
                      lo + (hi - lo) * u[:, 2])  # b 3 h w: contrast
    jittered = _blend(jittered, _grey(jittered), lo + (hi - lo) * u[:, 3])  # b 3 h w: saturation
    jittered = _hue_rotate(jittered, hue * (2 * u[:, 4] - 1))  # b 3 h w: hue
    x = torch.where((u[:, 5] < jitter_prob)[:, None, None, None], jittered, x)  # b 3 h w
    x = torch.where((u[:, 6] < grayscale_prob)[:, None, None, None], _grey(x), x)  # b 3 h w
    sigma = (blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, 7]) * x.shape[-1] / 224.0  # b pixels
    return torch.where((u[:, 8] < blur_prob)[:, None, None, None], _gaussian_blur(x, sigma), x)  # b 3 h w


# ------------------------------------------------------------------------------------------------- model
def _key(prefix: str, name: str) -> str:
    """``objectives.0.queue_size`` from a run's config, ``queue_size`` in library use."""
    return f"{prefix}.{name}" if prefix else name


class ProjectionHead(nn.Module):
    """MoCo v2's MLP head: global average pool, ``Linear(C, hidden) -> ReLU -> Linear(hidden, dim)``.

    Args:
        in_channels: encoder output channels C.
        hidden: hidden width (MoCo v2 / SimCLR: C).
        dim: output dimension (128).
    """

    def __init__(self, in_channels: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_channels, hidden), nn.Linear(hidden, dim)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(M, C, h, w)`` feature map -> ``(M, dim)`` (not normalised)."""
        pooled = einops.reduce(fmap, "m c h w -> m c", "mean")  # m c
        return self.fc2(F.relu(self.fc1(pooled)))  # m dim


@dataclass
class InstanceParams:
    """Instance discrimination (see :class:`vidssl.models.InstanceDiscrimination`); defaults: MoCo v2."""

    negatives: Literal["batch", "queue", "memory_bank"] = "queue"  #: SimCLR in-batch / MoCo queue / Wu memory bank
    temperature: float = 0.2  #: tau: MoCo v2 0.2, SimCLR 0.1, Wu et al. 0.07 (MoCo v1 0.07)
    dim: int = 128  #: projection output dimension (all three papers: 128)
    hidden: int = 0  #: MLP hidden width; 0 = the encoder's output channels (MoCo v2: 2048 for a ResNet-50)
    frames: tuple[int, int] = (0, 1)  #: clip frames used as the two views (the gap is data.stride)
    queue_size: int = 65536  #: queue: K negatives (a multiple of the global batch)
    momentum: float = 0.999  #: queue: key-encoder EMA m
    shuffle_bn: bool = True  #: queue: shuffle the key batch across DDP ranks before the key encoder
    bn_splits: int = 1  #: queue: BN over this many sub-batches per process (MoCo's per-GPU BN in one process)
    bank_size: int = 0  #: memory_bank: entries (one per dataset item); 0 = the main dataset's item count
    bank_momentum: float = 0.5  #: memory_bank: proximal update lambda of Wu et al.
    bank_loss: Literal["softmax", "nce"] = "softmax"  #: memory_bank: non-parametric softmax or Wu's NCE
    num_negatives: int = 0  #: memory_bank: sampled negatives per view (Wu NCE: 4096); 0 = the whole bank
    view_augment: bool = True  #: per-view flip / colour jitter / grayscale / blur inside the objective
    flip_prob: float = 0.5  #: per-view horizontal flip probability
    jitter_prob: float = 0.8  #: colour jitter probability (MoCo v2 / SimCLR 0.8)
    jitter: float = 0.4  #: brightness / contrast / saturation strength (MoCo v2 0.4)
    hue: float = 0.1  #: hue shift range in turns (MoCo v2 0.1)
    grayscale_prob: float = 0.2  #: random grayscale probability (0.2)
    blur_prob: float = 0.5  #: Gaussian blur probability (MoCo v2 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  #: blur sigma range at 224 px, scaled to the crop width

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.negatives not in _NEGATIVES:
            raise ConfigError(f"{p}negatives: {self.negatives!r}; expected one of {list(_NEGATIVES)}")
        if self.temperature <= 0:
            raise ConfigError(f"{p}temperature: must be > 0, got {self.temperature}")
        if self.dim < 1 or self.hidden < 0:
            raise ConfigError(f"{p}dim / hidden: need dim >= 1 and hidden >= 0, got {self.dim}, {self.hidden}")
        if min(self.frames) < 0 or self.frames[0] == self.frames[1]:
            raise ConfigError(f"{p}frames: two distinct non-negative clip indices, got {list(self.frames)}")
        if self.queue_size < 1:
            raise ConfigError(f"{p}queue_size: must be >= 1, got {self.queue_size}")
        if not 0 <= self.momentum <= 1 or not 0 <= self.bank_momentum <= 1:
            raise ConfigError(f"{p}momentum / bank_momentum: must lie in [0, 1]")
        if self.bn_splits < 1:
            raise ConfigError(f"{p}bn_splits: must be >= 1, got {self.bn_splits}")
        if self.bank_size < 0 or self.num_negatives < 0:
            raise ConfigError(f"{p}bank_size / num_negatives: must be >= 0")
        if self.negatives == "memory_bank" and self.bank_loss == "nce" and self.num_negatives == 0:
            raise ConfigError(f"{p}num_negatives: bank_loss 'nce' samples its noise; set it (Wu et al.: 4096)")
        if self.bank_size and self.num_negatives > self.bank_size - 1:
            raise ConfigError(f"{p}num_negatives: {self.num_negatives} asked, but a bank of bank_size="
                              f"{self.bank_size} holds only {self.bank_size - 1} negatives per item")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{p}{name}: must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.jitter < 1 or not 0 <= self.hue <= 0.5:
            raise ConfigError(f"{p}jitter / hue: need 0 <= jitter < 1 and 0 <= hue <= 0.5")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"{p}blur_sigma: need 0 < lo <= hi, got {list(self.blur_sigma)}")


def dataset_items(data) -> int:
    """Items of the dataset a ``DataConfig`` describes (what the batch's ``"index"`` counts): images, or videos
    times ``clips_per_video``."""
    from vidssl.data import resolve_entries, scan_image_folder

    if data.source == "images":
        return len(scan_image_folder(data.root)[0])
    return len(resolve_entries(data)) * data.clips_per_video


class InstanceDiscrimination(Objective):
    """Instance discrimination between two augmented frames of a clip (module docstring: the three policies).

    Args:
        encoder: shared frame encoder ``(M, 3, H, W) -> (M, C, h, w)`` with ``out_channels`` C.
        negatives: ``"batch"`` (SimCLR), ``"queue"`` (MoCo v2) or ``"memory_bank"`` (Wu et al.).
        temperature: tau of the cosine similarities (MoCo v2 0.2, SimCLR 0.1, Wu 0.07).
        dim: projection dimension (128).
        hidden: MLP hidden width (0: C).
        frames: the two clip frames used as views.
        queue_size: K (queue; 65536).
        momentum: key-encoder EMA m (queue; 0.999).
        shuffle_bn: shuffle keys across ranks under DDP (queue).
        bn_splits: BN sub-batches per process for query and key encoders (queue; 1 = whole batch).
        bank_size: memory-bank entries (memory_bank; must exceed every ``"index"`` of the batch).
        bank_momentum: bank proximal-update lambda (0.5).
        bank_loss: ``"softmax"`` or ``"nce"`` (memory_bank).
        num_negatives: sampled bank negatives (0: the whole bank).
        view_augment: apply :func:`augment_views` to each view (training and eval alike: it defines the task).
        flip_prob, jitter_prob, jitter, hue, grayscale_prob, blur_prob, blur_sigma: of :func:`augment_views`.
        input_mean, input_std: the data normalisation (``data.mean``/``data.std``), undone before the photometric
            augmentation and re-applied after it.
        key_prefix: config path named in the errors raised while training (``objectives.0`` when built from a
            recipe; empty: the bare argument names). Build-time errors name the bare argument; the recipe builder
            puts the config path in front.
    """

    Params = InstanceParams

    @classmethod
    def data_needs(cls, params: InstanceParams, data=None) -> DataNeeds:
        """The two view frames: clips of ``max(frames) + 1`` frames, any sampler."""
        return DataNeeds(clip_len=max(params.frames) + 1)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: InstanceParams, ctx: BuildContext) -> "InstanceDiscrimination":
        kw = to_dict(params)
        if params.negatives == "queue" and ctx.batch_size and params.queue_size % ctx.batch_size:
            raise ConfigError(f"queue_size: {params.queue_size} must be a multiple of the global "
                              f"batch {ctx.batch_size} (train.batch_size; MoCo's FIFO never wraps inside a batch)")
        if params.negatives == "memory_bank" and params.bank_size == 0:
            if ctx.data is None:
                raise ConfigError("bank_size: 0 means the main dataset's item count, but no data section is known")
            kw["bank_size"] = dataset_items(ctx.data)
        if ctx.data is not None:
            kw.update(input_mean=tuple(ctx.data.mean), input_std=tuple(ctx.data.std))
        return cls(encoder, **kw, key_prefix=ctx.prefix)

    def __init__(self, encoder: nn.Module, *, negatives: str = "queue", temperature: float = 0.2, dim: int = 128,
                 hidden: int = 0, frames: Sequence[int] = (0, 1), queue_size: int = 65536, momentum: float = 0.999,
                 shuffle_bn: bool = True, bn_splits: int = 1, bank_size: int = 0, bank_momentum: float = 0.5,
                 bank_loss: str = "softmax", num_negatives: int = 0, view_augment: bool = True,
                 flip_prob: float = 0.5, jitter_prob: float = 0.8, jitter: float = 0.4, hue: float = 0.1,
                 grayscale_prob: float = 0.2, blur_prob: float = 0.5, blur_sigma: Sequence[float] = (0.1, 2.0),
                 input_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 input_std: Sequence[float] = (0.229, 0.224, 0.225), key_prefix: str = "") -> None:
        super().__init__()
        InstanceParams(negatives=negatives, temperature=temperature, dim=dim, hidden=hidden, frames=tuple(frames),
                       queue_size=queue_size, momentum=momentum, bn_splits=bn_splits, bank_size=bank_size,
                       bank_momentum=bank_momentum, bank_loss=bank_loss, num_negatives=num_negatives,
                       flip_prob=flip_prob, jitter_prob=jitter_prob, jitter=jitter, hue=hue,
                       grayscale_prob=grayscale_prob, blur_prob=blur_prob,
                       blur_sigma=tuple(blur_sigma)).validate()
        if negatives == "memory_bank" and bank_size < 2:
            raise ConfigError(f"bank_size: the memory bank needs >= 2 entries (one per dataset "
                              f"item), got {bank_size}")
        self.encoder = encoder
        self.key_prefix = key_prefix
        self.negatives, self.temperature, self.frames = negatives, float(temperature), tuple(int(f) for f in frames)
        self.head = ProjectionHead(encoder.out_channels, hidden or encoder.out_channels, dim)
        self.augment = dict(flip_prob=flip_prob, jitter_prob=jitter_prob, jitter=jitter, hue=hue,
                            grayscale_prob=grayscale_prob, blur_prob=blur_prob, blur_sigma=tuple(blur_sigma))
        self.view_augment = bool(view_augment)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.momentum, self.shuffle_bn, self.bn_splits = float(momentum), bool(shuffle_bn), int(bn_splits)
        self.bank_loss, self.num_negatives = bank_loss, int(num_negatives)
        self._has_batchnorm = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in encoder.modules())
        if negatives == "queue":
            self.key_encoder = copy.deepcopy(encoder)  # same initial weights as the query side (MoCo)
            self.key_head = copy.deepcopy(self.head)
            for p in [*self.key_encoder.parameters(), *self.key_head.parameters()]:
                p.requires_grad_(False)
            self.queue = MoCoQueue(dim, queue_size)
        elif negatives == "memory_bank":
            self.memory = MemoryBank(bank_size, dim, momentum=bank_momentum)
            self.register_buffer("log_normaliser", torch.tensor(float("nan"), dtype=torch.float64))

    # ------------------------------------------------------------------------------------------ views

    def views(self, video: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two normalised view batches ``(B, 3, H, W)`` of ``video`` ``(B, T, 3, H, W)`` (frames ``self.frames``,
        each independently augmented)."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"batch['video']: expected (B, T, 3, H, W), got shape {tuple(video.shape)}")
        need = max(self.frames) + 1
        if video.shape[1] < need:
            raise ValueError(f"batch['video']: instance discrimination reads clip frames {list(self.frames)} and needs "
                             f">= {need} frames, got {video.shape[1]}; raise data.clip_len")
        picked = video[:, list(self.frames)]  # b 2 3 h w
        if not self.view_augment:
            return picked[:, 0], picked[:, 1]  # b 3 h w each
        rgb = input_rgb(picked, mean=self.input_mean, std=self.input_std)  # b 2 3 h w in [0, 1]
        m = torch.tensor(self.input_mean, dtype=video.dtype, device=video.device)[:, None, None]  # 3 1 1
        s = torch.tensor(self.input_std, dtype=video.dtype, device=video.device)[:, None, None]  # 3 1 1
        out = [(augment_views(rgb[:, v], generator=generator, **self.augment) - m) / s for v in range(2)]
        return out[0], out[1]  # b 3 h w each

    def embed(self, x: torch.Tensor, *, key: bool = False) -> torch.Tensor:
        """``(M, 3, H, W)`` -> ``(M, dim)`` projections (the momentum branch with ``key``); BN per sub-batch when
        ``bn_splits > 1`` in the queue policy."""
        enc, head = (self.key_encoder, self.key_head) if key else (self.encoder, self.head)
        splits = self.bn_splits if self.negatives == "queue" else 1
        if x.shape[0] % splits:
            raise ConfigError(f"{_key(self.key_prefix, 'bn_splits')}: {splits} does not divide the per-process batch "
                              f"{x.shape[0]} (train.batch_size / processes)")
        return torch.cat([head(enc(chunk)) for chunk in x.chunk(splits)], dim=0)  # m dim, sub-batches in order

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """``batch["video"]: (B, T, 3, H, W)`` (and ``"index"`` for the memory bank) -> ``(loss, logs)``."""
        view_a, view_b = self.views(batch["video"], generator)  # b 3 h w each
        if self.negatives == "batch":
            return self._batch(view_a, view_b)
        if self.negatives == "queue":
            return self._queue(view_a, view_b, generator)
        return self._bank(view_a, view_b, batch, generator)

    def _batch(self, view_a: torch.Tensor, view_b: torch.Tensor):
        world = rank_and_world()[1]
        if view_a.shape[0] * world < 2:
            raise ConfigError("train.batch_size: negatives 'batch' needs >= 2 clips per global batch (the other "
                              f"clips are the negatives), got {view_a.shape[0] * world}")
        z = self.embed(torch.cat([view_a, view_b]))  # (2 b) dim
        z_a, z_b = z.chunk(2)  # b dim each
        scores, target, valid = nt_xent_scores(z_a, z_b, temperature=self.temperature, gather=True)  # 2b 2wb
        loss, n = info_nce(scores, target, valid=valid)
        return loss, contrastive_logs(loss, n, scores, target, valid)

    def _queue(self, view_a: torch.Tensor, view_b: torch.Tensor, generator: torch.Generator | None):
        size = self.queue.queue.shape[0]
        global_batch = view_a.shape[0] * rank_and_world()[1]
        if size < global_batch or size % global_batch:
            raise ConfigError(f"{_key(self.key_prefix, 'queue_size')}: {size} must be a multiple of the global batch "
                              f"{global_batch} (train.batch_size; MoCo's FIFO never wraps inside a batch)")
        if self.training and self.bn_splits == 1 and rank_and_world()[1] == 1 and self._has_batchnorm:
            raise ConfigError(f"{_key(self.key_prefix, 'bn_splits')}: 1 in a single process lets the key encoder's "
                              "BatchNorm statistics leak the positive (MoCo shuffles keys across GPUs for its "
                              "per-GPU BN; one process has no other GPU to shuffle across): set bn_splits >= 2 "
                              "(BN per sub-batch, keys shuffled across the sub-batches) or train with several "
                              "processes (torchrun)")
        q = self.embed(view_a)  # b dim
        with torch.no_grad():
            if self.training:
                momentum_update(self.key_encoder, self.encoder, self.momentum, copy_buffers=False)
                momentum_update(self.key_head, self.head, self.momentum, copy_buffers=False)
            shuffle = self.training and (self.shuffle_bn or self.bn_splits > 1)
            if shuffle:
                x, idx_unshuffle = batch_shuffle(view_b, generator=generator)  # b 3 h w
                k = batch_unshuffle(self.embed(x, key=True), idx_unshuffle)  # b dim
            else:
                k = self.embed(view_b, key=True)  # b dim
        scores, target = moco_scores(q, k, self.queue.queue.clone(), temperature=self.temperature)  # b 1+K
        loss, n = info_nce(scores, target)
        if self.training:
            self.queue.dequeue_and_enqueue(F.normalize(k.float(), dim=-1))
        return loss, contrastive_logs(loss, n, scores, target)

    def _bank(self, view_a: torch.Tensor, view_b: torch.Tensor, batch: dict, generator: torch.Generator | None):
        if "index" not in batch:
            raise ValueError("batch['index']: negatives 'memory_bank' needs the dataset item index of every clip")
        index = torch.as_tensor(batch["index"], device=view_a.device).long()  # b
        size = self.memory.bank.shape[0]
        if int(index.max()) >= size or int(index.min()) < 0:
            raise ConfigError(f"{_key(self.key_prefix, 'bank_size')}: {size} entries, but the batch has item index "
                              f"{int(index.max())}; set bank_size to the dataset's item count (0: inferred)")
        z = self.embed(torch.cat([view_a, view_b]))  # (2 b) dim
        both = torch.cat([index, index])  # (2 b)
        bank = self.memory.bank if self.num_negatives else self.memory.bank.clone()  # n dim, read before the update
        scores, target = memory_bank_scores(z, bank, both, temperature=self.temperature,
                                            num_negatives=self.num_negatives or None,
                                            generator=generator)  # (2 b) n (whole bank) or (2 b) 1+m (sampled)
        if self.bank_loss == "softmax":
            loss, n = info_nce(scores, target)  # (2 b) candidates: bank or 1 + m
            logs = contrastive_logs(loss, n, scores, target)
        else:  # Wu et al.'s NCE: positive first, m uniform noise entries
            log_z = float(self.log_normaliser)
            if math.isnan(log_z):  # estimated once, on the first training batch, then frozen
                log_z = estimate_log_normaliser(gather_no_grad(scores), size)
                if self.training:
                    self.log_normaliser.fill_(log_z)
            log_pn = -math.log(size)
            loss = nce_loss(scores[:, 0], scores[:, 1:], log_pn, log_pn, log_normaliser=log_z)  # ()
            ce, n = info_nce(scores, 0)  # the softmax over the same candidates, a monitor only
            logs = {**contrastive_logs(ce, n, scores, 0), "loss": float(loss.detach()),
                    "log_normaliser": log_z}
        if self.training:
            f = F.normalize(z.detach().float(), dim=-1)  # (2 b) dim
            f_a, f_b = f.chunk(2)  # b dim each
            self.memory.update(index, F.normalize(f_a + f_b, dim=-1))  # the mean of the two views, normalised
        return loss, logs
