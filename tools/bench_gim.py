"""Peak training memory and step time of end-to-end CPC against every Greedy InfoMax mode, same trunk and batch.

Every configuration runs in its own child process (a fresh allocator, so peaks do not mix): it builds the model and
its optimisers from the same seed, makes one random batch, runs ``--warmup`` steps and then ``--steps`` timed
steps. Memory:

* CPU: the child's peak resident set (``ru_maxrss``) and, as the *training* memory, that peak minus the resident set
  after the model, optimisers and batch exist (what the steps themselves add: activations, gradients, optimiser
  moments);
* GPU (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus the allocation before the first step.

Configurations: ``cpc`` (end-to-end image-mode CPC: the whole trunk, one head on its output, one optimiser),
``joint`` (GIM official: summed losses, one backward), ``joint_per_module`` (a backward right after each module),
``sequential_m<i>`` (module i trained, earlier modules frozen under no_grad; the sequential peak is the maximum
over i), ``sequential_cache_m<i>`` (i >= 1: the same with ``cache: disk`` and one cached batch: the first warm-up
step writes module i's input to a temporary folder, every later step reads it instead of running the frozen
modules; its memory includes that first step) and ``pipelined`` (``--workers`` threads). The largest module's share
of end-to-end memory is measured in the parent by counting the bytes autograd saves per module in one joint step.

Usage (one CPU slot, one thread per configuration; pipelined uses ``--workers`` threads)::

    python tools/bench_gim.py --encoder gim_resnet34 --batch 8 --crop 64 --out runs/bench_gim.json

Memory is also counted in tensor bytes (``tensors``): a separate child runs the warm-up steps under the profiler,
whose count of CPU allocator calls gives the most tensor memory alive at once, net of what existed before (optimiser
moments included, allocator slack excluded; the pipelined threads are not seen by it, hence n/a). The largest
module's share is measured in the parent: the distinct storages autograd saves per module in one joint step plus 3x
its parameter bytes (gradient and Adam's two moments).

Measured at 1d4d757 (this 2-core CPU under load from other jobs, one thread per configuration, 2 warm-up + 1 timed
step; ``python tools/bench_gim.py --encoder gim_resnet34 --batch 8 --crop 64 --pred-steps 5``), training
memory relative to end-to-end CPC (resident 600 MiB, tensors 427 MiB): sequential 0.57 / 0.43 / 0.47 resident and
0.47 / 0.34 / 0.37 in tensors for modules 0 / 1 / 2, so end-to-end / sequential = **2.14x in tensors (goal 2x met),
1.74x resident (not met; a repeat at 1f3d3d7, same code: tensors identical, 1.72x resident)**; sequential / (largest
share 0.40 x end-to-end) = 1.16 in tensors (goal 1.2 met), 1.42 resident. Module 0 sets the peak, 200 MiB of tensors
= eight 24.5 MiB maps at the full 16x16 patch resolution (the six ReLU outputs layer1's convolutions save for their
weight gradients, plus in the forward the block input kept for the identity and the convolution's output, in the
backward the gradient kept for the identity and one convolution's grad_input) + 1.2 MiB patches + 1.7 MiB Adam: what
this trunk needs without recomputation. It was 249 MiB at 5f28c59 (same command that session: 1.88x tensors, 1.61x
resident; by the profiler per allocating op): ten maps in the forward (the stem output held by the stage call through
layer1, a oneDNN reorder copy of an NCHW convolution's input/output) and in the backward (the NCHW gradient of the
pooling copied to channels-last by each conv backward, threshold_backward's new map per ReLU, oneDNN copies);
end-to-end fell less (468 -> 427 MiB: its peak is the forward's end, every saved map + Adam, where those transients
are small; the sampled negatives' saved M x n x C codes and last step's gradients kept through the forward were the
difference). The resident set adds glibc's heap slack: after the first free of a 24.5 MiB block glibc raises its mmap
threshold above that size, later maps come from the heap, and the heap keeps what is freed (glibc's mallinfo2 after 3
steps: sequential_m0's heap 394 MiB of which 235 MiB free, cpc's 715 MiB of which 452 MiB free). With
``--malloc-mmap-threshold 65536`` (every child alike; glibc then unmaps each freed block above 64 KiB) resident is
457 MiB end-to-end and 0.49 / 0.38 / 0.41: **2.02x**, largest-share ratio 1.23. Step time: sequential_m0 1.08 s, cpc
4.74 s (5f28c59: 1.37 / 4.64 s). Joint 1.11, joint_per_module 0.96, pipelined 1.18 resident (2 threads: 1.03x joint's
throughput). Cut points (``--splits layer1.1,layer2.1,layer3`` etc. are accepted): GIM's stage split stays the
default since, by the per-block counts of saved bytes (an estimate, the other splits were not benchmarked), moving
blocks does not lower the maximum: layer3's gradient + Adam moments (82 MiB) already make module 2 the largest with
state (shares 0.32 / 0.27 / 0.40), and ending module 0 earlier moves full-resolution maps and their backward into
module 1.

Rerun on the quiet machine after the profiler function was shared with tests/test_gim.py (same command): tensors
identical (427 / 200 / 147 / 159 MiB), resident 647 vs 319 MiB = 2.03x (largest-share ratio 1.22): the resident ratio
moves between 1.72x and 2.03x from run to run with glibc's defaults.

Rerun at 497050a with the disk-cache configurations (same command, quiet machine: nothing else running): tensors
identical (427 / 200 / 147 / 159 MiB, 2.14x), resident 602 vs 320 MiB = 1.88x (largest-share ratio 1.32). Step
time of the sequential modules with the frozen modules recomputed / read from the disk cache: module 1 1.44 / 1.06 s
(1.36x), module 2 2.75 / 2.25 s (1.22x), with no more memory (cache 258 / 255 MiB resident vs 271 / 302). A best
case: one timed step that reads one cached batch, written by the warm-up step just before (from the page cache, not
the disk). Pipelined with
2 threads on the otherwise idle 2 cores: 2.03x joint's throughput (1.03x in the run above, with another job on the
second core).

Per-module probes (``--probe RUN``): every frame of the held-out DAVIS sequences (``--davis-root``, ``--sequences``),
short side resized to ``--crop`` and centre-cropped, cut into the run's patch grid; each module's maps are
average-pooled per patch. Two linear probes (:func:`vidssl.evaluation.probe.linear_probe`), fitted on the first half
of each sequence's frames and tested on the second half: the sequence of a frame (codes averaged over the grid, GIM's
downstream pooling) and whether a patch is foreground in the DAVIS mask (per-patch codes, classes balanced); for the
trained run and the same config at random init (``--seeds``).

Baselines for evaluations that read a checkpoint (``vidssl propagate``): ``--random-init RUN --out DIR`` writes DIR as
a run folder whose step-0 checkpoint is RUN's config at random initialisation, seeded as the trainer seeds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vidssl.io.atomic import atomic_write_text
from vidssl.models.cpc import CPC
from vidssl.models.encoders import ModelConfig, build_model_encoder
from vidssl.models.gim import GIM
from vidssl.models.objective import StepContext


def _encoder(args):
    return build_model_encoder(ModelConfig(encoder=args.encoder, out_layer=args.splits[-1],
                                           eval_layer=args.splits[-1], stride8=False))


def _gim(args, mode, **kw):
    kw.setdefault("total_steps", len(args.splits))
    return GIM(_encoder(args), splits=args.splits, mode=mode, pred_steps=args.pred_steps, **kw)


def _memory_now(device: torch.device) -> float:
    """MiB: allocated on the GPU, or the resident set's high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """Run one configuration; returns memory (MiB) and per-step time (s)."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = args.child
    lr = 2e-4
    if name == "cpc":
        model = CPC(_encoder(args), pred_steps=args.pred_steps).to(device)
        opts = {"main": torch.optim.Adam(model.parameters(), lr=lr)}
    else:
        if name.startswith("sequential_m"):
            model = _gim(args, "sequential", module_steps=[1] * len(args.splits))
        elif name.startswith("sequential_cache_m"):  # one cached batch: the first warm-up step writes it, the
            cache_dir = tempfile.TemporaryDirectory(prefix="bench_gim_cache.")  # others read it (removed at exit)
            m = len(args.splits)  # 2 steps per module: the step run is never the run's last (which clears the cache)
            model = _gim(args, "sequential", module_steps=[2] * m, total_steps=2 * m, cache="disk", cache_batches=1,
                         cache_dir=cache_dir.name)
        elif name == "pipelined":
            model = _gim(args, "pipelined", workers=args.workers)
        else:
            model = _gim(args, "joint", backward="per_module" if name == "joint_per_module" else "summed")
        model.to(device)
        opts = model.configure_optimizers(lambda groups: torch.optim.Adam(groups, lr=lr))
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"video": torch.rand(args.batch, 1, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(1))
             .to(device)}
    step_of = 0
    if name.startswith("sequential_m"):
        step_of = int(name[len("sequential_m"):])
    elif name.startswith("sequential_cache_m"):
        step_of = 2 * int(name[len("sequential_cache_m"):])  # module i's first step (module_steps 2 each)

    def one_step(i: int) -> None:
        if name == "cpc":
            opts["main"].zero_grad(set_to_none=True)  # before the forward, as every GIM mode does
            loss, _ = model(batch, generator=gen)
            loss.backward()
            opts["main"].step()
        else:
            ctx = StepContext(step=step_of, lr=lr, optimizers=opts, scalers={k: None for k in opts},
                              autocast=contextlib.nullcontext, generator=gen,
                              all_reduce_gradients=lambda params: None)
            model.training_step(batch, ctx)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = _memory_now(device)
    times = []
    if args.tensor_peak:  # a separate child: the profiler's own records would inflate the resident set
        return {"config": name, "tensor_mib": tensor_peak_bytes(lambda: [one_step(i) for i in range(args.warmup)]) / 2 ** 20}
    for i in range(args.warmup):
        one_step(i)
    for i in range(args.steps):
        t0 = time.perf_counter()
        one_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": name, "base_mib": base, "peak_mib": peak, "train_mib": peak - base,
            "tensor_mib": peak - base if device.type == "cuda" else None,
            "step_s": sum(times) / len(times), "images_per_s": args.batch / (sum(times) / len(times))}


def module_shares(args) -> dict[str, list[float]]:
    """Each module's share (head included) of what end-to-end training keeps: ``activations`` = distinct storages
    autograd saves in one joint step (a tensor saved by two ops, e.g. a ReLU output that is also the next
    convolution's input, counted once); ``with_state`` adds 3x the module's parameter bytes (gradient and Adam's two
    moments, alive at the step's peak); ``bytes`` are the per-module (activations, state) byte counts."""
    torch.manual_seed(0)
    model = _gim(args, "joint")
    batch = {"video": torch.rand(args.batch, 1, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(1))}
    x, grid = model._patches(batch)
    acts, state = [], []
    for i in range(len(model.blocks)):
        seen: dict[tuple[int, int], int] = {}

        def pack(t, seen=seen):
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x, loss, _ = model.module_loss(i, x.detach(), grid, torch.Generator().manual_seed(i))
        acts.append(sum(seen.values()))
        state.append(3 * sum(p.numel() * p.element_size() for p in model.module_parameters(i)))
        del loss
    both = [a + b for a, b in zip(acts, state)]
    return {"activations": [a / sum(acts) for a in acts], "with_state": [b / sum(both) for b in both],
            "bytes": [[a, b] for a, b in zip(acts, state)]}


def tensor_peak_bytes(fn) -> int:
    """Bytes: the most tensor memory alive at once while ``fn()`` runs, net of what existed before -- the profiler's
    count of CPU allocator calls, i.e. what the tensors need, without the allocator's slack that the resident set
    includes. (Also used by tests/test_gim.py's measured-peak test.)"""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0
    # the profiler's running total carries what earlier profiled code left allocated: count from this run's start
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - base


def random_init_run(run: str, out: str) -> Path:
    """A step-0 checkpoint of ``run``'s config at random init (``torch.manual_seed(train.seed)``, as ``train``)."""
    from vidssl.engine import build_training_model, model_from_checkpoint, save_checkpoint

    _, cfg, _ = model_from_checkpoint(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_training_model(cfg)
    from vidssl.config import to_dict

    return save_checkpoint(out, step=0, weights=model.state_dict(), trainer_state={"step": 0}, config=to_dict(cfg))


def _square(img, size: int, resample):
    """Short side resized to ``size``, centre-cropped to ``size`` x ``size``."""
    w, h = img.size
    img = img.resize((round(w * size / min(w, h)), round(h * size / min(w, h))), resample)
    w, h = img.size
    return img.crop(((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size))


def held_out_frames(root: str, sequences: list[str], size: int):
    """Frames ``(N, 3, size, size)`` normalised like training (ImageNet statistics), their foreground masks
    ``(N, 1, size, size)``, sequence labels ``(N,)`` and the train mask (first half of each sequence)."""
    import numpy as np
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    frames, masks, labels, train = [], [], [], []
    for k, seq in enumerate(sequences):
        files = sorted((Path(root) / "JPEGImages" / "480p" / seq).glob("*.jpg"))
        if not files:
            raise SystemExit(f"bench_gim: --davis-root {root}: no frames for sequence {seq!r}")
        for i, f in enumerate(files):
            rgb = np.asarray(_square(Image.open(f).convert("RGB"), size, Image.BILINEAR), dtype=np.float32)
            frames.append((torch.from_numpy(rgb).permute(2, 0, 1) / 255 - mean) / std)  # 3 s s
            ann = Path(root) / "Annotations" / "480p" / seq / (f.stem + ".png")
            mask = np.asarray(_square(Image.open(ann).convert("L"), size, Image.NEAREST)) > 0
            masks.append(torch.from_numpy(mask)[None].float())  # 1 s s
            labels.append(k)
            train.append(i < len(files) // 2)
    return torch.stack(frames), torch.stack(masks), torch.tensor(labels), torch.tensor(train)


@torch.no_grad()
def module_features(model: GIM, frames: torch.Tensor, batch: int = 16) -> list[torch.Tensor]:
    """Each module's per-patch codes ``[(N, gh * gw, C_m)]`` (its maps average-pooled per patch)."""
    from vidssl.models.cpc import patchify

    model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    for i in range(0, len(frames), batch):
        x, grid = patchify(frames[i:i + batch], patch=model.patch, stride=model.patch_stride)  # (n g) 3 p p
        for m, blk in enumerate(model.blocks):
            x = blk(x)  # (n g) C h w
            out[m].append(x.mean(dim=(-2, -1)).reshape(-1, grid[0] * grid[1], x.shape[1]))  # n g C
    return [torch.cat(o) for o in out]


def _balanced(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices with as many items of each class as the rarest class has (seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = min(int((y == c).sum()) for c in y.unique())
    return torch.cat([torch.nonzero(y == c)[:, 0][torch.randperm(int((y == c).sum()), generator=g)[:n]]
                      for c in y.unique()])


def probe_modules(args) -> dict:
    """Per-module linear probes of a GIM run and of its config at random init (see the module docstring)."""
    from vidssl.engine import build_training_model, model_from_checkpoint
    from vidssl.evaluation.probe import linear_probe
    from vidssl.models.cpc import patchify

    torch.set_num_threads(1)
    trained, cfg, step = model_from_checkpoint(args.probe)
    frames, masks, labels, train = held_out_frames(args.davis_root, args.sequences.split(","), args.crop)
    models = {"trained": trained}
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        models[f"random_init_seed{seed}"] = build_training_model(cfg)
    report = {"run": args.probe, "step": step, "frames": len(frames), "sequences": args.sequences, "crop": args.crop,
              "sequence_protocol": "frame -> sequence (grid-pooled codes), first half of each sequence's frames "
                                   "-> second half",
              "foreground_protocol": "patch -> foreground (>= half of its pixels in the DAVIS mask), per-patch codes, "
                                     "classes balanced by subsampling, first half -> second half", "sequence": {},
              "foreground": {}}
    for name, full in models.items():
        gim = next(iter(full.objectives.values()))
        if not isinstance(gim, GIM):
            raise SystemExit(f"bench_gim: --probe {args.probe}: not a gim run")
        fg_all = patchify(masks, patch=gim.patch, stride=gim.patch_stride)[0].mean(dim=(1, 2, 3)) >= 0.5  # (N g)
        fg_all = fg_all.reshape(len(frames), -1)  # N g
        tr, te = _balanced(fg_all[train].flatten().long(), 0), _balanced(fg_all[~train].flatten().long(), 1)
        seq, fg = [], []
        for f in module_features(gim, frames):  # N g C
            seq.append(linear_probe(f[train].mean(1), labels[train], f[~train].mean(1), labels[~train])["top1"])
            ftr, fte = f[train].flatten(0, 1)[tr], f[~train].flatten(0, 1)[te]  # n C
            fg.append(linear_probe(ftr, fg_all[train].flatten()[tr].long(), fte,
                                   fg_all[~train].flatten()[te].long())["top1"])
        report["sequence"][name], report["foreground"][name] = seq, fg
        print(f"{name:<22} sequence" + "".join(f"  m{m}: {a:.3f}" for m, a in enumerate(seq))
              + "   foreground" + "".join(f"  m{m}: {a:.3f}" for m, a in enumerate(fg)), flush=True)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="gim_resnet34", help="a registered stage-structured encoder")
    ap.add_argument("--splits", default="layer1,layer2,layer3", help="stage ending each module")
    ap.add_argument("--batch", type=int, default=8, help="images per step (each cut into patches)")
    ap.add_argument("--crop", type=int, default=64, help="image side (GIM: 64 -> 7x7 grid of 16x16 patches)")
    ap.add_argument("--pred-steps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="pipelined worker threads")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the tensor peak is taken over them)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                    help="run the children with MALLOC_MMAP_THRESHOLD_=BYTES (glibc then returns every freed block "
                         "above it to the OS at once instead of keeping it in the heap); 0: the allocator's default")
    ap.add_argument("--out", help="write the table as JSON here")
    ap.add_argument("--random-init", metavar="RUN", help="write --out as RUN's config at random init (step 0)")
    ap.add_argument("--probe", metavar="RUN", help="per-module linear probes of a gim run vs random init")
    ap.add_argument("--davis-root", default="../shared/data/davis2016-sample")
    ap.add_argument("--sequences", default="dog-agility,rollerblade,motorbike,surf")
    ap.add_argument("--seeds", default="0,1,2", help="random-init seeds of the probe baseline")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tensor-peak", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        report = probe_modules(args)
        if args.out:
            atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
        return 0
    if args.random_init:
        if not args.out:
            raise SystemExit("bench_gim: --random-init needs --out DIR (the run folder to write)")
        print(random_init_run(args.random_init, args.out))
        return 0
    args.splits = args.splits.split(",")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    m = len(args.splits)
    configs = (["cpc", "joint", "joint_per_module"] + [f"sequential_m{i}" for i in range(m)]
               + [f"sequential_cache_m{i}" for i in range(1, m)] + ["pipelined"])
    rows = []
    passthrough = [f"--encoder={args.encoder}", f"--splits={','.join(args.splits)}", f"--batch={args.batch}",
                   f"--crop={args.crop}", f"--pred-steps={args.pred_steps}", f"--workers={args.workers}",
                   f"--warmup={args.warmup}", f"--steps={args.steps}", f"--device={args.device}"]
    env = dict(os.environ)
    if args.malloc_mmap_threshold:  # glibc: blocks above it are mmap'ed and unmapped on free (no dynamic raise)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    for name in configs:
        runs = [[]] + ([["--tensor-peak"]] if args.device == "cpu" and name != "pipelined" else [])
        for extra in runs:  # the profiler sees only the main thread: no tensor peak for the pipelined threads
            res = subprocess.run([sys.executable, __file__, *passthrough, f"--child={name}", *extra],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"bench_gim: configuration {name} failed:\n{res.stderr[-3000:]}")
            out = json.loads(res.stdout.strip().splitlines()[-1])
            if extra:
                rows[-1]["tensor_mib"] = out["tensor_mib"]
            else:
                rows.append(out)
        print(f"  {name}: done", file=sys.stderr, flush=True)
    by = {r["config"]: r for r in rows}
    e2e = by["cpc"]
    seq = max((by[f"sequential_m{i}"] for i in range(m)), key=lambda r: r["train_mib"])
    seq_t = max((by[f"sequential_m{i}"] for i in range(m)), key=lambda r: r["tensor_mib"])
    shares = module_shares(args)
    kind = "max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss"
    print(f"GIM memory/time: {args.encoder} split {args.splits}, batch {args.batch} x {args.crop}^2 "
          f"({args.device}, {kind}; train = peak - before the first step; tensors = allocator calls' peak; "
          f"{args.warmup} warm-up + {args.steps} timed steps; MALLOC_MMAP_THRESHOLD_="
          f"{env.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default)')})")
    print(f"{'config':<18}{'peak MiB':>10}{'train MiB':>11}{'vs e2e':>8}{'tensors':>9}{'vs e2e':>8}{'s/step':>9}"
          f"{'img/s':>8}")
    for r in rows:
        t = (f"{r['tensor_mib']:>9.0f}{r['tensor_mib'] / e2e['tensor_mib']:>8.2f}" if r["tensor_mib"] is not None
             else f"{'n/a':>9}{'':>8}")
        print(f"{r['config']:<18}{r['peak_mib']:>10.0f}{r['train_mib']:>11.0f}"
              f"{r['train_mib'] / e2e['train_mib']:>8.2f}{t}{r['step_s']:>9.2f}{r['images_per_s']:>8.2f}")
    largest = max(shares["with_state"])
    summary = {
        "module_shares": shares,
        "sequential_peak_config": seq["config"],
        "e2e_over_sequential_train_mem": e2e["train_mib"] / seq["train_mib"],
        "e2e_over_sequential_tensor_mem": e2e["tensor_mib"] / seq_t["tensor_mib"],
        "e2e_over_joint_train_mem": e2e["train_mib"] / by["joint"]["train_mib"],
        "e2e_over_joint_per_module_train_mem": e2e["train_mib"] / by["joint_per_module"]["train_mib"],
        "sequential_over_largest_share_of_e2e": seq["train_mib"] / (largest * e2e["train_mib"]),
        "sequential_over_largest_share_of_e2e_tensors": seq_t["tensor_mib"] / (largest * e2e["tensor_mib"]),
        "pipelined_over_joint_throughput": by["pipelined"]["images_per_s"] / by["joint"]["images_per_s"],
        "sequential_recompute_over_cache_step_time": {
            f"m{i}": by[f"sequential_m{i}"]["step_s"] / by[f"sequential_cache_m{i}"]["step_s"] for i in range(1, m)},
    }
    print("module shares of end-to-end training memory, activations (distinct saved storages): "
          f"{', '.join(f'{v:.2f}' for v in shares['activations'])}; with gradients + Adam moments: "
          f"{', '.join(f'{v:.2f}' for v in shares['with_state'])}")
    print(f"end-to-end / sequential training memory: resident {summary['e2e_over_sequential_train_mem']:.2f}x, "
          f"tensors {summary['e2e_over_sequential_tensor_mem']:.2f}x (goal >= 2); sequential / (largest module "
          f"share x e2e): resident {summary['sequential_over_largest_share_of_e2e']:.2f}, tensors "
          f"{summary['sequential_over_largest_share_of_e2e_tensors']:.2f} (goal <= 1.2)")
    print(f"end-to-end / joint: {summary['e2e_over_joint_train_mem']:.2f}x; end-to-end / joint_per_module: "
          f"{summary['e2e_over_joint_per_module_train_mem']:.2f}x; pipelined ({args.workers} workers) / joint "
          f"throughput: {summary['pipelined_over_joint_throughput']:.2f}x")
    print("sequential step time, frozen modules recomputed / read from the disk cache: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in summary["sequential_recompute_over_cache_step_time"].items()))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"args": vars(args), "rows": rows, "summary": summary},
                                                     indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
