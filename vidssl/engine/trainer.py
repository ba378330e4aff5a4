"""The training loop shared by every objective.

One path for a laptop CPU, one GPU and ``torchrun`` (DDP): the process group is detected from the environment,
batches come from :func:`vidssl.data.build_loader`, the objectives from the registry. Reproducible: the model is
initialised from ``train.seed``, data order and augmentation come from seeded generators, the objectives' own
randomness (patch jitter, edge dropout) from a dedicated generator whose state is checkpointed, so a run stopped
and resumed reaches the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
from tqdm import tqdm

from vidssl.config import ConfigError, to_dict
from vidssl.data.streams import StreamCursor, batches_drawn, stream_drawn
from vidssl.engine.checkpoint import (latest_checkpoint, load_weights_into, read_trainer_state, read_weights,
                                      save_checkpoint)
from vidssl.engine.config import OptimConfig, RunConfig, check_data_needs
from vidssl.engine.distributed import DistInfo, all_reduce_gradients, barrier, cleanup_distributed, init_distributed
from vidssl.engine.objectives import MultiObjective
from vidssl.io.atomic import atomic_write_text
from vidssl.models.encoders import build_model_encoder
from vidssl.models.objective import BuildContext, StepContext


def build_training_model(cfg: RunConfig, *, device: str | torch.device = "cpu") -> MultiObjective:
    """Encoder + objectives of a run config (weights freshly initialised from the global RNG)."""
    ctx = BuildContext(total_steps=cfg.train.steps, batch_size=cfg.train.batch_size, data=cfg.data,
                       streams=cfg.stream_configs(), device=torch.device(device))
    return MultiObjective(build_model_encoder(cfg.model), [(o.name, o.weight, o.params) for o in cfg.objectives],
                          ctx)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant / cosine / multistep."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the objectives' declared groups, then ``optim.param_groups`` patterns, then the
    rest. Each group carries ``name`` and ``lr_scale`` (its lr relative to ``optim.lr``, applied by the schedule).

    With neither declared nor configured groups this is one group of every trainable parameter in
    ``model.parameters()`` order (what a plain ``Adam(model.parameters())`` sees).
    """
    declared = model.param_groups() if hasattr(model, "param_groups") else []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not declared and not cfg.param_groups:
        return [{"name": "default", "params": [p for _, p in named], "lr": cfg.lr, "lr_scale": 1.0,
                 "weight_decay": cfg.weight_decay}]
    taken: set[int] = set()
    groups = []
    for g in declared:
        params = [p for p in g["params"] if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in params)
        scale = float(g.get("lr_scale", 1.0))
        groups.append({"name": g["name"], "params": params, "lr": cfg.lr * scale, "lr_scale": scale,
                       "weight_decay": cfg.weight_decay if g.get("weight_decay") is None else g["weight_decay"]})
    for i, gc in enumerate(cfg.param_groups):
        params = [p for n, p in named if id(p) not in taken and fnmatch.fnmatchcase(n, gc.pattern)]
        if not params:
            raise ConfigError(f"optim.param_groups.{i}.pattern: {gc.pattern!r} matches no trainable parameter "
                              f"(names look like {named[0][0]!r})")
        taken.update(id(p) for p in params)
        scale = 1.0 if gc.lr is None else gc.lr / cfg.lr
        groups.append({"name": f"pattern:{gc.pattern}", "params": params, "lr": cfg.lr * scale, "lr_scale": scale,
                       "weight_decay": cfg.weight_decay if gc.weight_decay is None else gc.weight_decay})
    rest = [p for _, p in named if id(p) not in taken]
    if rest:
        groups.append({"name": "default", "params": rest, "lr": cfg.lr, "lr_scale": 1.0,
                       "weight_decay": cfg.weight_decay})
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``optim.name`` over parameters or parameter groups (groups may set their own ``lr``/``weight_decay``)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def effective_amp(amp: str, device: torch.device) -> str:
    """The autocast dtype ``train.amp`` resolves to on ``device``: ``"off"``, ``"bf16"`` or ``"fp16"``."""
    if amp == "off":
        return "off"
    if device.type == "cuda":
        return "fp16" if amp == "fp16" else "bf16"
    if amp == "bf16" or (amp == "native" and cpu_has_native_bf16()):
        return "bf16"
    return "off"  # auto and fp16 on the CPU, native on a CPU without native bf16


def _autocast(amp: str, device: torch.device):
    """``(autocast context factory, use an fp16 GradScaler)`` for the resolved :func:`effective_amp` on ``device``."""
    if amp == "off":
        return contextlib.nullcontext, False
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return functools.partial(torch.autocast, device.type, dtype=dtype), dtype == torch.float16


def _truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log stays one consistent history."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _build_loaders(cfg: RunConfig, dist_info: DistInfo, loader: Any) -> dict[str, Any]:
    """One loader per stream (``main`` may be given, for tests); batch sizes are split over processes."""
    from vidssl.data.loader import build_loader

    loaders = {}
    for name, data in cfg.stream_configs().items():
        if name == "main" and loader is not None:
            loaders[name] = loader
            continue
        bs = cfg.stream_batch_size(name)
        key = "train.batch_size" if name == "main" else f"streams.{name}.batch_size"
        if bs % dist_info.world_size:
            raise ConfigError(f"{key}={bs} is not divisible by the {dist_info.world_size} processes")
        loaders[name] = build_loader(data, batch_size=bs // dist_info.world_size, seed=cfg.train.seed,
                                     rank=dist_info.rank, world_size=dist_info.world_size,
                                     device=str(dist_info.device))
        if len(loaders[name]) == 0:
            raise ValueError(f"{'data' if name == 'main' else 'streams.' + name}: the loader yields no batch: fewer "
                             f"clips than its batch size ({bs}); add videos or lower the batch size")
    return loaders


def _optimizers(model: MultiObjective, cfg: RunConfig) -> dict[str, torch.optim.Optimizer]:
    """The run's optimisers by name: the custom-step objective's own, or one over the parameter groups."""
    custom = model.custom_step
    if custom is not None:
        def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            for g in groups:
                g.setdefault("lr_scale", 1.0)
                g.setdefault("lr", cfg.optim.lr * g["lr_scale"])
            return build_optimizer(groups, cfg.optim)

        opts = custom.configure_optimizers(build)
        if not opts:
            raise ValueError(f"{type(custom).__name__}.configure_optimizers returned no optimiser")
        return dict(opts)
    return {"main": build_optimizer(param_groups(model, cfg.optim), cfg.optim)}


def _load_trainer_state(state: dict[str, Any], opts: dict, scalers: dict, ckpt: Path) -> None:
    """Restore every optimiser and scaler by name (format 1 checkpoints had one, stored as ``optimizer``)."""
    saved_opts = state.get("optimizers") or ({"main": state["optimizer"]} if "optimizer" in state else {})
    saved_scalers = state.get("scalers") or ({"main": state["scaler"]} if state.get("scaler") else {})
    if set(saved_opts) != set(opts):
        raise ValueError(f"{ckpt}: the checkpoint has optimisers {sorted(saved_opts)}, this run builds "
                         f"{sorted(opts)}; resume with the recipe that wrote it")
    for name, opt in opts.items():
        opt.load_state_dict(saved_opts[name])
    for name, scaler in scalers.items():
        if scaler is not None and saved_scalers.get(name):
            scaler.load_state_dict(saved_scalers[name])


@runtime_checkable
class Monitor(Protocol):
    """Something :func:`train` runs on the live encoder every ``every`` steps (and at the last step), on the main
    process only, e.g. :class:`vidssl.evaluation.probe.ProbeMonitor`.

    ``monitor(step, encoder) -> {name: float}``: ``step`` is the number of optimiser steps done, ``encoder`` the shared
    encoder (never the DDP wrapper), in train mode. The scalars go into that step's ``log.jsonl`` record as
    ``<name>/<key>``. A monitor may switch the encoder to eval mode or run it under ``no_grad``; the trainer restores
    every submodule's training flag, every parameter's ``requires_grad`` and the global RNG state afterwards (and
    refuses a monitor that moved the encoder), so a run with monitors reaches bit-identical weights to one without.
    It must not change weights or BatchNorm statistics. Optional: ``name`` (default ``"monitor"``), ``every``
    (default ``train.log_every``) and ``check(encoder)``, called on every process before anything is written to the
    run folder (raise to refuse the run, naming the key).
    """

    def __call__(self, step: int, encoder: nn.Module) -> dict[str, float]: ...


def _monitor_every(monitor: Callable, cfg: RunConfig) -> int:
    every = int(getattr(monitor, "every", cfg.train.log_every))
    if every < 1:
        raise ValueError(f"monitor {_monitor_name(monitor)!r}: every must be >= 1, got {every}")
    return every


def _monitor_name(monitor: Callable) -> str:
    return str(getattr(monitor, "name", "monitor"))


@contextlib.contextmanager
def _encoder_kept(encoder: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore the encoder's per-submodule training flags, ``requires_grad`` and the global RNG states after a
    monitor call; refuse a monitor that moved the encoder's parameters."""
    modes = [(m, m.training) for m in encoder.modules()]
    grads = [(p, p.requires_grad) for p in encoder.parameters()]
    where = [(p, p.device) for p in encoder.parameters()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, flag in grads:
                p.requires_grad_(flag)
    moved = [d for p, d in where if p.device != d]
    if moved:
        raise RuntimeError(f"a monitor moved the encoder off {moved[0]}; monitors must leave it where it is")


def _run_monitors(monitors: Sequence[tuple[Callable, int]], step: int, total: int, encoder: nn.Module,
                  device: torch.device) -> dict[str, float]:
    """The scalars of every monitor due at ``step``, keys prefixed ``<name>/``."""
    out: dict[str, float] = {}
    for monitor, every in monitors:
        if step % every and step != total:
            continue
        name = _monitor_name(monitor)
        with _encoder_kept(encoder, device):
            values = monitor(step, encoder)
        for k, v in dict(values).items():
            out[f"{name}/{k}"] = float(v)
    return out


def train(cfg: RunConfig, out_dir: str | Path, *, resume: str | Path | None = None, progress: bool = True,
          loader: Any = None, echo: bool = True, monitors: Sequence[Callable[[int, nn.Module], dict[str, float]]] = ()
          ) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; resumes from ``resume`` or from ``out_dir``'s latest checkpoint.

    Args:
        cfg: resolved run config.
        out_dir: run folder (created; rank 0 writes ``config.json``, ``log.jsonl``, checkpoints).
        resume: a checkpoint to resume from; by default the newest one in ``out_dir`` if any.
        progress: tqdm progress bar on rank 0.
        loader: an already built loader of the main stream (tests); by default :func:`vidssl.data.build_loader`.
        echo: print a line per logged step when the progress bar is off.
        monitors: :class:`Monitor` callables run on the live encoder on the main process every ``monitor.every``
            steps and at the last step; their scalars are logged (a monitor step always writes a log record).

    Nothing is written to ``out_dir`` until every check that can refuse the run has passed: the config, the model
    and objectives (e.g. an objective's queue size against the batch), the optimisers and parameter groups, the
    checkpoint to resume from, the loaders and the monitors' ``check``. A rejected rerun leaves an existing run
    folder byte-identical.

    Each step draws the main stream's batch and, by their mixing weights, the other streams' (under
    ``batch["streams"]``). The default step is one backward of the weighted sum of the objectives' losses and one
    optimiser step; an objective with ``custom_step`` runs its own ``training_step`` instead (its optimisers and
    scalers are checkpointed by name).

    Returns:
        summary dict (final step, last logged values, wall time, checkpoint path).
    """
    out_dir = Path(out_dir)
    dist_info: DistInfo = init_distributed(cfg.train.device)
    device = dist_info.device
    if cfg.train.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % dist_info.world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                         f"{dist_info.world_size} processes")
    check_data_needs(cfg)
    config_dict = to_dict(cfg)
    monitor_every = [(m, _monitor_every(m, cfg)) for m in monitors]

    # every check that can refuse the run comes before the first write to out_dir (config.json, log, checkpoints)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_training_model(cfg, device=device)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist_info.distributed and device.type == "cuda" and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    custom = model.custom_step
    opts = _optimizers(model, cfg)
    for m, _ in monitor_every:
        getattr(m, "check", lambda encoder: None)(model.encoder)
    amp = effective_amp(cfg.train.amp, device)
    autocast, fp16 = _autocast(amp, device)
    if dist_info.is_main and amp != "off":
        print(f"autocast {amp} on {device.type} (train.amp={cfg.train.amp})", file=sys.stderr)
    scalers = {name: torch.amp.GradScaler("cuda") if fp16 else None for name in opts}
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.train.seed * 1_000_003 + dist_info.rank)

    start_step = 0
    ckpt = Path(resume) if resume else latest_checkpoint(out_dir)
    if ckpt is not None:
        weights, _, _ = read_weights(ckpt)
        load_weights_into(model, weights)
        state = read_trainer_state(ckpt)
        _load_trainer_state(state, opts, scalers, ckpt)
        rng = state["rng"][min(dist_info.rank, len(state["rng"]) - 1)]
        gen.set_state(rng["objective"])
        start_step = int(state["step"])

    ddp_model = model
    if dist_info.distributed and custom is None:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    loaders = _build_loaders(cfg, dist_info, loader)
    main_loader = loaders["main"]
    steps_per_epoch = len(main_loader)
    if steps_per_epoch == 0:
        raise ValueError("the data loader yields no batch: fewer clips than train.batch_size "
                         f"({cfg.train.batch_size}); add videos or lower the batch size")
    if dist_info.is_main:  # the run is accepted: from here on the run folder changes
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(config_dict, indent=2) + "\n")
        if ckpt is not None:
            _truncate_log(out_dir / "log.jsonl", start_step)
            print(f"resumed from {ckpt} at step {start_step}", file=sys.stderr)
    weights = {name: (1.0 if name == "main" else cfg.streams[name].weight) for name in loaders}
    cursors = {name: StreamCursor(ld, batches_drawn(cfg.train.seed, name, start_step, weights[name]))
               for name, ld in loaders.items()}

    total = cfg.train.steps
    bar = tqdm(total=total, initial=start_step, disable=not (progress and dist_info.is_main),
               desc=f"pretrain {cfg.name}", dynamic_ncols=True)
    log_path = out_dir / "log.jsonl"
    step, last_logs, t_start = start_step, {}, time.time()
    window = {"data": 0.0, "step": 0.0, "clips": 0, "n": 0}
    model.train()
    last_ckpt = None
    params = [p for p in model.parameters() if p.requires_grad]
    while step < total:
        t0 = time.time()
        epoch = step // steps_per_epoch  # the main stream draws one batch per step
        batch = next(cursors["main"])
        extra = {name: next(c) for name, c in cursors.items()
                 if name != "main" and stream_drawn(cfg.train.seed, name, step, weights[name])}
        if extra:
            batch = {**batch, "streams": extra}
        batch = _to_device(batch, device)
        t1 = time.time()
        lr = lr_at(step, cfg.optim, total)
        for opt in opts.values():
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        grad_norm = None
        if custom is not None:
            ctx = StepContext(step=step, lr=lr, optimizers=opts, scalers=scalers, autocast=autocast, generator=gen,
                              all_reduce_gradients=all_reduce_gradients, work_dir=out_dir)
            logs = dict(custom.training_step(batch, ctx))
            if "loss" not in logs:
                raise ValueError(f"{type(custom).__name__}.training_step: the logs need a 'loss' entry")
        else:
            opt, scaler = opts["main"], scalers["main"]
            with autocast():
                loss, logs = ddp_model(batch, generator=gen)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.optim.grad_clip > 0:
                grad_norm = float(nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"loss is {logs['loss']} at step {step}; lower optim.lr or check the data")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.time()
        step += 1
        bs = batch["video"].shape[0] * dist_info.world_size
        window["data"] += t1 - t0
        window["step"] += t2 - t1
        window["clips"] += bs
        window["n"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
        due = [m for m in monitor_every if step % m[1] == 0 or step == total]
        if step % cfg.train.log_every == 0 or step == total or due:
            n = window["n"]
            watched = _run_monitors(due, step, total, model.encoder, device) if due and dist_info.is_main else {}
            rec = {"step": step, "epoch": epoch, "lr": lr, **logs, **watched,
                   "data_time": window["data"] / n, "step_time": window["step"] / n,
                   "clips_per_s": window["clips"] / max(1e-9, window["data"] + window["step"]),
                   "skipped": int(getattr(main_loader, "skipped", 0))}
            for name in extra:
                rec[f"streams/{name}/items"] = int(batch["streams"][name]["video"].shape[0]) * dist_info.world_size
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            last_logs = rec
            window = {"data": 0.0, "step": 0.0, "clips": 0, "n": 0}
            if dist_info.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                shown = "".join(f" {k} {v:.4f}" for k, v in watched.items())
                if echo and bar.disable:
                    print(f"step {step}/{total} loss {logs['loss']:.4f} lr {lr:.2e} "
                          f"data {rec['data_time']:.3f}s step {rec['step_time']:.3f}s "
                          f"{rec['clips_per_s']:.1f} clips/s{shown}", flush=True)
                elif shown and not bar.disable:
                    bar.write(f"step {step}/{total}{shown}")
        if step % cfg.train.ckpt_every == 0 or step == total:
            last_ckpt = _save(out_dir, model, opts, scalers, gen, step, config_dict, cfg.train.keep_checkpoints,
                              dist_info)
    bar.close()
    if step == total:  # after the final checkpoint: what an objective kept for a resume is no longer needed
        for obj in model.objectives.values():
            obj.on_train_end(out_dir)
    for ld in loaders.values():  # the GPU path's decode sessions hold threads and open decoders
        getattr(ld, "close", lambda: None)()
    barrier()
    cleanup_distributed()
    return {"step": step, "logs": last_logs, "wall_s": time.time() - t_start,
            "checkpoint": str(last_ckpt) if last_ckpt else None}


def _save(out_dir: Path, model: nn.Module, opts: dict[str, torch.optim.Optimizer], scalers: dict, gen: torch.Generator,
          step: int, config: dict, keep: int, dist_info: DistInfo) -> Path | None:
    """Rank 0 writes; every rank contributes its RNG state so a resumed DDP run continues each stream."""
    rng = {"objective": gen.get_state()}
    if dist_info.distributed:
        import torch.distributed as dist

        states: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(states, rng)
        rngs = states
    else:
        rngs = [rng]
    path = None
    if dist_info.is_main:
        state = {"format": 2, "optimizers": {k: o.state_dict() for k, o in opts.items()},
                 "scalers": {k: s.state_dict() for k, s in scalers.items() if s is not None},
                 "step": step, "rng": rngs}
        path = save_checkpoint(out_dir, step=step, weights=model.state_dict(), trainer_state=state, config=config,
                               keep=keep)
    barrier()
    return path
