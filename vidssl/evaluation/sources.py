"""Where propagation features come from: a vidssl checkpoint, a built-in encoder, a weights file, Lab, identity."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from vidssl.evaluation.features import EncoderFeatures, LabFeatures, build_encoder_features
from vidssl.evaluation.presets import PropagationConfig


def checkpoint_extractor(checkpoint: str | os.PathLike, cfg: PropagationConfig, *, layer: str | None = None
                         ) -> tuple[EncoderFeatures, dict[str, Any], PropagationConfig]:
    """Feature extractor from a vidssl checkpoint (the model rebuilt from the file alone).

    The feature layer is the run's ``model.eval_layer`` unless ``layer`` is given. Returns the extractor, a
    description, and ``cfg`` with the layer actually used (record that one).
    """
    from vidssl.engine import model_from_checkpoint
    from vidssl.engine.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    model, run_cfg, step = model_from_checkpoint(ckpt)
    layer = layer or run_cfg.model.eval_layer
    cfg = dataclasses.replace(cfg, layer=layer)
    ext = EncoderFeatures.from_config(model.encoder, cfg, name=f"{run_cfg.name}@{step}.{layer}")
    return ext, {"source": "checkpoint", "checkpoint": str(ckpt), "step": step, "run": run_cfg.name,
                 "layer": layer}, cfg


def build_extractor(*, checkpoint: str | os.PathLike | None = None, encoder: str | None = None,
                    weights: str | os.PathLike | None = None, seed: int = 0, preset: PropagationConfig,
                    device: str | None = None, layer: str | None = None
                    ) -> tuple[Any, dict[str, Any], PropagationConfig]:
    """The extractor named by the ``vidssl propagate`` options, and a description for metrics.json.

    Exactly one source: ``checkpoint``; ``encoder`` in resnet18/resnet34/resnet50 (random init from ``seed``, or the
    torchvision ``weights`` file), ``lab`` or ``identity``; or ``weights`` alone (read as a torchvision ResNet-18
    state_dict unless ``encoder`` names the architecture). Returns ``(extractor, description, effective config)``.
    """
    cfg = dataclasses.replace(preset, device=device) if device else preset
    if checkpoint is not None:
        if encoder or weights:
            raise ValueError("--checkpoint cannot be combined with --encoder or --weights")
        return checkpoint_extractor(checkpoint, cfg, layer=layer)
    name = encoder or "resnet18"
    if name == "identity":
        return "identity", {"source": "identity"}, cfg
    if name == "lab":
        if weights:
            raise ValueError("--weights needs a ResNet --encoder, not 'lab'")
        return LabFeatures.from_config(cfg), {"source": "lab"}, cfg
    if layer:
        cfg = dataclasses.replace(cfg, layer=layer)
    ext = build_encoder_features(name, seed=seed, weights=weights, cfg=cfg)
    info = {"source": "weights" if weights else "random-init", "encoder": name, "seed": seed}
    if weights:
        info["weights"] = str(Path(weights))
    return ext, info, cfg
