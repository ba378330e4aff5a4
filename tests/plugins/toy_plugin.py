"""A method defined outside vidssl, registered through ``--plugin toy_plugin`` (tests/test_contract.py).

``toy``: a feature-prediction objective that reads ``clip_len`` frames of its streams and logs how many items of
each stream it saw. ``toy2opt``: runs its own ``training_step`` with two optimisers (SGD with momentum on the
encoder, Adam on its head) and two backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.engine import register_objective
from vidssl.models.objective import BuildContext, DataNeeds, Objective, StepContext


@dataclass
class ToyParams:
    clip_len: int = 2  #: frames read per clip
    streams: list[str] = field(default_factory=lambda: ["main"])  #: streams read (first: the batch)
    dim: int = 8  #: head width


class Toy(Objective):
    """Predict the features of frame ``clip_len - 1`` from those of frame 0 (a linear head); logs item counts."""

    Params = ToyParams

    @classmethod
    def data_needs(cls, params: ToyParams, data=None) -> DataNeeds:
        return DataNeeds(streams=tuple(params.streams), clip_len=params.clip_len)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: ToyParams, ctx: BuildContext) -> "Toy":
        return cls(encoder, clip_len=params.clip_len, dim=params.dim, total_steps=ctx.total_steps)

    def __init__(self, encoder: nn.Module, *, clip_len: int = 2, dim: int = 8, total_steps: int = 1) -> None:
        super().__init__()
        self.encoder, self.clip_len, self.total_steps = encoder, clip_len, total_steps
        self.head = nn.Conv2d(encoder.out_channels, encoder.out_channels, 1)

    def forward(self, batch, generator=None):
        video = batch["video"][:, : self.clip_len]  # b t 3 h w
        feats = self.encoder(einops.rearrange(video, "b t c h w -> (b t) c h w"))
        feats = einops.rearrange(feats, "(b t) c h w -> b t c h w", t=video.shape[1])
        loss = F.mse_loss(self.head(feats[:, 0]), feats[:, -1].detach())
        logs = {"mse": float(loss.detach()), "main_items": float(batch["video"].shape[0]),
                "total_steps": float(self.total_steps)}
        for name, b in batch.get("streams", {}).items():
            logs[f"{name}_items"] = float(b["video"].shape[0])
            if "label" in b:
                logs[f"{name}_label_sum"] = float(b["label"].sum())
        return loss, logs


@dataclass
class TwoOptParams:
    encoder_lr: float = 0.05
    head_lr: float = 0.01


class TwoOpt(Objective):
    """Own backward passes: the encoder learns to shrink its features (SGD + momentum), the head to predict frame 1
    from frame 0 on detached features (Adam)."""

    Params = TwoOptParams
    custom_step = True

    @classmethod
    def data_needs(cls, params, data=None) -> DataNeeds:
        return DataNeeds(clip_len=2)

    @classmethod
    def from_params(cls, encoder, params, ctx):
        return cls(encoder, encoder_lr=params.encoder_lr, head_lr=params.head_lr)

    def __init__(self, encoder, *, encoder_lr=0.05, head_lr=0.01):
        super().__init__()
        self.encoder, self.encoder_lr, self.head_lr = encoder, encoder_lr, head_lr
        self.head = nn.Conv2d(encoder.out_channels, encoder.out_channels, 1)

    def configure_optimizers(self, build):
        return {"encoder": torch.optim.SGD(self.encoder.parameters(), lr=self.encoder_lr, momentum=0.9),
                "head": torch.optim.Adam(self.head.parameters(), lr=self.head_lr)}

    def training_step(self, batch, ctx: StepContext):
        enc_opt, head_opt = ctx.optimizers["encoder"], ctx.optimizers["head"]
        video = batch["video"]
        with ctx.autocast():
            f0, f1 = self.encoder(video[:, 0]), self.encoder(video[:, 1])
            enc_loss = f0.pow(2).mean() + f1.pow(2).mean()
        enc_opt.zero_grad(set_to_none=True)
        enc_loss.backward()
        ctx.all_reduce_gradients(self.encoder.parameters())
        enc_opt.step()
        with ctx.autocast():
            head_loss = F.mse_loss(self.head(f0.detach()), f1.detach())
        head_opt.zero_grad(set_to_none=True)
        head_loss.backward()
        ctx.all_reduce_gradients(self.head.parameters())
        head_opt.step()
        return {"loss": float(enc_loss.detach() + head_loss.detach()), "enc": float(enc_loss.detach()),
                "head": float(head_loss.detach())}


register_objective("toy", Toy, replace=True)
register_objective("toy2opt", TwoOpt, replace=True)
