"""CPU training-step speed of an encoder under fp32, bf16 autocast and channels-last, measured in one run.

    python tools/bench_amp.py                  # mast_resnet18 (official, to its head; and to layer2) and resnet18
    python tools/bench_amp.py --encoders mast_resnet18,mast_resnet18:layer2 --batch 16 --size 96 --reps 5 --threads 2

An entry is ``name`` or ``name:out_layer``; a bare name takes ``--out-layer`` for the ResNets and the official encoder
(``layer4``, ending in its head) for ``mast_resnet18``.

Prints seconds per forward+backward (the minimum over ``--reps`` after one warm-up) and each mode's speed-up over
fp32, and whether this CPU computes bf16 natively (what ``train.amp: native`` checks).
"""

from __future__ import annotations

import argparse
import time

import torch

from vidssl.engine.trainer import cpu_has_native_bf16
from vidssl.models.encoders import ModelConfig, build_model_encoder

MODES = {"fp32": (False, False), "bf16": (True, False), "fp32 channels-last": (False, True),
         "bf16 channels-last": (True, True)}


def step_seconds(encoder: torch.nn.Module, x: torch.Tensor, *, bf16: bool, channels_last: bool, reps: int) -> float:
    """Minimum wall seconds of one forward + backward over ``reps`` repetitions (after a warm-up)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    encoder = encoder.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = encoder(x)  # b c h w
        y.float().square().mean().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="mast_resnet18,mast_resnet18:layer2,resnet18",
                    help="comma-separated registered encoders, each optionally :out_layer")
    ap.add_argument("--out-layer", default="layer3", help="out_layer of the ResNet encoders given without one")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"{args.threads} thread(s)")
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    for entry in args.encoders.split(","):
        name, _, layer = entry.partition(":")
        layer = layer or ("layer4" if name == "mast_resnet18" else args.out_layer)
        torch.manual_seed(0)
        encoder = build_model_encoder(ModelConfig(encoder=name, out_layer=layer))
        secs = {mode: step_seconds(encoder, x, bf16=b, channels_last=c, reps=args.reps)
                for mode, (b, c) in MODES.items()}
        base = secs["fp32"]
        print(f"{name}:{layer}: " + ", ".join(f"{m} {s:.3f} s ({base / s:.2f}x)" for m, s in secs.items()))


if __name__ == "__main__":
    main()
