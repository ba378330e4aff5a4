"""Greedy InfoMax (Loewe, O'Connor, Veeling, NeurIPS 2019): an encoder cut into modules, each trained only by its
own image-mode CPC loss (:mod:`vidssl.models.cpc`), no gradient between modules (spec section 2).

Modules: ``splits`` names the encoder stage that ends each module (``[layer1, layer2, layer3]``: module 0 = stem +
``layer1``, module 1 = ``layer2``, module 2 = ``layer3``, GIM's default 3-module vision split), or a block inside a
stage (``layer2.1``: up to and including block 1 of ``layer2``, named as in the state dict); the last split must
end the encoder's last built stage (``model.out_layer``). Module m reads ``stopgrad`` of module m-1's per-patch maps;
its code grid (maps average-pooled per patch) feeds its own :class:`~vidssl.models.cpc.RowCPCHead`. One optimiser
per module (``module0``, ``module1``, ...; checkpointed by name) over that module's stage(s) and head.

Modes (``mode``):

* ``joint`` (official default): all modules in one pass. ``backward: summed`` is the official code (PR #18): one
  backward of the summed losses after the whole forward -- every module's graph is alive at once, so the peak memory
  equals end-to-end CPC (GIM #22). ``backward: per_module`` runs each module's backward right after its forward, so
  only one module's graph is ever alive (same gradients, lower peak).
* ``sequential``: one module at a time per ``module_steps`` (steps per module, adding up to ``train.steps``;
  default an equal split); earlier modules run frozen in eval mode under ``torch.no_grad()`` (block by block, each
  map freed once the next block has read it; not ``inference_mode``, whose outputs autograd refuses to save as the
  active module's input), later ones are not run, and only the active module's optimiser steps. The active module
  also runs block by block (:meth:`_EncoderModule.steps`: no frame keeps a stage's input alive through the stage),
  and its per-patch maps are released after pooling (only the codes and what autograd saved stay). By default
  (``cache: none``) the frozen modules are recomputed every step, as the official ``--train_module`` does.
  ``cache: disk`` (ours) stores the frozen prefix's output instead: during the first ``cache_batches`` steps of
  module m's phase (m >= 1) each step's input to module m is written to ``<cache_dir>/module<m>/`` (safetensors,
  written atomically; default folder ``<run>/gim_cache``); later steps of the phase replay those inputs in order and
  ignore the batch the stream drew (no frozen module runs at all). Module m's k-th input is made from module m-1's
  k-th cached input by one frozen pass of module m-1 where that file exists (it does when module m-1 trained for at
  least k+1 steps); otherwise from the stream's batch through every frozen module. So the phases after module 0 train
  on the same ``cache_batches`` batches for ``module_steps[m] / cache_batches`` epochs: the trade of every feature
  cache (no fresh augmentation after the first pass). Each file records a fingerprint of the frozen weights and of
  the autocast precision it was made with; a file that does not match (a stale folder, another run, another
  precision) or does not read is remade. Every file is kept until the run's final checkpoint is written
  (:meth:`on_train_end` then removes them), so a resume into any phase reads the inputs the interrupted run used.
  Disk: ``cache_batches`` input maps per module after the first, per DDP rank (each rank caches its own batches):
  e.g. 64 x 24.5 MiB + 64 x 12 MiB for ``gim_resnet34`` at batch 8, 64 px in fp32. Two runs must not share a
  ``cache_dir`` while both train.

Memory, in every mode and in end-to-end :class:`~vidssl.models.cpc.CPC` alike (the same trunk code, so
``tools/bench_gim.py`` compares like with like): channels-last patches (no oneDNN reorder copies inside each
convolution), ReLUs on convolution outputs and the residual sums in place, ReLU gradients masked in place
(:class:`_ReLU`), gradients set to ``None`` before the forward. None of it changes a loss or a gradient beyond float
rounding (tests/test_gim.py checks this in float64 against the plain computation).
* ``pipelined``: ``workers`` threads, each owning a contiguous group of modules with their optimisers; between
  groups a one-slot buffer of detached activations (a bounded queue of size 1). Each engine step every worker runs
  concurrently on what its buffer holds: group 0 on the new batch, group g on group g-1's output of the previous
  step (staleness one step per group, the first g steps of a run or a resume idle for group g). Not under DDP (the
  threads would issue collectives concurrently); resume restarts with empty buffers.

Scores: GIM's raw dot products (``temperature: 0``); ``temperature > 0`` scores cosine similarity / temperature
instead (not in GIM: bounded logits; on held-out DAVIS sequences raw scores after a short CPU run fell below random
init, configs/gim_sample.yaml).

Encoders: any registered encoder with a stem (``conv1/bn1/relu/maxpool`` or a ``stem`` method) and stages named by
its ``layers``: torchvision ResNets, ``r2d3d18``, or GIM's own pre-activation ResNet without BatchNorm,
``gim_resnet50`` (bottleneck, widths 256/512/1024, the paper's) and ``gim_resnet34`` (basic blocks, 64/128/256):
5x5 stride-1 stem convolution, stages of 3/4/6 blocks, stride 2 at the first block of stages 2 and 3.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from vidssl.config import ConfigError
from vidssl.io.atomic import atomic_path
from vidssl.models.cpc import RowCPCHead, frames_as_images, patch_grid, patchify, trunk_input
from vidssl.models.objective import BuildContext, DataNeeds, Objective, StepContext

__all__ = ["GIM", "GIMResNet", "encoder_modules", "gim_resnet_from_config"]

# ------------------------------------------------------------------------------------------------ GIM's own ResNet


class _ReLU(torch.autograd.Function):
    """ReLU for the blocks below: in place on request (``x`` must then be a map nothing else reads, a convolution's
    fresh output), and a backward that masks the incoming gradient in place where autograd's ``threshold_backward``
    writes a new map (one map fewer alive at every ReLU of the backward). Safe here because inside a block a ReLU's
    output feeds only convolutions, so its incoming gradient is their fresh ``grad_input`` (or its sum), read by
    nothing else; same values as ``torch.relu`` (the same ``threshold_backward``, written into its input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = x.relu_() if inplace else torch.relu(x)  # b c h w
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad), None  # b c h w


def _relu(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """:class:`_ReLU` when a graph is recorded, plain ``relu`` / ``relu_`` otherwise (frozen modules)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReLU.apply(x, inplace)
    return x.relu_() if inplace else torch.relu(x)  # b c h w


class _PreActBottleneck(nn.Module):
    """GIM's ``PreActBottleneckNoBN``: relu -> 1x1 -> relu -> 3x3 (stride) -> relu -> 1x1 (x4), plus shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _relu(x)  # b cin h w (not in place: x is the identity)
        idt = x if self.shortcut is None else self.shortcut(out)  # b cout h' w'
        out = self.conv2(_relu(self.conv1(out), inplace=True))  # b width h' w' (conv outputs are not saved)
        return _residual(self.conv3(_relu(out, inplace=True)), idt)  # b cout h' w'


class _PreActBasic(nn.Module):
    """GIM's ``PreActBlockNoBN``: relu -> 3x3 (stride) -> relu -> 3x3, plus shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, width, 1, stride=stride, bias=False) if stride != 1 or cin != width else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _relu(x)  # b cin h w (not in place: x is the identity)
        idt = x if self.shortcut is None else self.shortcut(out)  # b width h' w'
        return _residual(self.conv2(_relu(self.conv1(out), inplace=True)), idt)  # b width h' w'


def _residual(branch: torch.Tensor, idt: torch.Tensor) -> torch.Tensor:
    """``branch + idt``, written into ``branch`` (a convolution's fresh output, which no backward needs) when the
    dtypes agree: one map fewer alive than an out-of-place sum."""
    return branch.add_(idt) if branch.dtype == idt.dtype else branch + idt  # b c h w


class GIMResNet(nn.Module):
    """GIM vision's trunk: ResNet-50 (or -34) stages 1-3, pre-activation, no BatchNorm.

    Args:
        arch: ``"gim_resnet50"`` (bottleneck) or ``"gim_resnet34"`` (basic blocks).
        out_layer: last stage built (``"layer1"`` .. ``"layer3"``).
        in_channels: input channels (GIM: 1, grayscale; 3 here so every vidssl loader and propagation fit).

    Shapes: ``(B, 3, H, W) -> (B, C, H / s, W / s)``, ``s`` = 1, 2, 4 after layer1..3.
    """

    padding_mode = "zeros"
    _LAYERS = ("layer1", "layer2", "layer3")
    _BLOCKS = (3, 4, 6)
    _WIDTHS = (64, 128, 256)

    def __init__(self, arch: str = "gim_resnet50", *, out_layer: str = "layer3", in_channels: int = 3) -> None:
        super().__init__()
        blocks = {"gim_resnet50": _PreActBottleneck, "gim_resnet34": _PreActBasic}
        if arch not in blocks:
            raise ValueError(f"arch: unknown GIM ResNet {arch!r}; expected one of {sorted(blocks)}")
        if out_layer not in self._LAYERS:
            raise ValueError(f"model.out_layer: {out_layer!r}; {arch} has stages {list(self._LAYERS)}")
        block = blocks[arch]
        self.arch, self.out_layer = arch, out_layer
        self.conv1 = nn.Conv2d(in_channels, 64, 5, stride=1, padding=2)
        self.layers: tuple[str, ...] = self._LAYERS[: self._LAYERS.index(out_layer) + 1]
        cin = 64
        for i, name in enumerate(self.layers):
            width = self._WIDTHS[i]
            setattr(self, name, nn.Sequential(*[block(cin if j == 0 else width * block.expansion, width,
                                                      2 if (j == 0 and i > 0) else 1)
                                                for j in range(self._BLOCKS[i])]))
            cin = width * block.expansion
        self._channels = {n: self._WIDTHS[i] * block.expansion for i, n in enumerate(self._LAYERS)}
        self.out_channels = self._channels[out_layer]
        self.stride = self.stride_at(out_layer)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 64, H, W)``."""
        return self.conv1(x)

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; ``upto`` stops after an earlier stage."""
        stop = upto or self.out_layer
        if stop not in self.layers:
            raise ValueError(f"upto: {stop!r} is not built in this encoder (has {list(self.layers)})")
        x = self.stem(x)  # b 64 H W
        for name in self.layers:
            for block in getattr(self, name):  # block by block: no caller holds a stage's input through the stage
                x = block(x)  # b c h w
            if name == stop:
                break
        return x

    def channels_at(self, layer: str) -> int:
        """Feature channels after ``layer``."""
        return self._channels[layer]

    def stride_at(self, layer: str) -> int:
        """Output stride after ``layer``."""
        return 2 ** self._LAYERS.index(layer)


def gim_resnet_from_config(cfg) -> GIMResNet:
    """Registry factory (``model.encoder: gim_resnet50 | gim_resnet34``; ``out_layer`` applies)."""
    if cfg.out_layer not in GIMResNet._LAYERS:
        raise ConfigError(f"model.out_layer: {cfg.out_layer!r}; {cfg.encoder} has stages {list(GIMResNet._LAYERS)} "
                          "(set model.out_layer and model.eval_layer to one of them)")
    return GIMResNet(cfg.encoder, out_layer=cfg.out_layer)


# ------------------------------------------------------------------------------------------------ module split


class _EncoderModule(nn.Module):
    """Blocks of ``encoder`` (with its stem when ``with_stem``), run in order; owns no parameters itself (they stay
    in the shared encoder, saved under ``encoder.*``).

    ``segments``: ``(stage, first_block, end_block)`` triples, a slice of each named stage (an ``nn.Sequential``).
    """

    def __init__(self, encoder: nn.Module, segments: list[tuple[str, int, int]], with_stem: bool) -> None:
        super().__init__()
        self._enc = [encoder]  # a list: not registered as a child (the objective's encoder owns the weights)
        self.segments, self.with_stem = segments, with_stem
        self.names = [n for n, _, _ in segments]

    def _stages(self) -> list[nn.Module]:
        enc = self._enc[0]
        out = []
        for name, a, b in self.segments:
            stage = getattr(enc, name)
            out.append(stage if (a, b) == (0, len(stage)) else stage[a:b])  # a slice shares the blocks
        return out

    def parts(self) -> list[nn.Module]:
        enc = self._enc[0]
        stem = ([enc] if hasattr(enc, "stem") else [enc.conv1, enc.bn1]) if self.with_stem else []
        stages = self._stages()
        if self.with_stem and hasattr(enc, "stem"):  # an encoder with a stem method: its non-stage parameters
            taken = {id(p) for n in enc.layers for p in getattr(enc, n).parameters()}
            return [_ParamBag([p for p in enc.parameters() if id(p) not in taken])] + stages
        return stem + stages

    def parameters_of(self) -> list[nn.Parameter]:
        return [p for part in self.parts() for p in part.parameters()]

    def steps(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The module as a flat list of callables (the stem, then every block), for a loop ``x = f(x)`` in which
        nothing but the loop variable holds a block's input, so each map is freed once the next block has read it
        (calling a stage, or this module, from a frame that keeps its argument holds the input to the end)."""
        enc = self._enc[0]
        stem = []
        if self.with_stem:
            stem = [enc.stem if hasattr(enc, "stem") else
                    (lambda x: enc.maxpool(enc.relu(enc.bn1(enc.conv1(x)))))]  # n c h w
        return stem + [block for stage in self._stages() for block in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.steps():
            x = f(x)  # n c' h' w'
        return x

    def set_mode(self, train: bool) -> None:
        for part in self.parts():
            part.train(train)


class _ParamBag(nn.Module):
    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self._p = params

    def parameters(self, recurse: bool = True):  # noqa: D102 - the stem's parameters as one part
        return iter(self._p)


def _cut_point(encoder: nn.Module, split: str, layers: list[str], key: str) -> tuple[int, int]:
    """``"layer2"`` (end of the stage) or ``"layer2.1"`` (after its block 1, 0-based, as in ``encoder.layer2.1.*``)
    -> ``(stage index, blocks of that stage taken)``."""
    name, _, block = split.partition(".")
    if name not in layers:
        raise ConfigError(f"{key}: [{split!r}] are not stages of the encoder, which has {layers} (model.out_layer "
                          "limits them; a cut inside a stage is 'layerN.<block>')")
    n = len(getattr(encoder, name))
    if not block:
        return layers.index(name), n
    if not block.isdigit() or int(block) >= n:
        raise ConfigError(f"{key}: {split!r}: {name} has blocks 0..{n - 1}")
    return layers.index(name), int(block) + 1


def encoder_modules(encoder: nn.Module, splits: list[str], key: str = "splits") -> list[_EncoderModule]:
    """Cut ``encoder`` into modules ending at ``splits``: stage names (``layer1``) or blocks inside a stage
    (``layer2.1`` = up to and including block 1 of ``layer2``), checked against ``encoder.layers``."""
    layers = list(getattr(encoder, "layers", ()))
    has_stem = hasattr(encoder, "stem") or all(hasattr(encoder, a) for a in ("conv1", "bn1", "relu", "maxpool"))
    if not layers or not has_stem:
        raise ConfigError(f"model.encoder: {type(encoder).__name__} cannot be cut into GIM modules (needs named "
                          "stages in .layers and a stem)")
    if not splits:
        raise ConfigError(f"{key}: needs at least one stage name; the encoder has {layers}")
    unknown = [s for s in splits if s.partition(".")[0] not in layers]
    if unknown:
        raise ConfigError(f"{key}: {unknown} are not stages of the encoder, which has {layers} (model.out_layer "
                          "limits them)")
    cuts = [_cut_point(encoder, s, layers, key) for s in splits]
    flat = [(i, b) for i, b in cuts]
    if flat != sorted(set(flat)) or any(b == 0 for _, b in flat):
        raise ConfigError(f"{key}: {splits} must name distinct stages in encoder order {layers}")
    last_stage = len(layers) - 1
    if cuts[-1] != (last_stage, len(getattr(encoder, layers[-1]))):
        raise ConfigError(f"{key}: the last module must end at the encoder's last stage {layers[-1]!r} "
                          f"(model.out_layer), got {splits[-1]!r}")
    out, pos = [], (0, 0)  # (stage, next block)
    for stage, end in cuts:
        segs = []
        for i in range(pos[0], stage + 1):
            a = pos[1] if i == pos[0] else 0
            b = end if i == stage else len(getattr(encoder, layers[i]))
            if b > a:
                segs.append((layers[i], a, b))
        out.append(_EncoderModule(encoder, segs, with_stem=pos == (0, 0)))
        n = len(getattr(encoder, layers[stage]))
        pos = (stage + 1, 0) if end == n else (stage, end)
    return out


# ------------------------------------------------------------------------------------------------ the objective


@dataclass
class GIMParams:
    """Greedy InfoMax (loeweX/Greedy_InfoMax vision defaults; see :mod:`vidssl.models.gim`)."""

    splits: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])  #: stage ending each module
    mode: Literal["joint", "sequential", "pipelined"] = "joint"  #: joint = official
    backward: Literal["summed", "per_module"] = "summed"  #: joint mode: official one summed backward, or per module
    module_steps: list[int] = field(default_factory=list)  #: sequential: steps per module (sum = train.steps)
    workers: int = 2  #: pipelined: threads (<= modules)
    pred_steps: int = 5  #: K horizons per head (GIM: 5)
    skip: int = 1  #: rows skipped before the first target (GIM: 1)
    negatives: Literal["batch_sampled", "batch_all"] = "batch_sampled"  #: GIM: 16 sampled from the batch
    num_negatives: int = 16  #: negatives per row (batch_sampled)
    temperature: float = 0.0  #: 0 = raw dot-product scores (GIM); > 0 = cosine / temperature (not in GIM)
    patch: int = 16  #: patch side (GIM: 16)
    patch_stride: int = 8  #: patch step (GIM: 8)
    cache: Literal["none", "disk"] = "none"  #: sequential: recompute frozen modules (GIM) or cache their outputs
    cache_batches: int = 64  #: cache disk: distinct batches cached per module phase, then replayed in order
    cache_dir: str = ""  #: cache disk: folder (empty: <run folder>/gim_cache)

    def validate(self, prefix: str = "") -> None:
        if self.cache not in ("none", "disk"):
            raise ConfigError(f"{prefix}.cache: {self.cache!r}; expected none or disk")
        if self.cache == "disk" and self.mode != "sequential":
            raise ConfigError(f"{prefix}.cache: disk caches the frozen modules of mode sequential; mode is "
                              f"{self.mode!r} (no module is frozen)")
        if self.cache_batches < 1:
            raise ConfigError(f"{prefix}.cache_batches: must be >= 1, got {self.cache_batches}")
        if self.workers < 1:
            raise ConfigError(f"{prefix}.workers: must be >= 1, got {self.workers}")
        if self.mode == "pipelined" and self.workers > len(self.splits):
            raise ConfigError(f"{prefix}.workers: {self.workers} pipelined workers for {len(self.splits)} modules "
                              "(splits); at most one worker per module")
        if any(s < 1 for s in self.module_steps):
            raise ConfigError(f"{prefix}.module_steps: every module needs >= 1 step, got {self.module_steps}")
        if self.module_steps and len(self.module_steps) != len(self.splits):
            raise ConfigError(f"{prefix}.module_steps: {len(self.module_steps)} entries for {len(self.splits)} "
                              "modules (splits)")
        if self.pred_steps < 1 or self.num_negatives < 1 or self.skip < 0 or self.temperature < 0:
            raise ConfigError(f"{prefix}.pred_steps / num_negatives / skip / temperature: must be >= 1 / >= 1 / >= 0 "
                              "/ >= 0")


class GIM(Objective):
    """Greedy InfoMax over the shared encoder (custom step: one optimiser per module).

    Args:
        encoder: a stage-structured encoder (see the module docstring).
        splits: the stage ending each module.
        mode: ``"joint"``, ``"sequential"`` or ``"pipelined"``.
        backward: joint mode: ``"summed"`` (official) or ``"per_module"``.
        module_steps: sequential: steps per module (empty: equal split of ``total_steps``).
        workers: pipelined: worker threads.
        pred_steps, skip, negatives, num_negatives, temperature: each head's CPC loss
            (:class:`~vidssl.models.cpc.RowCPCHead`).
        patch, patch_stride: the patch grid.
        cache: sequential: ``"none"`` (recompute the frozen modules every step, GIM) or ``"disk"`` (ours: cache
            their outputs, see the module docstring).
        cache_batches: ``cache="disk"``: batches cached per module phase and replayed.
        cache_dir: ``cache="disk"``: the cache folder (empty: ``gim_cache`` in the step context's ``work_dir``).
        total_steps: the run length (``module_steps`` must add up to it).
    """

    Params = GIMParams
    custom_step = True

    @classmethod
    def data_needs(cls, params: GIMParams, data=None) -> DataNeeds:
        """Frames are images: one frame per clip suffices."""
        return DataNeeds(clip_len=1)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: GIMParams, ctx: BuildContext) -> "GIM":
        return cls(encoder, splits=params.splits, mode=params.mode, backward=params.backward,
                   module_steps=params.module_steps, workers=params.workers, pred_steps=params.pred_steps,
                   skip=params.skip, negatives=params.negatives, num_negatives=params.num_negatives,
                   temperature=params.temperature, patch=params.patch, patch_stride=params.patch_stride,
                   cache=params.cache, cache_batches=params.cache_batches, cache_dir=params.cache_dir,
                   total_steps=ctx.total_steps)

    def __init__(self, encoder: nn.Module, *, splits: list[str] = ("layer1", "layer2", "layer3"),
                 mode: str = "joint", backward: str = "summed", module_steps: list[int] = (), workers: int = 2,
                 pred_steps: int = 5, skip: int = 1, negatives: str = "batch_sampled", num_negatives: int = 16,
                 temperature: float = 0.0, patch: int = 16, patch_stride: int = 8, cache: str = "none",
                 cache_batches: int = 64, cache_dir: str = "", total_steps: int = 1) -> None:
        super().__init__()
        if mode not in ("joint", "sequential", "pipelined"):
            raise ConfigError(f"mode: {mode!r}; expected joint, sequential or pipelined")
        if cache not in ("none", "disk") or (cache == "disk" and mode != "sequential") or cache_batches < 1:
            raise ConfigError(f"cache: {cache!r} with mode {mode!r}, cache_batches {cache_batches}; expected cache "
                              "none, or disk with mode sequential and cache_batches >= 1")
        if backward not in ("summed", "per_module"):
            raise ConfigError(f"backward: {backward!r}; expected summed or per_module")
        self.encoder = encoder
        self.blocks = encoder_modules(encoder, list(splits))  # plain list: parameters live in encoder
        m = len(self.blocks)
        self.heads = nn.ModuleList(RowCPCHead(encoder.channels_at(s.partition(".")[0]), pred_steps=pred_steps,
                                              skip=skip, negatives=negatives, num_negatives=num_negatives,
                                              temperature=temperature) for s in splits)
        self.mode, self.backward, self.patch, self.patch_stride = mode, backward, patch, patch_stride
        if mode == "pipelined" and not 1 <= workers <= m:
            raise ConfigError(f"workers: {workers} pipelined workers for {m} modules (splits); at most one per module")
        self.workers = workers
        steps = list(module_steps) or [total_steps // m + (i < total_steps % m) for i in range(m)]
        if len(steps) != m or (mode == "sequential" and sum(steps) != total_steps):
            raise ConfigError(f"module_steps: {list(module_steps)} must give {m} modules steps adding up to "
                              f"train.steps={total_steps}")
        self.module_ends = [sum(steps[: i + 1]) for i in range(m)]  #: sequential: module i trains until this step
        self.groups = [list(g) for g in _chunks(m, workers)] if mode == "pipelined" else [list(range(m))]
        self.cache, self.cache_batches, self.cache_dir = cache, cache_batches, cache_dir
        self._fingerprints: dict[tuple[int, str], str] = {}  # cache disk: (module, precision) -> fingerprint
        self._inflight: dict[int, Any] = {}  # pipelined: one slot per group > 0 (detached input of the group)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------------- pieces
    def module_parameters(self, i: int) -> list[nn.Parameter]:
        """Parameters module ``i``'s optimiser steps: its encoder stage(s) and its head."""
        return self.blocks[i].parameters_of() + list(self.heads[i].parameters())

    def configure_optimizers(self, build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
                             ) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per module (``module0`` ...), from the run's ``optim:`` settings."""
        return {f"module{i}": build([{"params": self.module_parameters(i)}]) for i in range(len(self.blocks))}

    def active_module(self, step: int) -> int:
        """Sequential mode: the module trained at 0-based ``step``."""
        return next((i for i, end in enumerate(self.module_ends) if step < end), len(self.blocks) - 1)

    def _patches(self, batch: dict) -> tuple[torch.Tensor, tuple[int, int]]:
        """The patch batch ``(n g, 3, p, p)`` in channels-last memory (:func:`~vidssl.models.cpc.trunk_input`)."""
        x, grid = patchify(frames_as_images(batch), patch=self.patch, stride=self.patch_stride)  # (n g) 3 p p
        return trunk_input(x), grid

    def module_loss(self, i: int, x: torch.Tensor, grid: tuple[int, int], generator: torch.Generator | None):
        """Module ``i`` on ``x`` (already detached): ``(its per-patch maps, loss, logs)``."""
        out = self.blocks[i](x)  # (n g) C h w
        codes = patch_grid(out, grid)  # n C gh gw
        loss, logs = self.heads[i](codes, generator)
        return out, loss, {**logs, **code_stats(codes)}

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        """Every module, isolated (evaluation, joint-mode semantics): ``(summed loss, logs)``."""
        x, grid = self._patches(batch)
        total, logs = None, {}
        for i in range(len(self.blocks)):
            x, loss, lg = self.module_loss(i, x.detach(), grid, generator)
            total = loss if total is None else total + loss
            logs.update({f"m{i}/{k}": v for k, v in lg.items()})
            logs[f"m{i}/loss"] = float(loss.detach())
        logs["loss"] = float(total.detach())
        return total, logs

    def features(self, batch: dict) -> list[torch.Tensor]:
        """Per-module pooled codes ``[(B T, C_m)]`` of whole frames (per-module probes)."""
        x = frames_as_images(batch)  # n 3 H W
        out = []
        for blk in self.blocks:
            x = blk(x)  # n C h w
            out.append(x.mean(dim=(-2, -1)))  # n C
        return out

    # -------------------------------------------------------------------- the step
    def _step_module(self, i: int, x: torch.Tensor, grid, ctx: StepContext, generator, *, backward: bool = True):
        name = f"module{i}"
        opt, scaler = ctx.optimizers[name], ctx.scalers.get(name)
        if backward:
            opt.zero_grad(set_to_none=True)  # before the forward: last step's gradients are not alive through it
        with ctx.autocast():
            out, loss, logs = self.module_loss(i, x, grid, generator)
        if backward:
            self._backward_step(loss, scaler, i, ctx)
        return out.detach(), loss, logs

    def _backward_step(self, loss, scaler, i: int, ctx: StepContext) -> None:
        """Backward of module ``i``'s loss into gradients its optimiser has set to ``None`` before the forward."""
        (loss if scaler is None else scaler.scale(loss)).backward()
        self._optimiser_step(i, ctx)

    def _optimiser_step(self, i: int, ctx: StepContext) -> None:
        """Average module ``i``'s gradients over DDP ranks, then step its optimiser (through its scaler in fp16)."""
        opt, scaler = ctx.optimizers[f"module{i}"], ctx.scalers.get(f"module{i}")
        ctx.all_reduce_gradients(self.module_parameters(i))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        """One step of the configured mode (see the module docstring); logs ``loss`` and ``m<i>/...``."""
        if self.mode == "sequential":
            return self._sequential(batch, ctx)
        if self.mode == "pipelined":
            return self._pipelined(batch, ctx)
        return self._joint(batch, ctx)

    def _joint(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        x, grid = self._patches(batch)
        losses, logs = [], {}
        names = [f"module{i}" for i in range(len(self.blocks))]
        if self.backward == "summed":
            for n in names:  # before the forward, as in every mode: last step's gradients are not kept through it
                ctx.optimizers[n].zero_grad(set_to_none=True)
        for i in range(len(self.blocks)):
            x, loss, lg = self._step_module(i, x, grid, ctx, ctx.generator, backward=self.backward == "per_module")
            losses.append(loss)
            logs.update({f"m{i}/{k}": v for k, v in lg.items()})
        if self.backward == "summed":  # PR #18: one backward; the detach keeps the gradient supports disjoint
            scaled = [loss if ctx.scalers.get(n) is None else ctx.scalers[n].scale(loss)  # each by its own scaler
                      for n, loss in zip(names, losses)]
            sum(scaled).backward()
            for i in range(len(names)):
                self._optimiser_step(i, ctx)
        logs["loss"] = float(sum(float(v.detach()) for v in losses))
        return logs

    def _frozen(self, modules: range, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``x`` through the frozen ``modules``: eval mode, no graph kept, each map freed once the next block read it."""
        with torch.no_grad(), ctx.autocast():
            for i in modules:
                self.blocks[i].set_mode(False)
                for f in self.blocks[i].steps():
                    x = f(x)  # (n g) C h w
        return x

    def _sequential(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        active = self.active_module(ctx.step)
        name = f"module{active}"
        ctx.optimizers[name].zero_grad(set_to_none=True)  # last step's gradients are not kept through the forward
        cached = None
        if self.cache == "disk" and active > 0:
            x, grid, cached = self._cached_input(active, batch, ctx)
        else:
            x, grid = self._patches(batch)
            x = self._frozen(range(active), x, ctx)
        self.blocks[active].set_mode(True)
        with ctx.autocast():
            for f in self.blocks[active].steps():  # only the loop variable holds a block's input (see steps())
                x = f(x)  # (n g) C h w
            codes = patch_grid(x, grid)  # n C gh gw
            del x  # the maps: only their pooled codes are used (the per-patch maps alive in backward cost 1 map)
            loss, lg = self.heads[active](codes, ctx.generator)
        lg.update(code_stats(codes))
        del codes
        self._backward_step(loss, ctx.scalers.get(name), active, ctx)
        logs = {f"m{active}/{k}": v for k, v in lg.items()}
        logs.update(loss=float(loss.detach()), active_module=float(active))
        if cached is not None:
            logs["cache_hit"] = float(cached)
        return logs

    # -------------------------------------------------------------------- the disk cache (sequential)
    def on_train_end(self, work_dir: Path | None) -> None:
        """``cache: disk``: remove this rank's cache files (and temporary files a killed write left), then the
        folders if no other rank's files remain."""
        if self.cache != "disk" or not (self.cache_dir or work_dir is not None):
            return
        rank = self._cache_rank()
        for m in range(1, len(self.blocks)):
            folder = self._cache_folder(m, work_dir)
            for f in [*folder.glob(f"{rank}_*.safetensors"), *folder.glob(f".{rank}_*.tmp")]:
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # absent, or another rank's files are still there
                folder.rmdir()
        with contextlib.suppress(OSError):
            self._cache_folder(1, work_dir).parent.rmdir()

    def _cache_folder(self, m: int, work_dir: Path | None) -> Path:
        if self.cache_dir:
            root = Path(self.cache_dir)
        elif work_dir is not None:
            root = Path(work_dir) / "gim_cache"
        else:
            raise RuntimeError("gim cache: disk needs a folder: set cache_dir (library use without a run folder)")
        return root / f"module{m}"

    @staticmethod
    def _cache_rank() -> str:
        return f"rank{dist.get_rank() if dist.is_available() and dist.is_initialized() else 0}"

    def _fingerprint(self, m: int, precision: str) -> str:
        """Hash of what module ``m``'s cached input was made with: the weights of modules ``0 .. m-1`` (frozen in m's
        phase), the patch grid and the autocast ``precision``."""
        if (m, precision) not in self._fingerprints:
            h = hashlib.sha256(f"{m} {self.patch} {self.patch_stride} {precision}".encode())
            for i in range(m):
                for part in self.blocks[i].parts():
                    for t in list(part.parameters()) + list(part.buffers()):
                        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprints[(m, precision)] = h.hexdigest()  # modules 0 .. m-1 no longer change in m's phase
        return self._fingerprints[(m, precision)]

    def _read_cache(self, path: Path, fingerprint: str, device: torch.device):
        """``(x, grid)`` from a cache file with this ``fingerprint``, else ``None``."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fingerprint:
                    return None
                x = f.get_tensor("x")
            grid = tuple(int(v) for v in meta["grid"].split(","))
        except Exception:  # a file that does not read (e.g. written on a full disk) is remade, not trusted
            return None
        return x.contiguous(memory_format=torch.channels_last).to(device), grid  # (n g) C h w

    def _cached_input(self, m: int, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, tuple[int, int], bool]:
        """Module ``m``'s input at this step from the disk cache: ``(x, grid, hit)``."""
        k = (ctx.step - self.module_ends[m - 1]) % self.cache_batches
        rank = self._cache_rank()
        path = self._cache_folder(m, ctx.work_dir) / f"{rank}_{k:06d}.safetensors"
        device = next(self.heads[m].parameters()).device
        with ctx.autocast():
            precision = str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else "off"
        hit = self._read_cache(path, self._fingerprint(m, precision), device)
        if hit is not None:
            return *hit, True
        prev = None
        if m > 1:
            prev_path = self._cache_folder(m - 1, ctx.work_dir) / f"{rank}_{k:06d}.safetensors"
            prev = self._read_cache(prev_path, self._fingerprint(m - 1, precision), device)
        if prev is not None:  # module m-1's cached input: one frozen pass of module m-1
            x, grid = prev
            x = self._frozen(range(m - 1, m), x, ctx)
        else:  # the stream's batch through every frozen module
            x, grid = self._patches(batch)
            x = self._frozen(range(m), x, ctx)
        with atomic_path(path) as tmp:
            save_file({"x": x.detach().cpu().contiguous()}, str(tmp),
                      metadata={"fingerprint": self._fingerprint(m, precision), "grid": f"{grid[0]},{grid[1]}",
                                "step": str(ctx.step)})
        return x, grid, False

    def _pipelined(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("mode: pipelined runs its worker threads in one process; under DDP their gradient "
                               "all-reduces would interleave -- use mode joint or sequential with DDP")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=len(self.groups), thread_name_prefix="gim")
        x, grid = self._patches(batch)
        inputs = {0: (x, grid), **{g: self._inflight.pop(g) for g in list(self._inflight)}}
        dev = ctx.generator.device if ctx.generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2 ** 62, (len(self.blocks),), generator=ctx.generator, device=dev).tolist()

        def run(g: int, item: tuple[torch.Tensor, tuple[int, int]]):
            x, grid = item
            logs = {}
            for i in self.groups[g]:
                gen = torch.Generator(device=dev)
                gen.manual_seed(int(seeds[i]))
                x, loss, lg = self._step_module(i, x, grid, ctx, gen)
                logs.update({f"m{i}/{k}": v for k, v in lg.items()})
            return (x, grid), logs

        futures = {g: self._pool.submit(run, g, inp) for g, inp in inputs.items()}
        logs: dict[str, float] = {}
        for g, fut in futures.items():
            out, lg = fut.result()
            logs.update(lg)
            if g + 1 < len(self.groups):
                self._inflight[g + 1] = out  # the bounded queue: one slot, filled once per step
        logs["loss"] = float(sum(v for k, v in logs.items() if k.endswith("/loss")))
        logs["groups_run"] = float(len(futures))
        return logs

    def __getstate__(self):  # the thread pool and lock do not pickle (deepcopy of the model)
        state = self.__dict__.copy()
        state["_pool"], state["_lock"] = None, None
        return state


@torch.no_grad()
def code_stats(codes: torch.Tensor) -> dict[str, float]:
    """Collapse monitors of a code grid ``(B, C, R, W)``: ``code_norm`` (mean L2 norm of a code) and ``code_cos``
    (mean cosine similarity between two different codes of the batch; 1.0 = every code points the same way, so
    cosine scores cannot tell candidates apart and the loss sits at log N with no gradient)."""
    v = codes.detach().float().permute(0, 2, 3, 1).reshape(-1, codes.shape[1])  # M C
    m = v.shape[0]
    s = torch.nn.functional.normalize(v, dim=1).sum(0)  # C
    cos = (float(s @ s) - m) / (m * (m - 1)) if m > 1 else 1.0
    return {"code_norm": float(v.norm(dim=1).mean()), "code_cos": cos}


def _chunks(m: int, workers: int) -> list[range]:
    """``m`` modules as ``workers`` contiguous groups, sizes differing by at most one."""
    sizes = [m // workers + (i < m % workers) for i in range(workers)]
    starts = [sum(sizes[:i]) for i in range(workers)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]
