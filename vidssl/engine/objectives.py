"""The objective registry and the module that sums objectives over one shared encoder.

The contract a method fulfils is :mod:`vidssl.models.objective`; the built-in methods are listed in
:mod:`vidssl.engine.methods`. The registry adds methods from outside vidssl: :func:`register_objective` called by a
module named with ``--plugin`` (or a recipe's ``plugins:``), and the ``vidssl.objectives`` entry-point group, read
the first time a name is looked up (never at import).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from vidssl.config import ConfigError, fields_of, from_dict, to_dict
from vidssl.engine.methods import builtin_methods
from vidssl.models.objective import BuildContext, DataNeeds, Objective

ENTRY_POINT_GROUP = "vidssl.objectives"


@dataclass
class ObjectiveRegistry:
    """Objective classes by name; entry points are loaded lazily, once."""

    methods: dict[str, type[Objective]] = field(default_factory=builtin_methods)
    entry_points_loaded: bool = False

    def register(self, name: str, cls: type[Objective], *, replace: bool = False) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_objective({name!r}): expected an Objective subclass, got {cls!r}")
        if name in self.methods and not replace and self.methods[name] is not cls:
            raise ValueError(f"objective {name!r} is already registered ({self.methods[name].__qualname__})")
        self.methods[name] = cls

    def load_entry_points(self) -> None:
        if self.entry_points_loaded:
            return
        self.entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self.methods:
                self.register(ep.name, ep.load())

    def get(self, name: str, prefix: str = "objective") -> type[Objective]:
        if name not in self.methods:
            self.load_entry_points()
        if name not in self.methods:
            raise ConfigError(f"{prefix}.name: unknown objective {name!r}; available: {', '.join(self.names())} "
                              "(methods from other packages: --plugin module.path)")
        return self.methods[name]

    def names(self) -> list[str]:
        return sorted(self.methods)


_REGISTRY = ObjectiveRegistry()


def register_objective(name: str, cls: type[Objective], *, replace: bool = False) -> None:
    """Make objective class ``cls`` available as ``objectives: [{name: <name>}]`` in recipes."""
    _REGISTRY.register(name, cls, replace=replace)


def objective_class(name: str, prefix: str = "objective") -> type[Objective]:
    return _REGISTRY.get(name, prefix)


def objective_names() -> list[str]:
    _REGISTRY.load_entry_points()
    return _REGISTRY.names()


def load_plugins(modules: Iterable[str], *, where: str = "plugins") -> None:
    """Import each plugin module (it registers its objectives or encoders); errors name the module."""
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{where}.{i}: cannot import plugin module {name!r} ({exc}); it must be importable "
                              "(on sys.path or installed)") from exc


def check_objective_params(name: str, params: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
    """Type-check an objective's parameters; returns the full resolved dict (defaults filled in)."""
    return to_dict(from_dict(objective_class(name, prefix).Params, params, prefix=prefix))


def objective_needs(name: str, params: dict[str, Any], data: Any = None, prefix: str = "objective") -> DataNeeds:
    """What objective ``name`` with ``params`` reads from the data."""
    cls = objective_class(name, prefix)
    return cls.data_needs(from_dict(cls.Params, params, prefix=prefix), data)


def _build(cls: type[Objective], encoder: nn.Module, params: Any, ctx: BuildContext) -> Objective:
    """``cls.from_params``; a build-time :class:`ConfigError` that names one of the objective's own keys bare
    (``mode: ...``, raised by a constructor that also serves library use) gets the config path in front
    (``objectives.0.mode: ...``)."""
    try:
        return cls.from_params(encoder, params, ctx)
    except ConfigError as exc:
        head = str(exc).split(":", 1)[0]
        if ctx.prefix and head.split(".", 1)[0] in fields_of(cls.Params):
            raise ConfigError(f"{ctx.prefix}.{exc}") from exc
        raise


class MultiObjective(nn.Module):
    """Weighted sum of objectives sharing one encoder.

    Args:
        encoder: the shared frame encoder (registered first, so its weights are saved under ``encoder.*``).
        specs: ``[(name, weight, params dict)]``.
        ctx: the run context handed to every builder (total steps, data sections, device).
    """

    def __init__(self, encoder: nn.Module, specs: list[tuple[str, float, dict[str, Any]]],
                 ctx: BuildContext | None = None) -> None:
        super().__init__()
        ctx = ctx or BuildContext()
        self.encoder = encoder
        self.objectives = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.needs: dict[str, DataNeeds] = {}
        for i, (name, weight, params) in enumerate(specs):
            cls = objective_class(name, f"objectives.{i}")
            p = from_dict(cls.Params, params, prefix=f"objectives.{i}")
            key = name if name not in self.objectives else f"{name}_{i}"
            self.objectives[key] = _build(cls, encoder, p, dataclasses.replace(ctx, prefix=f"objectives.{i}"))
            self.weights[key] = weight
            self.needs[key] = cls.data_needs(p, ctx.data)
        custom = [k for k, o in self.objectives.items() if o.custom_step]
        if custom and len(self.objectives) > 1:
            raise ConfigError(f"objectives: {custom[0]!r} runs its own training_step and must be the only objective "
                              f"of the run (found {list(self.objectives)})")

    @property
    def custom_step(self) -> Objective | None:
        """The objective that runs its own backward and optimisers, if any (then it is the only one)."""
        only = next(iter(self.objectives.values()))
        return only if only.custom_step else None

    def param_groups(self) -> list[dict[str, Any]]:
        """Groups the objectives declare (prefixed with their key); every other parameter is in the default group."""
        groups = []
        for key, obj in self.objectives.items():
            for g in obj.param_groups():
                groups.append({**g, "name": f"{key}/{g.get('name', 'group')}"})
        return groups

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None):
        """``batch`` (the main stream's, other streams under ``batch["streams"]``) -> ``(total loss, logs)``.

        Objectives whose first stream is not ``main`` get that stream's batch (and ``"streams"``); logs are
        prefixed with the objective's key.
        """
        total = None
        logs: dict[str, float] = {}
        streams = batch.get("streams", {})
        for key, obj in self.objectives.items():
            first = self.needs[key].streams[0]
            if first != "main":
                if first not in streams:  # a stream not drawn this step (weight < 1)
                    continue
                own = {**streams[first], "streams": streams}
            else:
                own = batch
            loss, obj_logs = obj(own, generator=generator)
            w = self.weights[key]
            total = w * loss if total is None else total + w * loss
            logs.update({f"{key}/{k}": v for k, v in obj_logs.items()})
        if total is None:
            raise RuntimeError("no objective had its stream in this batch")
        logs["loss"] = float(total.detach())
        return total, logs


__all__ = ["ENTRY_POINT_GROUP", "MultiObjective", "check_objective_params", "load_plugins", "objective_class",
           "objective_names", "objective_needs", "register_objective"]
