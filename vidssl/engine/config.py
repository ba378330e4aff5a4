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
from vidssl.data.config import DataConfig, StreamConfig
from vidssl.models.encoders import ModelConfig


@dataclass
class ObjectiveSpec:
    """One objective: registry name, loss weight, and its own parameters (checked by the objective's dataclass)."""

    name: str = "crw"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches ``pattern`` (fnmatch, e.g. ``objectives.*.head.*`` or ``*.bias``) get their
    own lr and weight decay; the first matching group wins, unmatched parameters use ``optim.lr``/``weight_decay``."""

    pattern: str = "*"
    lr: float | None = None  #: null: optim.lr (the schedule scales every group alike)
    weight_decay: float | None = None  #: null: optim.weight_decay


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
    param_groups: list[ParamGroupConfig] = field(default_factory=list)  #: per-pattern lr / weight decay


@dataclass
class TrainConfig:
    steps: int = 100  #: optimisation steps in the run
    batch_size: int = 8  #: global batch (split over processes under DDP)
    seed: int = 0
    #: autocast: auto = bf16 on CUDA, off on the CPU; bf16 = bf16 on CUDA and on the CPU; fp16 = CUDA only (with a
    #: GradScaler; off on the CPU); native = bf16 where the hardware computes it natively (CUDA, or a CPU with AMX or
    #: AVX512-BF16: 3-5x faster convolutions there), off on other CPUs
    amp: Literal["auto", "off", "bf16", "fp16", "native"] = "auto"
    channels_last: bool = False  #: keep the model in channels-last memory format (faster convolutions on the CPU)
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
class ProbeMonitorConfig:
    """``vidssl probe`` on the live encoder during training (:class:`vidssl.evaluation.probe.ProbeMonitor`): every
    ``every`` steps and at the last step, the encoder's frozen features of labelled frame folders are scored and the
    headline metrics logged as ``probe/<metric>`` (e.g. ``probe/knn.k=20.top1``). The input is read the way
    ``vidssl probe --frames`` reads it; colour space and normalisation are the run's (``model.colour``, ``data.mean``
    / ``data.std``). Training is bit-identical with and without it."""

    enabled: bool = False  #: run the probe during training
    every: int = 100  #: steps between probes (a probe also runs at the last step)
    frames: str = ""  #: root of the labelled frame folders, root/<sequence>/<frames> (each sequence is one class)
    sequences: list[str] = field(default_factory=list)  #: sequences used (empty: every folder under frames)
    #: held-out sequences: the split is by video (train on sequences, test on these; arrow of time only); empty: each
    #: sequence's frames are split by time (first half train, rest test)
    test_sequences: list[str] = field(default_factory=list)
    clip_len: int = 8  #: frames per clip
    stride: int = 1  #: frame step inside a clip
    clips_per_video: int = 8  #: clips per sequence and split (starts spread uniformly)
    size: int = 224  #: frames resized (short side) and centre-cropped to size x size
    layer: Literal["layer1", "layer2", "layer3", "layer4"] | None = None  #: ResNet stage read (null: model.eval_layer)
    #: protocols scored (empty: every one that applies; with test_sequences only arrow applies)
    protocols: list[Literal["linear", "knn", "retrieval", "arrow"]] = field(default_factory=list)
    batch_size: int = 32  #: frames per encoder call
    #: keep the decoded, resized frames in memory between probes (frames x 3 x size^2 x 4 bytes); false: read again
    cache: bool = True

    def validate(self, prefix: str = "monitor.probe") -> None:
        for name, lo in (("every", 1), ("clip_len", 1), ("stride", 1), ("clips_per_video", 1), ("size", 8),
                         ("batch_size", 1)):
            if getattr(self, name) < lo:
                raise ConfigError(f"{prefix}.{name}: must be >= {lo}, got {getattr(self, name)}")
        if self.enabled and not self.frames:
            raise ConfigError(f"{prefix}.frames: the probe monitor needs labelled frame folders (root/<sequence>/"
                              "<frames>); set it or monitor.probe.enabled=false")
        if self.test_sequences and set(self.protocols) - {"arrow"}:
            raise ConfigError(f"{prefix}.protocols: {sorted(set(self.protocols) - {'arrow'})} need train and test "
                              "items of the same classes; with test_sequences (a split by video) only arrow applies")


@dataclass
class MonitorConfig:
    """Evaluations run on the live encoder during training; their scalars go into ``log.jsonl``."""

    probe: ProbeMonitorConfig = field(default_factory=ProbeMonitorConfig)


@dataclass
class RunConfig:
    """A whole recipe."""

    name: str = "run"
    plugins: list[str] = field(default_factory=list)  #: modules imported first (they register objectives/encoders)
    data: DataConfig = field(default_factory=DataConfig)  #: the main stream ("main")
    streams: dict[str, StreamConfig] = field(default_factory=dict)  #: further named streams
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  #: evaluations during training

    def validate(self, prefix: str = "") -> None:
        if not self.objectives:
            raise ConfigError("objectives: at least one objective is needed")
        if "main" in self.streams:
            raise ConfigError("streams.main: 'main' is the data: section; give further streams other names")
        layer, stages = self.monitor.probe.layer, ["layer1", "layer2", "layer3", "layer4"]
        if layer is not None and self.model.out_layer in stages and stages.index(layer) > stages.index(
                self.model.out_layer):
            raise ConfigError(f"monitor.probe.layer: {layer!r} comes after model.out_layer {self.model.out_layer!r} "
                              "(later stages are not built)")

    def stream_configs(self) -> dict[str, DataConfig]:
        """Every stream's data config by name, ``main`` (the ``data:`` section) first."""
        return {"main": self.data, **{k: s.data for k, s in self.streams.items()}}

    def stream_batch_size(self, name: str) -> int:
        """Global batch size of stream ``name``."""
        if name == "main":
            return self.train.batch_size
        return self.streams[name].batch_size or self.train.batch_size


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
                       base: dict[str, Any] | None = None, plugins: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``--set`` overrides, fully checked (plugins imported, objective parameters and what
    each objective reads from the data included). ``plugins`` (``--plugin``) are added to the recipe's."""
    from vidssl.engine.objectives import check_objective_params, load_plugins

    data: dict[str, Any] = _merge(to_dict(RunConfig()), dict(base or {}))
    if config_path:
        data = _merge(data, load_yaml(config_path))
    data = _normalise_objectives(data)
    data = apply_overrides(data, list(overrides or []))
    data = _normalise_objectives(data)
    if plugins:
        data["plugins"] = list(dict.fromkeys(list(data.get("plugins") or []) + list(plugins)))
    load_plugins(data.get("plugins") or [])
    cfg = from_dict(RunConfig, data)
    for i, spec in enumerate(cfg.objectives):
        spec.params = check_objective_params(spec.name, spec.params, prefix=f"objectives.{i}")
    check_data_needs(cfg)
    return cfg


def check_data_needs(cfg: RunConfig) -> None:
    """Check every objective's :class:`~vidssl.models.objective.DataNeeds` against the run's streams (errors name
    the key to change) and resolve ``model.colour: auto`` to the objectives' colour space."""
    from vidssl.engine.objectives import objective_needs

    streams = cfg.stream_configs()
    colours = set()
    for i, spec in enumerate(cfg.objectives):
        needs = objective_needs(spec.name, spec.params, cfg.data, prefix=f"objectives.{i}")
        colours.add(needs.colour)
        for name in needs.streams:
            if name not in streams:
                raise ConfigError(f"streams.{name}: objective {spec.name!r} (objectives.{i}) reads stream {name!r}; "
                                  f"the run defines {', '.join(streams)}")
        name = needs.streams[0]
        key = "data" if name == "main" else f"streams.{name}.data"
        d = streams[name]
        if d.clip_len < needs.clip_len:
            raise ConfigError(f"{key}.clip_len: {d.clip_len} is too short for objective {spec.name!r} "
                              f"(objectives.{i}), which reads {needs.clip_len} frames per clip")
        if needs.sampler is not None and d.sampler != needs.sampler:
            raise ConfigError(f"{key}.sampler: objective {spec.name!r} (objectives.{i}) needs sampler "
                              f"{needs.sampler!r}, got {d.sampler!r}")
        if d.sampler == "shots" and d.num_shots < needs.num_shots:
            raise ConfigError(f"{key}.num_shots: objective {spec.name!r} (objectives.{i}) needs "
                              f"{needs.num_shots} shots per item, got {d.num_shots}")
    if cfg.model.colour == "auto":
        if len(colours) > 1:
            raise ConfigError(f"model.colour: the objectives train the encoder on different colour spaces "
                              f"({sorted(colours)}); they cannot share one encoder")
        cfg.model.colour = colours.pop()


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its resolved dict (as stored in checkpoints)."""
    return resolve_run_config(base=data)


__all__ = ["EvalConfig", "ModelConfig", "MonitorConfig", "ObjectiveSpec", "OptimConfig", "ParamGroupConfig",
           "ProbeMonitorConfig", "RunConfig", "StreamConfig", "TrainConfig", "check_data_needs", "resolve_run_config", "run_config_from_dict", "to_dict"]
