"""Where propagation features come from: a vidssl checkpoint, a built-in encoder, a weights file, Lab, identity."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from vidssl.evaluation.features import EncoderFeatures, LabFeatures, WindowFeatures, build_encoder_features
from vidssl.evaluation.presets import PropagationConfig
from vidssl.models.encoders import ModelConfig

def _stride4_extractor(encoder: Any, cfg: PropagationConfig, *, colour: str, name: str | None = None
                       ) -> WindowFeatures | EncoderFeatures:
    """The CorrFlow/MAST encoder's ``head`` features (a truncated trunk's last stage): under the window presets
    (mast, corrflow) their own reader; under the common top-k presets (crw, dino) the same features at stride 4, fed
    the colour space it was trained on, so every learner is compared under one protocol."""
    window = cfg.window
    if window is None:
        return EncoderFeatures.from_config(encoder, cfg, name=name, layer=encoder.layers[-1], colour=colour)
    return WindowFeatures(encoder, colour=colour, crop_multiple=window.crop_multiple, short_side=window.short_side,
                          device=cfg.device, name=name)


def checkpoint_extractor(checkpoint: str | os.PathLike, cfg: PropagationConfig, *, layer: str | None = None
                         ) -> tuple[EncoderFeatures, dict[str, Any], PropagationConfig]:
    """Feature extractor from a vidssl checkpoint: the encoder rebuilt from the checkpoint's ``model`` section alone
    (no objective is rebuilt, so any method's checkpoint works).

    The feature layer is the run's ``model.eval_layer`` unless ``layer`` is given. Returns the extractor, a
    description, and ``cfg`` with the layer actually used (record that one).
    """
    from vidssl.engine import encoder_from_checkpoint
    from vidssl.engine.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    encoder, model_cfg, config, step = encoder_from_checkpoint(ckpt)
    run = config.get("name", "run")
    ext, used, cfg = model_extractor(encoder, model_cfg, cfg, name=f"{run}@{step}", layer=layer)
    info = {"source": "checkpoint", "checkpoint": str(ckpt), "step": step, "run": run, "layer": used}
    if model_cfg.encoder == "mast_resnet18":
        info["colour"] = model_cfg.colour
    return ext, info, cfg


def model_extractor(encoder: Any, model: ModelConfig, cfg: PropagationConfig, *, name: str, layer: str | None = None
                    ) -> tuple[Any, str, PropagationConfig]:
    """The extractor of a built encoder of ``model`` (a checkpoint's or a random init's): the stride-4 CorrFlow/MAST
    encoder gives its ``head`` or a truncated trunk's last stage (window presets: their own reader); a ResNet gives
    ``layer`` (default ``model.eval_layer``). Each is fed the colour space the model trains on (``model.colour``; a
    ResNet trained on RGB reads ImageNet-normalised RGB). Returns ``(extractor, layer used, cfg with that layer
    recorded)``."""
    if model.encoder == "mast_resnet18":
        last = encoder.layers[-1]  # "head", or the stage a truncated trunk ends at
        if cfg.window is None:
            cfg = dataclasses.replace(cfg, layer=last)  # recorded as used
        return _stride4_extractor(encoder, cfg, colour=model.colour, name=f"{name}.{last}[{model.colour}]"), last, cfg
    layer = layer or model.eval_layer
    cfg = dataclasses.replace(cfg, layer=layer)
    colour = "lab" if model.colour == "lab" else "imagenet"
    return EncoderFeatures.from_config(encoder, cfg, name=f"{name}.{layer}", colour=colour), layer, cfg


def build_extractor(*, checkpoint: str | os.PathLike | None = None, encoder: str | None = None,
                    weights: str | os.PathLike | None = None, seed: int = 0, preset: PropagationConfig,
                    device: str | None = None, layer: str | None = None, colour: str | None = None
                    ) -> tuple[Any, dict[str, Any], PropagationConfig]:
    """The extractor named by the ``vidssl propagate`` options, and a description for metrics.json.

    Exactly one source: ``checkpoint``; ``encoder`` in resnet18/resnet34/resnet50 (random init from ``seed``, or the
    torchvision ``weights`` file), ``mast_resnet18`` (random init; fed ``colour``, default the window preset's or
    Lab), ``lab`` or ``identity``; or ``weights`` alone (read as a torchvision ResNet-18 state_dict unless
    ``encoder`` names the architecture). Returns ``(extractor, description, effective config)``. The random-init
    baseline of a trained model is :func:`random_init_extractor` (its architecture and colour space).
    """
    if colour is not None and colour not in ("rgb", "lab"):
        raise ValueError(f"colour: {colour!r}; expected 'rgb' or 'lab'")
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
        if cfg.window is not None:  # stride-4 normalised Lab pixels for the MAST/CorrFlow protocols
            return (WindowFeatures(None, colour="lab", crop_multiple=cfg.window.crop_multiple,
                                   short_side=cfg.window.short_side, device=cfg.device),
                    {"source": "lab", "stride": 4}, cfg)
        return LabFeatures.from_config(cfg), {"source": "lab"}, cfg
    if name == "mast_resnet18":
        import torch

        from vidssl.models.encoders import build_model_encoder

        if weights:
            raise ValueError("--weights: for mast_resnet18 give a vidssl --checkpoint instead")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            enc = build_model_encoder(ModelConfig(encoder="mast_resnet18", padding_mode="zeros"))
        colour = colour or (cfg.window.colour if cfg.window is not None else "lab")
        if cfg.window is None:
            cfg = dataclasses.replace(cfg, layer="head")  # recorded as used
        ext = _stride4_extractor(enc, cfg, colour=colour, name=f"mast_resnet18[random seed={seed}]")
        return ext, {"source": "random-init", "encoder": name, "seed": seed, "colour": colour}, cfg
    if layer:
        cfg = dataclasses.replace(cfg, layer=layer)
    ext = build_encoder_features(name, seed=seed, weights=weights, cfg=cfg)
    info = {"source": "weights" if weights else "random-init", "encoder": name, "seed": seed}
    if weights:
        info["weights"] = str(Path(weights))
    return ext, info, cfg


def random_init_extractor(model: ModelConfig, *, seed: int, preset: PropagationConfig, device: str | None = None
                          ) -> tuple[Any, dict[str, Any], PropagationConfig]:
    """The "same architecture at random init" baseline of a trained model: ``model`` (its ``model:`` section, colour
    resolved) built from ``seed`` exactly as training builds it -- with the run's ``train.seed`` these are the
    trained encoder's step-0 weights -- read at ``model.eval_layer`` (stride-4 encoders: their head) and fed the
    colour space the model trains on (a CorrFlow encoder reads RGB, MAST's Lab), under any preset.

    Returns ``(extractor, description, effective config)`` like :func:`build_extractor`.
    """
    import torch

    from vidssl.models.encoders import build_model_encoder

    if model.colour not in ("rgb", "lab"):
        raise ValueError(f"model.colour: {model.colour!r} is not resolved; pass the model section of a resolved run "
                         f"config (vidssl.engine.resolve_run_config) or of a checkpoint (model_config_of)")
    cfg = dataclasses.replace(preset, device=device) if device else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = build_model_encoder(model)
    ext, used, cfg = model_extractor(encoder, model, cfg, name=f"{model.encoder}[random seed={seed}]")
    return ext, {"source": "random-init", "encoder": model.encoder, "seed": int(seed), "colour": model.colour,
                 "layer": used}, cfg
