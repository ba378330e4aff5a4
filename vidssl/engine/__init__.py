"""Training engine: run config, objectives registry, the loop, DDP, checkpoints.

The contract a method implements is :mod:`vidssl.models.objective`; the table of built-in methods is
:mod:`vidssl.engine.methods`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from vidssl.config import ConfigError, from_dict
from vidssl.engine.checkpoint import (latest_checkpoint, load_weights_into, read_weights, resolve_checkpoint,
                                      save_checkpoint)
from vidssl.engine.config import RunConfig, resolve_run_config, run_config_from_dict
from vidssl.engine.objectives import (MultiObjective, load_plugins, objective_class, objective_names,
                                      register_objective)
from vidssl.engine.trainer import Monitor, build_training_model, train
from vidssl.models.encoders import ModelConfig, build_model_encoder, encoder_names, register_encoder
from vidssl.models.objective import BuildContext, DataNeeds, Objective, StepContext

#: colour space of the encoder of checkpoints written before ``model.colour`` existed, by objective name
_LEGACY_COLOUR = {"mast": "lab"}


def model_from_checkpoint(path: str | Path) -> tuple[MultiObjective, RunConfig, int]:
    """Rebuild the whole trained model (encoder and every objective head) from a checkpoint file alone:
    ``(model in eval mode, run config, step)``. Needs every objective of the run registered (its ``plugins``
    are imported); evaluation needs only :func:`encoder_from_checkpoint`."""
    weights, config, step = read_weights(path)
    cfg = run_config_from_dict(config)
    model = build_training_model(cfg)
    load_weights_into(model, weights)
    return model.eval(), cfg, step


def model_config_of(config: dict[str, Any], *, where: str = "checkpoint") -> ModelConfig:
    """The ``model`` section of a stored run config, ``colour`` resolved (older checkpoints: from the objective)."""
    if not isinstance(config.get("model"), dict):
        raise ConfigError(f"{where}: the stored config has no 'model' section; not a vidssl run checkpoint")
    model = from_dict(ModelConfig, config["model"], prefix="model")
    if model.colour == "auto":
        names = [o.get("name") for o in config.get("objectives") or [] if isinstance(o, dict)]
        model.colour = next((_LEGACY_COLOUR[n] for n in names if n in _LEGACY_COLOUR), "rgb")
    return model


def encoder_from_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig, dict[str, Any], int]:
    """The trained shared encoder of a checkpoint (eval mode), built from the ``model`` section alone.

    No objective is rebuilt, so a checkpoint of a method registered at run time loads without it (the run's
    ``plugins`` are imported only when its encoder is not a registered one). Returns ``(encoder, model config,
    stored run config dict, step)``.
    """
    ckpt = resolve_checkpoint(path)
    weights, config, step = read_weights(ckpt)
    model_cfg = model_config_of(config, where=str(ckpt))
    if model_cfg.encoder not in encoder_names():  # an encoder from a plugin: the run's plugins register it
        load_plugins(config.get("plugins") or [], where=f"{ckpt}: plugins")
    encoder = build_model_encoder(model_cfg)
    own = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    if not own:
        raise ValueError(f"{ckpt}: no encoder.* tensors in the weights; not a vidssl training checkpoint")
    try:
        encoder.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{ckpt}: the weights do not fit model.encoder={model_cfg.encoder!r} ({exc})") from exc
    return encoder.eval(), model_cfg, config, step


__all__ = [
    "BuildContext",
    "DataNeeds",
    "ModelConfig",
    "Monitor",
    "MultiObjective",
    "Objective",
    "RunConfig",
    "StepContext",
    "build_model_encoder",
    "build_training_model",
    "encoder_from_checkpoint",
    "latest_checkpoint",
    "load_plugins",
    "model_config_of",
    "model_from_checkpoint",
    "objective_class",
    "objective_names",
    "read_weights",
    "register_encoder",
    "register_objective",
    "resolve_run_config",
    "run_config_from_dict",
    "save_checkpoint",
    "train",
]
