"""Correspondence Flow (CorrFlow, Lai & Xie, BMVC 2019) as a training objective.

The encoder sees RGB frames in ``[0, 1]`` through an information bottleneck (:func:`rgb_channel_dropout`); the
colour of frame ``t + 1`` -- Lab ``ab`` quantised to ``K = 16`` k-means centroids -- is reconstructed by copying the
reference's colours through restricted attention: ``A(q, delta) = <f_t[q], f_ref[q + delta]>``, ``delta`` in
``[-6, 6]^2``, out-of-image entries excluded, ``softmax`` over the window (no normalisation, no temperature), copy at
stride 4, bilinear x4 upsampling. Training follows the official code (zlai0/CorrFlow ``main.py``) on triplets
``(I_0, I_1, I_2)``:

* ``L_sim = CE(c_1 <- GT c_0) + CE(c_2 <- r_1)`` with ``r_1`` the ground-truth colours of frame 1 with probability
  ``eps = ss_start - (ss_start - ss_end) * progress`` (scheduled sampling, 0.9 -> 0.6), else the prediction ``c_1``;
* ``L_long = CE(c_0 after 0->1->0) + CE(c_0 after 0->1->2->1->0)`` (recursive, own predictions);
* ``L = L_sim + long_weight * L_long``.

Quirks and choices (named flags):

* ``ref_downsample="ids_bilinear"`` (official): the reference's integer colour-id map is bilinearly downsampled by 4
  and truncated to int before the one-hot (intermediate ids appear at colour boundaries); ``"onehot_bilinear"``
  downsamples the one-hot instead (soft).
* ``numerics="logsumexp"`` (spec recommendation): exact ``log c = logsumexp(A + log c_ref) - logsumexp(A)`` and
  log-space bilinear upsampling; ``"official"``: ``log(upsample(c) + 1e-8)``.
* ``centroids``: the official 16 Kinetics centroids are not shipped; by default they are fitted by k-means on the
  ``ab`` values of the first training batch (stored in the ``centroids`` buffer, so checkpoints carry them; under
  DDP rank 0's are broadcast). Give ``centroids`` explicitly for a fixed palette.
* Input: the batch holds normalised frames; ``input_mean``/``input_std`` undo the data normalisation (recipes set
  ``data.mean=[0,0,0]``, ``data.std=[1,1,1]`` and leave these at their defaults). RGB outside ``[0, 1]`` raises.
* ColorJitter(0.1, 0.1, 0.1, 0.1) with probability 0.1 per clip, fresh parameters per frame, on the encoder input
  only (the colour targets come from the clean frames), as the official loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vidssl.config import ConfigError, to_dict
from vidssl.losses.reconstruction import colour_nll_log, kmeans, log_bilinear_upsample, one_hot_map, quantise_ab
from vidssl.models.lab import rgb_to_lab
from vidssl.models.local_attention import local_aggregate, local_correlation, local_window, window_valid
from vidssl.models.objective import BuildContext, DataNeeds, Objective

__all__ = ["CorrFlow", "colour_jitter_frames", "input_rgb", "rgb_channel_dropout"]


def _rand(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    """Uniform ``[0, 1)`` draws on the CPU from ``generator`` (which may live on a GPU)."""
    dev = generator.device if generator is not None else None
    return torch.rand(tuple(shape), generator=generator, device=dev).cpu()


def _randint(generator: torch.Generator | None, high: int, *shape: int) -> torch.Tensor:
    dev = generator.device if generator is not None else None
    return torch.randint(high, tuple(shape), generator=generator, device=dev).cpu()


def input_rgb(video: torch.Tensor, *, mean: Sequence[float], std: Sequence[float], name: str = "batch['video']",
              tolerance: float = 0.02) -> torch.Tensor:
    """Undo the data normalisation: ``video * std + mean``, checked to lie in ``[0, 1]``.

    Args:
        video: ``(B, T, 3, H, W)`` as delivered by the loader.
        mean, std: the ``data.mean``/``data.std`` the loader used.

    Returns:
        ``(B, T, 3, H, W)`` RGB in ``[0, 1]``.
    """
    if video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"{name}: expected (B, T, 3, H, W), got shape {tuple(video.shape)}")
    m = torch.tensor(tuple(mean), dtype=video.dtype, device=video.device)[:, None, None]
    s = torch.tensor(tuple(std), dtype=video.dtype, device=video.device)[:, None, None]
    rgb = video * s + m
    lo, hi = float(rgb.min()), float(rgb.max())
    if lo < -tolerance or hi > 1 + tolerance:
        raise ValueError(f"{name}: after undoing the normalisation (mean {tuple(mean)}, std {tuple(std)}) the frames "
                         f"span [{lo:.3f}, {hi:.3f}], expected RGB in [0, 1]; set data.mean=[0,0,0] and "
                         "data.std=[1,1,1] or give the objective's input_mean/input_std the data normalisation")
    return rgb.clamp(0.0, 1.0)


def rgb_channel_dropout(frames: torch.Tensor, *, keep_prob: float = 0.3,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[int]]:
    """CorrFlow's information bottleneck on RGB input (one draw for the whole batch, all frames alike).

    With probability ``keep_prob`` nothing happens; otherwise ``k`` in ``{1, 2}`` (equally likely) of the three
    channels, chosen uniformly without replacement, are zeroed and the frames are multiplied by ``3 / (3 - k)``.

    Args:
        frames: ``(B, T, 3, H, W)`` or ``(B, 3, H, W)``.

    Returns:
        the new frames (same shape; the input is not modified) and the sorted dropped channel indices.
    """
    if frames.shape[-3] != 3:
        raise ValueError(f"frames: expected 3 colour channels at dim -3, got shape {tuple(frames.shape)}")
    if not 0 <= keep_prob <= 1:
        raise ValueError(f"keep_prob: must lie in [0, 1], got {keep_prob}")
    if float(_rand(generator)) < keep_prob:
        return frames, []
    k = 1 + int(_randint(generator, 2))
    dropped = sorted(torch.randperm(3, generator=generator, device=generator.device if generator else None)
                     .cpu()[:k].tolist())
    keep = torch.ones(3, dtype=frames.dtype, device=frames.device)
    keep[dropped] = 0.0
    return frames * (keep[:, None, None] * (3.0 / (3 - k))), dropped


def colour_jitter_frames(frames: torch.Tensor, *, prob: float = 0.1, strength: float = 0.1,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision ``ColorJitter(s, s, s, s)`` on a random subset of clips, with fresh parameters for every frame.

    Args:
        frames: ``(B, T, 3, H, W)`` RGB in ``[0, 1]``.
        prob: probability that a clip is jittered (CorrFlow: 0.1).
        strength: brightness/contrast/saturation factors in ``[1 - s, 1 + s]``, hue shift in ``[-s, s]``.

    Returns:
        ``(B, T, 3, H, W)``.
    """
    from torchvision.transforms.v2 import functional as TF

    if prob <= 0 or strength <= 0:
        return frames
    b, t = frames.shape[:2]
    picked = (_rand(generator, b) < prob).tolist()
    if not any(picked):
        return frames
    out = frames.clone()
    for i in range(b):
        if not picked[i]:
            continue
        for j in range(t):
            x = out[i, j]
            order = torch.randperm(4, generator=generator, device=generator.device if generator else None).tolist()
            draws = _rand(generator, 4).tolist()
            for op in order:
                if op == 0:
                    x = TF.adjust_brightness(x, 1 - strength + 2 * strength * draws[0])
                elif op == 1:
                    x = TF.adjust_contrast(x, 1 - strength + 2 * strength * draws[1])
                elif op == 2:
                    x = TF.adjust_saturation(x, 1 - strength + 2 * strength * draws[2])
                else:
                    x = TF.adjust_hue(x, -strength + 2 * strength * draws[3])
            out[i, j] = x
    return out


@dataclass
class CorrFlowParams:
    """Correspondence Flow (zlai0/CorrFlow defaults; see :class:`vidssl.models.CorrFlow`)."""

    radius: int = 6  #: restricted-attention half-size (13x13)
    num_colours: int = 16  #: quantised ab colours
    centroids: list[list[float]] | None = None  #: K (a, b) pairs; null = k-means on the first training batch
    keep_prob: float = 0.3  #: probability of no RGB channel dropout
    long_weight: float = 0.1  #: weight of the long-term cycle loss
    ss_start: float = 0.9  #: scheduled sampling: P(ground-truth colours at step 2) at the start ...
    ss_end: float = 0.6  #: ... and after schedule_steps
    schedule_steps: int | None = None  #: steps of the ss_start -> ss_end decay; null = the run's train.steps
    ref_downsample: Literal["ids_bilinear", "onehot_bilinear"] = "ids_bilinear"  #: official: bilinear on ids
    numerics: Literal["logsumexp", "official"] = "logsumexp"  #: exact log-probabilities, or log(p + 1e-8)
    temperature: float = 1.0  #: correlation divisor (1 = official raw dot products)
    jitter_prob: float = 0.1  #: ColorJitter probability per clip (encoder input only)
    jitter_strength: float = 0.1
    input_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  #: data normalisation to undo (recipes: none)
    input_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    kmeans_samples: int = 100_000

    def validate(self, prefix: str = "") -> None:
        if self.radius < 1 or self.num_colours < 2 or (self.schedule_steps is not None and self.schedule_steps < 1):
            raise ConfigError(f"{prefix}: radius >= 1, num_colours >= 2 and schedule_steps >= 1 (or null) are "
                              "required")
        if not 0 <= self.keep_prob <= 1 or not 0 <= self.jitter_prob <= 1:
            raise ConfigError(f"{prefix}.keep_prob/jitter_prob: must lie in [0, 1]")
        if self.centroids is not None and (len(self.centroids) != self.num_colours
                                           or any(len(c) != 2 for c in self.centroids)):
            raise ConfigError(f"{prefix}.centroids: expected {self.num_colours} [a, b] pairs")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")


class CorrFlow(Objective):
    """CorrFlow objective over a shared stride-4 encoder.

    Args:
        encoder: frame encoder ``(M, 3, H, W) -> (M, C, h, w)`` (the :class:`~vidssl.models.mast_encoder.MASTEncoder`).
        radius: attention window half-size (6: 13x13).
        num_colours: colour clusters ``K`` (16).
        centroids: ``K`` ``(a, b)`` pairs; ``None`` fits them on the first training batch (see module docstring).
        keep_prob: probability of no channel dropout (0.3).
        long_weight: weight of the long-term cycle loss (0.1).
        ss_start, ss_end: scheduled-sampling probability of using ground-truth colours for the second step,
            linear over ``schedule_steps`` optimisation steps (0.9 -> 0.6; the official code spans all iterations).
        schedule_steps: steps over which the probability decays (the recipe's ``null``: the run's steps).
        ref_downsample: ``"ids_bilinear"`` (official) or ``"onehot_bilinear"``.
        numerics: ``"logsumexp"`` (exact log-probabilities) or ``"official"`` (``log(p + 1e-8)``).
        temperature: logits are divided by it (1 = official raw dot products).
        jitter_prob, jitter_strength: CorrFlow's ColorJitter on the encoder input (0.1, 0.1).
        input_mean, input_std: the data normalisation to undo (default: none).
        kmeans_samples: pixels sampled from the first batch to fit the centroids.

    ``forward(batch, generator)``: ``batch["video"]`` ``(B, T >= 3, 3, H, W)``, the first three frames are the
    triplet; returns ``(loss, logs)``.
    """

    Params = CorrFlowParams

    @classmethod
    def data_needs(cls, params: CorrFlowParams, data=None) -> DataNeeds:
        """The first three frames are the triplet (frame 0 -> 1 -> 2, and the long cycle 0 -> 2)."""
        return DataNeeds(clip_len=3, colour="rgb")

    @classmethod
    def from_params(cls, encoder: nn.Module, params: CorrFlowParams, ctx: BuildContext) -> "CorrFlow":
        """``schedule_steps: null`` spans the run (``ctx.total_steps``)."""
        kw = to_dict(params)
        kw["schedule_steps"] = params.schedule_steps or ctx.total_steps
        return cls(encoder, **kw)

    def __init__(self, encoder: nn.Module, *, radius: int = 6, num_colours: int = 16,
                 centroids: Sequence[Sequence[float]] | torch.Tensor | None = None, keep_prob: float = 0.3,
                 long_weight: float = 0.1, ss_start: float = 0.9, ss_end: float = 0.6, schedule_steps: int = 100_000,
                 ref_downsample: Literal["ids_bilinear", "onehot_bilinear"] = "ids_bilinear",
                 numerics: Literal["logsumexp", "official"] = "logsumexp", temperature: float = 1.0,
                 jitter_prob: float = 0.1, jitter_strength: float = 0.1,
                 input_mean: Sequence[float] = (0.0, 0.0, 0.0), input_std: Sequence[float] = (1.0, 1.0, 1.0),
                 kmeans_samples: int = 100_000) -> None:
        super().__init__()
        if ref_downsample not in ("ids_bilinear", "onehot_bilinear"):
            raise ValueError(f"ref_downsample: {ref_downsample!r}; expected 'ids_bilinear' or 'onehot_bilinear'")
        if numerics not in ("logsumexp", "official"):
            raise ValueError(f"numerics: {numerics!r}; expected 'logsumexp' or 'official'")
        if radius < 1 or num_colours < 2 or schedule_steps < 1 or not temperature > 0:
            raise ValueError("radius >= 1, num_colours >= 2, schedule_steps >= 1 and temperature > 0 are required")
        self.encoder = encoder
        self.radius, self.num_colours = int(radius), int(num_colours)
        self.keep_prob, self.long_weight = float(keep_prob), float(long_weight)
        self.ss_start, self.ss_end, self.schedule_steps = float(ss_start), float(ss_end), int(schedule_steps)
        self.ref_downsample, self.numerics, self.temperature = ref_downsample, numerics, float(temperature)
        self.jitter_prob, self.jitter_strength = float(jitter_prob), float(jitter_strength)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.kmeans_samples = int(kmeans_samples)
        if centroids is not None:
            c = torch.as_tensor(centroids, dtype=torch.float32)
            if c.shape != (self.num_colours, 2):
                raise ValueError(f"centroids: expected {self.num_colours} (a, b) pairs, got shape {tuple(c.shape)}")
            fitted = True
        else:
            c, fitted = torch.zeros(self.num_colours, 2), False
        self.register_buffer("centroids", c)  #: (K, 2) ab centroids
        self.register_buffer("centroids_ready", torch.tensor(fitted))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  #: training forwards so far

    # ------------------------------------------------------------------ pieces
    def quantise(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB ``(..., 3, H, W)`` in [0, 1] -> colour ids ``(..., H, W)``."""
        return quantise_ab(rgb_to_lab(rgb)[..., 1:, :, :], self.centroids)

    def fit_centroids(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means of the ``ab`` values of ``rgb`` ``(..., 3, H, W)`` into the ``centroids`` buffer."""
        ab = rearrange(rgb_to_lab(rgb.detach().float())[..., 1:, :, :], "... c h w -> (... h w) c")
        n = ab.shape[0]
        if n > self.kmeans_samples:
            idx = _randint(generator, n, self.kmeans_samples).to(ab.device)
            ab = ab[idx]
        c = kmeans(ab, k=self.num_colours, generator=generator)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            c = c.to(self.centroids.device)
            dist.broadcast(c, src=0)
        self.centroids.copy_(c.to(self.centroids))
        self.centroids_ready.fill_(True)

    def scheduled_sampling_prob(self) -> float:
        """Probability of feeding ground-truth colours at the second step (linear ``ss_start -> ss_end``)."""
        progress = min(1.0, float(self.step) / self.schedule_steps)
        return self.ss_start - (self.ss_start - self.ss_end) * progress

    def reference_colours(self, ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Ground-truth colour ids ``(B, H, W)`` -> reference colours at feature size ``(B, K, h, w)``."""
        if self.ref_downsample == "ids_bilinear":
            low = F.interpolate(ids[:, None].float(), size=size, mode="bilinear", align_corners=False)
            return one_hot_map(low[:, 0].long(), self.num_colours)
        return F.interpolate(one_hot_map(ids, self.num_colours), size=size, mode="bilinear", align_corners=False)

    def copy_colours(self, query: torch.Tensor, key: torch.Tensor, ref_colours: torch.Tensor,
                     out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy reference colours to the query frame through the 13x13 restricted attention.

        Args:
            query: ``(B, C, h, w)`` target features.
            key: ``(B, C, h, w)`` reference features.
            ref_colours: ``(B, K, h, w)`` reference colour probabilities.
            out_size: image size ``(H, W)``.

        Returns:
            ``(prob, log_prob)``, both ``(B, K, H, W)``: the upsampled colour distribution and the log-likelihoods
            the loss reads (``log(prob + 1e-8)`` with ``numerics="official"``).
        """
        h, w = query.shape[-2:]
        logits = local_correlation(query, key, radius=self.radius) / self.temperature
        valid = window_valid(h, w, radius=self.radius, device=query.device)
        logits = logits.masked_fill(~valid[None], float("-inf"))
        if self.numerics == "official":
            low = local_aggregate(torch.softmax(logits, dim=1), ref_colours, radius=self.radius)
            prob = F.interpolate(low, size=out_size, mode="bilinear", align_corners=False)
            return prob, torch.log(prob + 1e-8)
        log_ref = torch.log(ref_colours.clamp_min(1e-30))
        win = local_window(log_ref, radius=self.radius)  # b k o h w (outside: masked logits anyway)
        log_low = torch.logsumexp(logits[:, None] + win, dim=2) - torch.logsumexp(logits, dim=1)[:, None]
        log_up = log_bilinear_upsample(log_low, out_size)
        return log_up.exp(), log_up

    # ------------------------------------------------------------------ objective
    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """``batch["video"]: (B, T >= 3, 3, H, W)`` -> ``(loss, logs)``."""
        video = batch["video"]
        if video.ndim != 5 or video.shape[1] < 3:
            raise ValueError(f"batch['video']: CorrFlow needs clips of >= 3 frames (B, T, 3, H, W), got shape "
                             f"{tuple(video.shape)}; set data.clip_len=3")
        rgb = input_rgb(video[:, :3], mean=self.input_mean, std=self.input_std)
        b, t, _, height, width = rgb.shape
        if self.training and not bool(self.centroids_ready):
            self.fit_centroids(rgb, generator)
        if not bool(self.centroids_ready):
            raise ValueError("centroids: not fitted yet (train one step, or give CorrFlow centroids=...)")
        ids = self.quantise(rgb)  # b t H W
        x = rgb
        dropped: list[int] = []
        if self.training:
            x = colour_jitter_frames(x, prob=self.jitter_prob, strength=self.jitter_strength, generator=generator)
            x, dropped = rgb_channel_dropout(x, keep_prob=self.keep_prob, generator=generator)
        feats = [self.encoder(x[:, i]) for i in range(3)]  # 3 x (b, c, h, w), one call per frame as the official
        size = tuple(feats[0].shape[-2:])
        hw = (height, width)

        gt0 = self.reference_colours(ids[:, 0], size)
        gt1 = self.reference_colours(ids[:, 1], size)

        def down(prob: torch.Tensor) -> torch.Tensor:  # a predicted (B, K, H, W) distribution as a reference
            return F.interpolate(prob, size=size, mode="bilinear", align_corners=False)

        # similarity loss: 0 -> 1 from ground truth, 1 -> 2 from ground truth or the prediction (scheduled sampling)
        p1, lp1 = self.copy_colours(feats[1], feats[0], gt0, hw)
        eps = self.scheduled_sampling_prob()
        truth = (float(_rand(generator)) < eps) if self.training else True
        p2_pred, lp2_pred = self.copy_colours(feats[2], feats[1], down(p1), hw)
        if truth:
            _, lp2 = self.copy_colours(feats[2], feats[1], gt1, hw)
        else:
            lp2 = lp2_pred
        nll = colour_nll_log
        l_sim = nll(lp1, ids[:, 1]) + nll(lp2, ids[:, 2])
        # long-term cycles 0 -> 1 -> 0 and 0 -> 1 -> 2 -> 1 -> 0 on the model's own predictions
        _, lp0_a = self.copy_colours(feats[0], feats[1], down(p1), hw)
        p1_b, _ = self.copy_colours(feats[1], feats[2], down(p2_pred), hw)
        _, lp0_b = self.copy_colours(feats[0], feats[1], down(p1_b), hw)
        l_long = nll(lp0_a, ids[:, 0]) + nll(lp0_b, ids[:, 0])
        loss = l_sim + self.long_weight * l_long
        if self.training:
            self.step += 1
        with torch.no_grad():
            acc = float((lp1.argmax(1) == ids[:, 1]).float().mean())
            copy_acc = float((ids[:, 0] == ids[:, 1]).float().mean())  # identity copy baseline
        logs = {"loss_sim": float(l_sim.detach()), "loss_long": float(l_long.detach()), "acc_1": acc,
                "acc_identity": copy_acc, "ss_prob": eps, "ss_truth": float(truth),
                "dropped_channels": float(len(dropped))}
        return loss, logs

    def extra_repr(self) -> str:
        return (f"radius={self.radius}, num_colours={self.num_colours}, keep_prob={self.keep_prob}, "
                f"long_weight={self.long_weight}, ss=({self.ss_start}->{self.ss_end} over {self.schedule_steps}), "
                f"ref_downsample={self.ref_downsample}, numerics={self.numerics}, temperature={self.temperature}")
