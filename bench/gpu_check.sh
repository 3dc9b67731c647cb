#!/usr/bin/env bash
# The GPU check: our trainer's speed and precision paths on one GPU, in one script (docs in bench/README.md).
#
#   bash bench/gpu_check.sh --fetch-wheels   on a machine with pip and a package index: DeepSpeed built as a wheel
#                                            and the packages a GPU machine without an index may lack or have in
#                                            another version, into .whl/ (git-ignored through .git/info/exclude)
#   bash bench/gpu_check.sh                  on the GPU machine, from the repository root (with .whl/ copied along
#                                            if it has no index): installs the wheels into /tmp/site, then
#                                            1. trains a ~1B-parameter Llama from config (18 x 2048, vocab 32000)
#                                               for 30 steps, ZeRO-2, precision auto (bf16 on a GPU with bf16),
#                                               activation checkpointing, seq 2048, micro-batch 8: tokens/s and MFU
#                                               against the data-sheet peak;
#                                            2. the 14M-parameter CPU bench model, ours against the HF Trainer
#                                               (ZeRO-2, 30 steps, auto), as bench/train_throughput.py prints it;
#                                            3. the 14M model in fp16 with DeepSpeed's dynamic loss scaling (ours).
#   bash bench/gpu_check.sh --smoke          the same runs on llama-tiny and a few steps, on any machine (CPU
#                                            too; the fp16 run only where CUDA is), with the packages already
#                                            installed (no .whl): checks this script and the Llama path, not speed.
#
# Figures and logs go to $OUT if set, else runs/gpu_check/; run directories and data to $GPU_CHECK_WORK (default
# runs/gpu_check/). $PYTHON is the interpreter (default python3). Exits 1, naming them, if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODE=${1:-run}

if [[ $MODE == --fetch-wheels ]]; then
    # Versions: DeepSpeed's and transformers' from setup.py (the single source of pins); the rest as installed here
    # by `pip install -e .` (DeepSpeed's own needs, and regex, which transformers checks at import).
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir .whl
    pinned=$("$PYTHON" - <<'EOF'
import re
from importlib.metadata import version
setup = open("setup.py").read()
print(*[re.search(rf'"({name}==[^"]+)"', setup).group(1) for name in ("deepspeed", "transformers")])
print(*[f"{name}=={version(name)}" for name in ("hjson", "pydantic", "pydantic_core", "annotated_types",
                                                 "typing_inspection", "typing_extensions", "regex")])
EOF
)
    read -r deepspeed transformers <<< "$(head -1 <<< "$pinned")"
    # DeepSpeed ships an sdist only; without DS_BUILD_* its ops are compiled on first use, so the wheel is pure Python.
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$deepspeed"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$transformers" $(tail -1 <<< "$pinned")
    ls -l .whl
    du -sh .whl
    exit 0
fi

if [[ -d .whl && $MODE != --smoke ]]; then  # --fetch-wheels' wheels, for Python 3.12
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-runs/gpu_check}
mkdir -p "$OUT_DIR"
WORK=${GPU_CHECK_WORK:-runs/gpu_check}

if [[ $MODE == --smoke ]]; then
    big=(--model llama-tiny --seq-len 128 --micro-batch 2 --steps 4 --warmup 1)
    small=(--model gpt2-14m --seq-len 128 --micro-batch 2 --steps 4 --warmup 1)
else
    big=(--model llama-1b --seq-len 2048 --micro-batch 8 --steps 30 --warmup 5)
    small=(--model gpt2-14m --steps 30 --warmup 5)
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "cuda",
        torch.cuda.is_available(), "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)'
} 2>&1 | tee "$OUT_DIR/gpu_check_env.txt"

# One rank on one GPU. Each check runs even if another failed, under its own time limit (together under 10
# minutes), so a hung run cannot take the others' time; their logs reach $OUT_DIR as they are written.
failed=()
check() {  # check NAME SECONDS ARGS...: one bench run, its output to $OUT_DIR/gpu_check_NAME.txt and .json
    local name=$1 seconds=$2
    shift 2
    if timeout "$seconds" "$PYTHON" bench/train_throughput.py "$@" --workdir "$WORK/$name" 2>&1 \
            | tee "$OUT_DIR/gpu_check_$name.txt"; then
        cp "$WORK/$name/results.json" "$OUT_DIR/gpu_check_$name.json"
    else
        failed+=("$name")
    fi
}
# --only ours: this one is our trainer on a 1B model, not a comparison.
check llama 300 "${big[@]}" --ranks 1 --stages 2 --activation-checkpointing --only ours
check gpt2 160 "${small[@]}" --ranks 1 --stages 2
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    check gpt2_fp16 100 "${small[@]}" --ranks 1 --stages 2 --precision fp16 --only ours
else
    echo "gpu_check: gpt2_fp16 skipped: no CUDA (DeepSpeed's CPU accelerator has no fp16)" | tee "$OUT_DIR/gpu_check_gpt2_fp16.txt"
fi
if (( ${#failed[@]} )); then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $OUT_DIR and $WORK)"
    exit 1
fi
echo "gpu_check: done; figures in $OUT_DIR"
