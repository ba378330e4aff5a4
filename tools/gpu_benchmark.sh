#!/usr/bin/env bash
# Issue #15 on one GPU machine, in one run (~7 minutes on an H100): the GPU tests, the decode grid and GPU label
# propagation; prints Markdown tables and writes everything under $OUT (or ./gpu_benchmark_out).
#
#   bash tools/gpu_benchmark.sh                 # on the GPU machine, from the repository root
#   bash tools/gpu_benchmark.sh --prepare       # here (with network): pack the Python packages the GPU image lacks
#
# The lent machines (see the device tool's KINDS.md) have python3 3.12 with torch 2.11+cu130, pytest, einops,
# PyYAML, safetensors, nvidia-ml-py, but no PyAV, torchcodec or PyNvVideoCodec, and no network. --prepare unpacks
# the wheels of av 18.1 (with its FFmpeg 8), torchcodec 0.11 (the release for torch 2.11) and pynvvideocodec 2.2.4
# (cp312) into one xz archive, .whl/gpu-site.tar.xz (31 MiB: under the 64 MiB the device tool carries), which
# this script unpacks to /tmp/site. torchcodec finds FFmpeg through sonames: the script links PyAV's bundled FFmpeg
# 8 libraries under their plain names in /tmp/ffmpeg-libs (LD_LIBRARY_PATH). Device tool call:
#   run(command="bash tools/gpu_benchmark.sh", carry=[".whl"], timeout_s=540)
# Steps (each with its own time limit; a missing package or backend is skipped and said so, never fatal):
#   1. environment: GPU, driver, NVDEC clocks, which backends load               (~20 s)
#   2. pytest: tests/test_video_nvdec.py (every backend vs the CPU reader), test_gpu_pipeline.py (~40 s)
#   3. tools/bench_decode.py --device cuda: the grid + CRW data share            (~4.5 min)
#   4. tools/bench_propagate.py --cli-compare: crw, mast on cpu and cuda, 480p   (~1.5 min)
set -u
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p .whl /tmp/gpu-site-pack
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d /tmp/gpu-site-wheels av==18.1.0 torchcodec==0.11.0 pynvvideocodec==2.2.4
  for w in /tmp/gpu-site-wheels/*.whl; do unzip -q -o "$w" -d /tmp/gpu-site-pack; done
  rm -rf /tmp/gpu-site-pack/*.data /tmp/gpu-site-pack/samples /tmp/gpu-site-pack/benchmarks  # sources, examples
  tar -C /tmp/gpu-site-pack -cf - . | xz -T0 -6 > .whl/gpu-site.tar.xz
  ls -la .whl/gpu-site.tar.xz
  exit 0
fi

OUT=${OUT:-$REPO/gpu_benchmark_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$OUT/summary.md"; }
echo "# vidssl GPU benchmark (issue #15), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)" \
  > "$OUT/summary.md"

# --- packages ------------------------------------------------------------------------------------------------
if [ -f .whl/gpu-site.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/gpu-site.tar.xz
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  say "no .whl/gpu-site.tar.xz (bash tools/gpu_benchmark.sh --prepare): using what python3 has"
fi
AVLIBS=$(python3 - <<'EOF' 2>/dev/null
import os, av
print(os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs"))
EOF
)
if [ -n "$AVLIBS" ] && [ -d "$AVLIBS" ]; then  # PyAV's FFmpeg under plain sonames, for torchcodec
  mkdir -p /tmp/ffmpeg-libs
  for f in "$AVLIBS"/lib{avcodec,avformat,avutil,swscale,swresample,avfilter,avdevice}-*.so.*; do
    [ -e "$f" ] || continue
    base=$(basename "$f"); name=${base%%-*}; major=$(echo "$base" | sed -E 's/.*\.so\.([0-9]+).*/\1/')
    ln -sf "$f" "/tmp/ffmpeg-libs/$name.so.$major"
  done
  # $AVLIBS too: a library opened through a link resolves its own $ORIGIN dependencies from the link's folder
  export LD_LIBRARY_PATH=/tmp/ffmpeg-libs:$AVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# --- 1. environment ------------------------------------------------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,clocks.max.video,clocks.video,memory.total --format=csv \
  2>&1 | tee -a "$OUT/summary.md"
timeout 60 python3 - <<'EOF' 2>&1 | tee -a "$OUT/summary.md"
import torch
from vidssl.io.video import check_backend
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}")
for b in ("pyav", "torchcodec", "pynvvideocodec"):
    try:
        check_backend(b, "cuda")
        print(f"  {b}: available on cuda")
    except Exception as e:
        print(f"  {b}: NOT available: {e}")
try:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    print("  NVML max video clock", pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_VIDEO), "MHz")
except Exception as e:
    print("  NVML:", e)
EOF
nvidia-smi dmon -s u -d 1 > "$OUT/dmon.log" 2>&1 &   # a second NVDEC utilisation record (dec column), per second
DMON=$!

# --- 2. tests --------------------------------------------------------------------------------------------------
say "## pytest (GPU tests + the pipeline's CPU twin)"
timeout 120 python3 -m pytest tests/test_video_nvdec.py tests/test_gpu_pipeline.py -q -s -rs -p no:cacheprovider \
  > "$OUT/pytest.log" 2>&1
say "pytest exit $?: $(tail -1 "$OUT/pytest.log")"
grep -E "mean \|GPU - CPU\||SKIPPED|FAILED" "$OUT/pytest.log" | head -20 | tee -a "$OUT/summary.md"

# --- 3. decode grid ----------------------------------------------------------------------------------------------
say "## decode grid (tools/bench_decode.py --device cuda)"
timeout 290 python3 tools/bench_decode.py --device cuda --workdir /tmp/bench_decode --sessions 8 --batch 20 \
  --files 32 --budget 2.5 --crw-steps 25 --json "$OUT/decode.json" --markdown "$OUT/decode.md" \
  > "$OUT/decode.log" 2>&1
say "bench_decode exit $? (124 = out of time; partial log in decode.log)"
[ -f "$OUT/decode.md" ] && cat "$OUT/decode.md" | tee -a "$OUT/summary.md" || tail -40 "$OUT/decode.log"

# --- 4. propagation --------------------------------------------------------------------------------------------
say "## label propagation (vidssl propagate, 480p, crw and mast presets, cpu vs cuda)"
LEFT=$(( 470 - $(elapsed) ))
if [ "$LEFT" -gt 60 ]; then
  timeout "$LEFT" python3 tools/bench_propagate.py --cli-compare --synthetic --devices cpu,cuda \
    --presets crw,mast --frames 8 --size 480x854 --workdir /tmp/bench_prop --json "$OUT/propagate.json" \
    > "$OUT/propagate.log" 2>&1
  say "bench_propagate exit $?"
  grep -E "s/frame|masks on" "$OUT/propagate.log" | tee -a "$OUT/summary.md"
else
  say "skipped: ${LEFT}s left of the 470 s budget"
fi

kill "$DMON" 2>/dev/null
say "done in $(elapsed)s; files in $OUT: summary.md decode.json decode.md propagate.json pytest.log dmon.log"
