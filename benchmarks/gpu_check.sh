#!/usr/bin/env bash
# One prepared GPU run: correctness of every backend on the device, the attention sweep vs dense
# SDPA from 4K to 1M tokens, and ReformerLM training steps at 64K / 256K / 1M tokens, each part
# under its own time cap (about 7.5 minutes in all), every result written as soon as it exists.
#
# Made for a bare CUDA machine that reaches no package registry (torch, triton, pytest, numpy,
# safetensors, tqdm, matplotlib preinstalled): nothing is installed, the package runs from this
# source tree (PYTHONPATH). Without CUDA it is a dry run: it checks the environment, runs the
# sweep's logic on the CPU at small sizes, and skips the CUDA parts with a message.
#
#   benchmarks/gpu_check.sh [OUT_DIR]       # default: $OUT if set, else runs/gpu-check
#   make gpu-check
#
# OUT_DIR gets: summary.txt (environment, each part's exit status and seconds), log.txt (every
# part's output), attention.md/.json and model.md/.json (benchmarks/gpu.py's reports).
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary=$out/summary.txt log=$out/log.txt
: >"$summary"
: >"$log"

say() { echo "$*" | tee -a "$summary"; }

# part NAME SECONDS COMMAND...: run under a time cap, output to the log, status to the summary.
part() {
    local name=$1 cap=$2 start=$SECONDS
    shift 2
    echo "=== $name (cap ${cap}s): $*" >>"$log"
    timeout -k 10 "$cap" "$@" >>"$log" 2>&1
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] && note=" (stopped at its time cap; results so far are kept)"
    say "$name: exit $rc after $((SECONDS - start))s$note"
}

if ! "$py" -c "import torch" 2>>"$log"; then
    echo "gpu_check: $py cannot import torch (set PYTHON to the interpreter that has it)" | tee -a "$summary" >&2
    exit 2
fi
say "gpu_check $(date -u +%FT%TZ) on $(hostname), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
"$py" - >>"$summary" 2>&1 <<'EOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for name in ("triton", "safetensors", "numpy", "tqdm", "matplotlib", "pytest", "hypothesis", "tensorboard"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', 'present')}")
    except Exception as exc:
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
from reformer.native import kernels as cpu_kernels
print("CPU C kernels:", "built" if cpu_kernels.serves(torch.empty(0)) else "not available (no compiler?): torch ops serve")
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv >>"$summary" 2>&1
fi

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA device: dry run (the CUDA parts are skipped)"
    part "dry run of benchmarks/gpu.py on the CPU" 120 "$py" benchmarks/gpu.py --device cpu \
        --lengths 256 512 --n-hashes 2 --model-lengths 256 --case-seconds 5 --out-dir "$out"
    cat "$summary"
    exit 0
fi

# 1. Every backend against the reference on the device (fp32 sweep with gradients, bf16/fp16 error bound).
part "pytest -m gpu" 120 "$py" -m pytest -q -x -m gpu -p no:cacheprovider tests/
# 2. Attention fwd+bwd vs dense SDPA, 4K -> 1M tokens; Triton last (a kernel that breaks the
#    CUDA context spoils only its own series), the slowest cases extrapolated.
part "attention sweep" 200 "$py" benchmarks/gpu.py --skip-model --n-hashes 4 --case-seconds 12 \
    --deadline 170 --backends chunked sdpa flex triton --out-dir "$out"
# 3. Depth-6, dim-512 ReformerLM training steps with torch.cuda.max_memory_allocated.
part "ReformerLM steps" 150 "$py" benchmarks/gpu.py --skip-attention --model-lengths 65536 262144 1048576 \
    --out-dir "$out"
cat "$summary" "$out"/attention.md "$out"/model.md 2>/dev/null
