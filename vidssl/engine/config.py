"""The run configuration: one dataclass per section of a recipe YAML.

``RunConfig`` is what ``vidssl pretrain --config X.yaml --set a.b=c`` resolves; :func:`resolve_run_config` does the
layering (dataclass defaults <- YAML <- ``--set``) and the checks. Objective parameters are checked against the
objective's own dataclass from the registry (:mod:`vidssl.engine.objectives`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vidssl.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from vidssl.data.config import DataConfig


@dataclass
class ModelConfig:
    """The shared frame encoder."""

    #: torchvision ResNets (stride 8 with ``stride8``), or ``mast_resnet18``: the CorrFlow/MAST stride-4 ResNet-18
    #: (vidssl/models/mast_encoder.py; ``out_layer``/``eval_layer``/``stride8`` do not apply, its features are the
    #: 64-d ``head`` output)
    encoder: Literal["resnet18", "resnet34", "resnet50", "mast_resnet18"] = "resnet18"
    out_layer: Literal["layer1", "layer2", "layer3", "layer4"] = "layer4"  #: last stage used in training
    eval_layer: Literal["layer1", "layer2", "layer3", "layer4"] = "layer3"  #: stage used for label propagation
    stride8: bool = True  #: layer3/layer4 stride 1 (output stride 8)
    padding_mode: Literal["zeros", "reflect"] = "reflect"
    norm: Literal["batch", "group"] = "batch"  #: group norm makes CPU DDP exactly equal to one process
    sync_bn: bool = True  #: convert BatchNorm to SyncBatchNorm under DDP on GPU

    def validate(self, prefix: str = "model") -> None:
        order = ["layer1", "layer2", "layer3", "layer4"]
        if order.index(self.eval_layer) > order.index(self.out_layer):
            raise ConfigError(f"{prefix}.eval_layer: {self.eval_layer!r} comes after out_layer {self.out_layer!r}")


@dataclass
class ObjectiveSpec:
    """One objective: registry name, loss weight, and its own parameters (checked by the objective's dataclass)."""

    name: str = "crw"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  #: sgd only
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)  #: multistep: steps at which lr is multiplied by gamma
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  #: cosine: final lr as a fraction of lr
    grad_clip: float = 0.0  #: max global grad norm; 0 disables


@dataclass
class TrainConfig:
    steps: int = 100  #: optimisation steps in the run
    batch_size: int = 8  #: global batch (split over processes under DDP)
    seed: int = 0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  #: auto: bf16 autocast on CUDA, off on CPU
    log_every: int = 10
    ckpt_every: int = 100  #: steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  #: torch intra-op threads on CPU (0 = torch default)

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """Label propagation run at the end of training (the demo's J&F table)."""

    enabled: bool = False
    davis_root: str = ""  #: empty with data.source=synthetic: the synthetic val split
    year: Literal["2016", "2017"] = "2017"
    split: str = "val"
    preset: str = "crw"
    baselines: list[str] = field(default_factory=lambda: ["identity", "random"])  #: also scored for comparison
    overrides: list[str] = field(default_factory=list)  #: propagate.<key>=value settings


@dataclass
class RunConfig:
    """A whole recipe."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, prefix: str = "") -> None:
        if not self.objectives:
            raise ConfigError("objectives: at least one objective is needed")


def _normalise_objectives(data: dict[str, Any]) -> dict[str, Any]:
    """Accept ``{name: crw, weight: 1, temperature: 0.05}`` (flat) as well as ``{..., params: {...}}``."""
    objs = data.get("objectives")
    if objs is None:
        return data
    if not isinstance(objs, list):
        raise ConfigError(f"objectives: expected a list of {{name, weight, ...}} mappings, got {objs!r}")
    out = []
    for i, o in enumerate(objs):
        if isinstance(o, str):
            o = {"name": o}
        if not isinstance(o, dict):
            raise ConfigError(f"objectives.{i}: expected a mapping with a name, got {o!r}")
        o = dict(o)
        params = dict(o.pop("params", {}) or {})
        for k in list(o):
            if k not in ("name", "weight"):
                params[k] = o.pop(k)
        o["params"] = params
        out.append(o)
    return {**data, "objectives": out}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mapping ``b`` onto ``a`` (sections merge, lists and values replace)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_run_config(config_path: str | Path | None = None, overrides: list[str] | None = None,
                       base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``--set`` overrides, fully checked (objective parameters included)."""
    from vidssl.engine.objectives import check_objective_params

    data: dict[str, Any] = _merge(to_dict(RunConfig()), dict(base or {}))
    if config_path:
        data = _merge(data, load_yaml(config_path))
    data = _normalise_objectives(data)
    data = apply_overrides(data, list(overrides or []))
    data = _normalise_objectives(data)
    cfg = from_dict(RunConfig, data)
    for i, spec in enumerate(cfg.objectives):
        spec.params = check_objective_params(spec.name, spec.params, prefix=f"objectives.{i}")
    return cfg


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its resolved dict (as stored in checkpoints)."""
    return resolve_run_config(base=data)


__all__ = ["EvalConfig", "ModelConfig", "ObjectiveSpec", "OptimConfig", "RunConfig", "TrainConfig",
           "resolve_run_config", "run_config_from_dict", "to_dict"]
