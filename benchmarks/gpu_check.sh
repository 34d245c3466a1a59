#!/usr/bin/env bash
# The GPU half of the scaling issue in one prepared run (about 8 minutes on an H100/H200-class GPU):
#   1. the Franca training step of the tiny, ViT-S, ViT-B and ViT-L presets in bf16 (throughput, MFU, peak memory,
#      per-phase times),
#   2. backbone inference against timm at 224 and 518 px,
#   3. the batched photometric augmentation on the GPU,
#   4. a short `franca demo` on the GPU (3-minute training budget),
#   5. the ViT-L step again with per-block torch.compile, if time is left.
# Every step has its own time limit, so a slow one cannot take the others' results with it. Output goes to
# ${OUT:-benchmarks/out/gpu}: check.log (everything printed) plus the benchmarks' JSON and the demo's metrics.json
# (seven files at most, what the device tool brings back).
#
# Usage, from the repository root on the GPU machine (torch, torchvision, timm, numpy, scipy, scikit-learn,
# matplotlib, safetensors, pyyaml, tqdm present; omegaconf may have to travel as a wheel in .whl/, see below):
#   bash benchmarks/gpu_check.sh
# Through this workplace's device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560),
# after `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0` here (.whl/ is git-ignored locally).
# Then record the numbers in benchmarks/RESULTS.md (machine, date, versions), the ones that miss a target too.
set -uo pipefail

out=${OUT:-benchmarks/out/gpu}
mkdir -p "$out"
log="$out/check.log"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}  # PYTHON=.venv/bin/python to try the script where no GPU is (every step then fails fast)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/franca_site \
        .whl/*.whl && export PYTHONPATH=/tmp/franca_site:$PYTHONPATH
fi

started=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, everything into the log, the status noted
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, $(($(date +%s) - started))s elapsed): $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    local status=$?
    echo "=== $name: exit $status after $(($(date +%s) - started))s" | tee -a "$log"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >>"$log" 2>&1

step train_step 210 "$python" benchmarks/bench_train_step.py --device cuda --phases --json "$out/train_step.json"
step inference 90 "$python" benchmarks/bench_inference.py --device cuda --out "$out/inference.json"
step augment 60 "$python" benchmarks/bench_augment.py --device cuda --workers 0 --json "$out/augment.json"
step demo 300 "$python" -m franca demo --device cuda --output-dir /tmp/franca_gpu_demo --time-budget-min 3 --no-progress
cp /tmp/franca_gpu_demo/metrics.json "$out/demo_metrics.json" 2>/dev/null
if (($(date +%s) - started < 420)); then
    step train_step_compiled 120 "$python" benchmarks/bench_train_step.py --device cuda --configs vit_large --compile \
        --phases --json "$out/train_step_compiled.json"
fi
echo "total $(($(date +%s) - started))s" | tee -a "$log"
