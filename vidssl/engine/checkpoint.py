"""Checkpoints: weights as safetensors, trainer state without pickled objects, written atomically.

Layout of a run folder::

    RUN/config.json                          resolved config
    RUN/log.jsonl                            one JSON line per logged step
    RUN/checkpoints/step_00000100/model.safetensors   weights (+ the config and step in the metadata)
    RUN/checkpoints/step_00000100/trainer.pt          optimizer, scaler, step, RNG states (tensors and builtins)

A checkpoint folder is written under a temporary name and renamed when complete, so a crash while writing leaves
the previous checkpoint untouched; incomplete temporary folders are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
_PREFIX = "step_"


def dedup_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tensors already present (a shared encoder appears under several module paths).

    The first name wins, so with the encoder registered first the weights are stored under ``encoder.*``.
    """
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(_PREFIX)
            and (d / MODEL_FILE).is_file() and (d / TRAINER_FILE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | os.PathLike, *, step: int, weights: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], config: dict[str, Any], keep: int = 2) -> Path:
    """Write ``RUN/checkpoints/step_<step>/`` atomically and keep the ``keep`` newest checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        meta = {"config": json.dumps(config), "step": str(step), "format": "vidssl-1"}
        save_file(dedup_state_dict(weights), str(tmp / MODEL_FILE), metadata=meta)
        torch.save(trainer_state, tmp / TRAINER_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace as a whole
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for d in root.iterdir():  # stale temporaries of crashed writers
        if d.name.startswith((".tmp-", ".old-")) and d != tmp:
            shutil.rmtree(d, ignore_errors=True)
    for d in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder, a checkpoint folder or a ``model.safetensors`` file -> the checkpoint folder."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors"):
        return p.parent
    if p.is_dir() and (p / MODEL_FILE).is_file():
        return p
    if p.is_dir():
        last = latest_checkpoint(p)
        if last is not None:
            return last
        raise FileNotFoundError(f"{p}: no complete checkpoint found (expected {p}/checkpoints/step_*/{MODEL_FILE})")
    raise FileNotFoundError(f"{p}: checkpoint not found (give a run folder, a checkpoint folder or a .safetensors file)")


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """``(weights, config dict, step)`` from a checkpoint; enough to rebuild the model with no other file."""
    ckpt = resolve_checkpoint(path)
    f = ckpt / MODEL_FILE
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{f}: not a vidssl checkpoint (no config in the safetensors metadata)")
    return load_file(str(f)), json.loads(meta["config"]), int(meta.get("step", 0))


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint, loaded with ``weights_only=True`` (tensors and builtins only)."""
    ckpt = resolve_checkpoint(path)
    return torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=True)


def load_weights_into(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load deduplicated weights into ``module``: keys missing from the file must be aliases of loaded tensors."""
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model does not: {unexpected[:5]}")
    full = module.state_dict()
    kept = dedup_state_dict(full)
    really_missing = [k for k in missing if k in kept]
    if really_missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {really_missing[:5]}")
