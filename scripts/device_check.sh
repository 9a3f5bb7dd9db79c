#!/usr/bin/env bash
# The GPU check (bench/bench_gpu.py) on a machine with one NVIDIA GPU and no network, in under 8 minutes:
#     bash scripts/device_check.sh          # from anywhere; results in $OUT (default: ./out under the repository)
# It runs the project from this working tree with the machine's python3 as it is (torch with CUDA, safetensors,
# tokenizers, numpy; transformers + peft for the comparison when present): nothing is installed. Every step has its
# own time limit (the limits add up to 7.5 minutes with the kill grace), so one that hangs leaves the others theirs.
# $OUT gets: nvidia-smi.txt, versions.json, train.json, generate.json, hf.json (bench_gpu.py's parts, one JSON
# object each) and check.log (each step's exit status and time, and everything the steps wrote to stderr).
# PYTHON (default python3) and BENCH_ARGS (extra bench_gpu.py flags, e.g. "--tiny --device cpu" for a dry run on a
# CPU) change what runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
log="$OUT/check.log"
: >"$log"
failed=0

step() {  # step NAME SECONDS STDOUT_FILE COMMAND...: run COMMAND with a time limit, stdout to the file
    local name=$1 limit=$2 out=$3 t0 rc
    shift 3
    t0=$(date +%s)
    printf '[%s] %.150s\n' "$name" "$*" >>"$log"
    timeout --kill-after=5 "$limit" "$@" >"$out" 2>>"$log"
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    [ "$rc" -eq 124 ] && echo "[$name] timed out" >>"$log"
    echo "[$name] exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$log" >&2
}

step nvidia-smi 10 "$OUT/nvidia-smi.txt" sh -c \
    'nvidia-smi && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv'
step versions 40 "$OUT/versions.json" "$PY" -c '
import json, platform, sys, torch
v = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
     "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
     "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
for name in ("safetensors", "tokenizers", "numpy", "transformers", "peft"):
    try:
        v[name] = __import__(name).__version__
    except ImportError as e:
        v[name] = f"not importable: {e}"
print(json.dumps(v, indent=1))'
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step train 140 /dev/null "$PY" bench/bench_gpu.py --parts train --out "$OUT/train.json" ${BENCH_ARGS:-}
# shellcheck disable=SC2086
step generate 100 /dev/null "$PY" bench/bench_gpu.py --parts generate --out "$OUT/generate.json" ${BENCH_ARGS:-}
# shellcheck disable=SC2086
step hf 140 /dev/null "$PY" bench/bench_gpu.py --parts hf --out "$OUT/hf.json" ${BENCH_ARGS:-}
ls -l "$OUT" >&2
exit $failed
