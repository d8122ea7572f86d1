#!/usr/bin/env bash
# Everything the GPU numbers in docs/performance.md need, in one command on a lent GPU machine:
#   bash scripts/gpu_device_run.sh            # results and logs under $OUT (default /tmp/gpu_out)
# 1. installs the wheels carried in .whl/ (the project's pinned transformers, peft, hydra, datasets,
#    torchdata, ...; the machine has torch and accelerate but no network) on top of its Python;
# 2. checks the project imports, then runs scripts/gpu_benchmark.py --tiny on the GPU (the same code
#    path, seconds: a broken GPU path shows here, not after minutes of building 4B checkpoints);
# 3. the benchmark: Gemma 3 4B and Qwen2.5-VL 3B, LoRA and full SFT, default settings;
# 4. if time is left, Gemma 3 4B LoRA with one micro-batch of 8 per step (fewer, larger kernels).
# Each phase has its own time limit, so one that hangs or runs long still leaves the others' results.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/src"
BUDGET_S=${BUDGET_S:-540}  # the whole script; phase 4 starts only with 90 s to spare
started=$SECONDS
# Into the interpreter's own site-packages, not a --target dir on PYTHONPATH: datasets hashes its
# tables with dill, which pickles modules outside sys.prefix by value (and fails on pyarrow's types).
if compgen -G ".whl/*.whl" > /dev/null && [ -z "${SKIP_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl || exit 3
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c "import sys, torch, transformers, peft, accelerate, hydra, datasets, torchdata
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| cuda', torch.cuda.is_available())"
    python3 -c "import vlm_sweep.train, vlm_sweep.config.validate; print('vlm_sweep imports')"
} 2>&1 | tee "$OUT/env.txt"
grep -q "vlm_sweep imports" "$OUT/env.txt" || exit 4
echo "== phase 2: tiny models on this device ($((SECONDS - started)) s)"
timeout 150 python3 scripts/gpu_benchmark.py --tiny --steps 4 --warmup 1 --out "$OUT/tiny.json" 2>&1 \
    | tee "$OUT/tiny.log"
echo "== phase 3: published architectures ($((SECONDS - started)) s)"
left=$((BUDGET_S - (SECONDS - started)))
timeout $((left - 100)) python3 scripts/gpu_benchmark.py --time-limit $(((left - 220) / 60)) \
    --out "$OUT/gpu_benchmark.json" 2>&1 | tee "$OUT/bench.log"
left=$((BUDGET_S - (SECONDS - started)))
if [ "$left" -gt 90 ]; then
    echo "== phase 4: Gemma 3 4B LoRA, micro-batch 8 ($((SECONDS - started)) s)"
    timeout $((left - 5)) python3 scripts/gpu_benchmark.py --models gemma3 --modes lora --micro-batch-size 8 \
        --out "$OUT/gpu_benchmark_micro8.json" 2>&1 | tee "$OUT/micro8.log"
fi
echo "== done in $((SECONDS - started)) s"
