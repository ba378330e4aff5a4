"""The objective contract: what a training method is to the engine. Read this first to add a method.

A method (CRW, CorrFlow, MAST, TimeCycle, or yours) is one :class:`Objective` subclass: an ``nn.Module`` over a
shared frame encoder whose ``forward(batch, generator=None)`` returns ``(loss, logs)``. It tells the engine four
things through class attributes and class methods, and nothing else in vidssl has to change:

1. ``Params``: a dataclass of the method's hyperparameters (the paper's names, a comment line each, ``validate``
   raising :class:`~vidssl.config.ConfigError` naming the key). A recipe's ``objectives: [{name: ..., key: value}]``
   is checked against it.
2. ``data_needs(params, data)`` -> :class:`DataNeeds`: the streams it reads, the clip length its ``forward`` reads
   (computed from its own parameters), the sampler it requires and the number of shots. The engine checks the run's
   data sections against it before anything is built and names the key to change.
3. ``from_params(encoder, params, ctx)`` builds it; ``ctx`` is a :class:`BuildContext` (total steps, the global
   batch size, the data sections, the device), so nothing like ``schedule_steps = train.steps`` has to be repeated in a recipe.
4. Optionally:

   - ``param_groups()``: parameter groups with their own lr scale and weight decay (default: none declared, every
     parameter in one group with ``optim.lr`` / ``optim.weight_decay``; ``optim.param_groups`` in a recipe
     adds groups by parameter-name pattern).
   - ``configure_optimizers(build)`` and ``training_step(batches, ctx)``: run your own backward passes and
     optimisers (Greedy InfoMax's per-module optimisers). The default is the engine's: the weighted sum of every
     objective's loss, one backward, one optimiser. Every optimiser and gradient scaler you return is checkpointed
     and restored by name.

Batches: ``forward`` gets the batch of its first stream (``"main"`` = the recipe's ``data:`` section), a dict with
``"video"`` ``(B, T, 3, H, W)`` and every key the dataset yields (collated); other streams it declares arrive in the
same dict under ``batch["streams"][name]`` (absent on steps where a stream with ``weight < 1`` is not drawn).

Register a method with :func:`vidssl.engine.register_objective` (from a module named by ``--plugin``, or an entry
point in the ``vidssl.objectives`` group); the built-in table is :mod:`vidssl.engine.methods`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
import torch.nn as nn


@dataclass(frozen=True)
class DataNeeds:
    """What an objective reads from the data (checked against the run's data sections before training).

    Attributes:
        streams: stream names it reads, first one delivered as ``batch`` (``"main"`` is the ``data:`` section).
        clip_len: frames per clip that ``forward`` reads (a minimum: longer clips are accepted).
        sampler: the clip sampler it requires (``"shots"``, ``"pair"`` ...), or ``None`` for any.
        num_shots: shots per item (``sampler: shots``).
        colour: the colour space its encoder is trained on (``"rgb"`` or ``"lab"``; propagation feeds the same).
    """

    streams: tuple[str, ...] = ("main",)
    clip_len: int = 1
    sampler: str | None = None
    num_shots: int = 1
    colour: str = "rgb"


@dataclass(frozen=True)
class BuildContext:
    """What a builder may know about the run: its length, its data and where it runs."""

    total_steps: int = 1  #: optimisation steps of the whole run (``train.steps``)
    batch_size: int = 0  #: global batch of the main stream (``train.batch_size``; 0: not known, e.g. library use)
    data: Any = None  #: the main stream's ``DataConfig``
    streams: Mapping[str, Any] = field(default_factory=dict)  #: every stream's ``DataConfig`` by name, main included
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefix: str = ""  #: this objective's config path for error messages (``objectives.0``; empty in library use)


@dataclass
class StepContext:
    """What a custom ``training_step`` gets from the engine for one step.

    Attributes:
        step: 0-based step index; ``lr``: the scheduled base lr (already applied to every optimiser's groups).
        optimizers / scalers: the objective's own, by name (scalers: ``None`` unless ``train.amp: fp16``).
        autocast: context manager factory for the run's mixed precision (a no-op on the CPU).
        generator: the objective's seeded random generator (checkpointed).
        all_reduce_gradients: averages ``.grad`` of the given parameters over DDP ranks (no-op in one process); call
            it between backward and ``step`` when not wrapped in DDP.
        work_dir: the run folder, where an objective may keep files of its own (a cache); ``None`` when the caller
            has none (library use).
    """

    step: int
    lr: float
    optimizers: dict[str, torch.optim.Optimizer]
    scalers: dict[str, Any]
    autocast: Callable[[], contextlib.AbstractContextManager]
    generator: torch.Generator | None
    all_reduce_gradients: Callable[[Iterator[nn.Parameter]], None]
    work_dir: Path | None = None


class Objective(nn.Module):
    """Base class of every training method (see the module docstring for the whole contract)."""

    #: the hyperparameter dataclass (``objectives: [{name, weight, <its keys>}]`` in a recipe)
    Params: ClassVar[type] = type(None)

    @classmethod
    def data_needs(cls, params: Any, data: Any = None) -> DataNeeds:
        """What ``forward`` reads, from the objective's own parameters (``data``: the main ``DataConfig``)."""
        return DataNeeds()

    @classmethod
    def from_params(cls, encoder: nn.Module, params: Any, ctx: BuildContext) -> "Objective":
        """Build from the shared encoder, the checked parameter dataclass and the run context."""
        raise TypeError(f"{cls.__name__}.from_params is not defined: every Objective subclass builds itself")

    def param_groups(self) -> list[dict[str, Any]]:
        """Extra parameter groups: ``[{"name", "params", "lr_scale", "weight_decay"}]`` (default: none)."""
        return []

    #: True when the objective runs its own backward and optimisers (``training_step``)
    custom_step: ClassVar[bool] = False

    def configure_optimizers(self, build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
                             ) -> dict[str, torch.optim.Optimizer]:
        """Custom-step objectives: ``{name: optimizer}``; ``build(groups)`` makes one from ``optim:`` settings."""
        return {"main": build([{"params": [p for p in self.parameters() if p.requires_grad]}])}

    def on_train_end(self, work_dir: Path | None) -> None:
        """Called on every rank once the run's final checkpoint is written (default: nothing); an objective removes
        files it kept for a resume here (``work_dir``: the run folder, as in :class:`StepContext`)."""

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        """Custom-step objectives: forward, backward and step the optimisers; return logs with a ``"loss"``."""
        raise TypeError(f"{type(self).__name__}: custom_step is True but training_step is not defined")


__all__ = ["BuildContext", "DataNeeds", "Objective", "StepContext"]
