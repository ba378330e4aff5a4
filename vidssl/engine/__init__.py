"""Training engine: run config, objectives registry, the loop, DDP, checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from vidssl.engine.checkpoint import latest_checkpoint, load_weights_into, read_weights, save_checkpoint
from vidssl.engine.config import RunConfig, resolve_run_config, run_config_from_dict
from vidssl.engine.objectives import MultiObjective, ObjectiveEntry, objective_names, register_objective
from vidssl.engine.trainer import build_training_model, train


def model_from_checkpoint(path: str | Path) -> tuple[MultiObjective, RunConfig, int]:
    """Rebuild the trained model from a checkpoint file alone: ``(model in eval mode, run config, step)``."""
    weights, config, step = read_weights(path)
    cfg = run_config_from_dict(config)
    model = build_training_model(cfg)
    load_weights_into(model, weights)
    return model.eval(), cfg, step


def encoder_from_checkpoint(path: str | Path) -> tuple[nn.Module, RunConfig]:
    """The trained shared encoder of a checkpoint (eval mode) and the run config it was trained with."""
    model, cfg, _ = model_from_checkpoint(path)
    return model.encoder, cfg


__all__ = [
    "MultiObjective",
    "ObjectiveEntry",
    "RunConfig",
    "build_training_model",
    "encoder_from_checkpoint",
    "latest_checkpoint",
    "model_from_checkpoint",
    "objective_names",
    "read_weights",
    "register_objective",
    "resolve_run_config",
    "run_config_from_dict",
    "save_checkpoint",
    "train",
]
