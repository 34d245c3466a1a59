#!/usr/bin/env bash
# The GPU half of the scaling issue in one prepared run (about 8-9 minutes on an H100/H200-class GPU), most important
# first; a step starts only while the run's deadline leaves it room:
#   1. the Franca training step of the tiny, ViT-S, ViT-B and ViT-L presets in bf16 (throughput, MFU against the
#      measured bf16 matrix-product rate, peak memory, per-phase times),
#   2. the iBOT loss of the widest level (6144 x 131072): franca's soft_cross_entropy, eager and compiled, against
#      the plain form (time, peak memory),
#   3. the ViT-L and ViT-S steps under FSDP2 in a one-process group (--strategy fsdp: the trainer's bf16
#      mixed-precision policy casts the weights once per step instead of autocast at every use; table in the log),
#   4. a kernel-level profile of the ViT-L step (attention backend, head matmuls, Sinkhorn-Knopp, AdamW, EMA, host
#      synchronisations),
#   5. the real `franca train` loop through torchrun (1 process, distributed.strategy=fsdp: FSDP2 with the bf16
#      mixed-precision policy) at the paper's crops (224/98 x 8, ViT-S, paper heads, 14 data workers) on generated
#      224-px images: per-image augmentation for 60 iterations (a checkpoint at the end), then the same run directory
#      resumed to 120 iterations with crops.augment_on_device=true (the checkpoint read back on the GPU),
#   6. backbone inference against timm at 224 and 518 px (ViT-L, batch 64, bf16),
#   7. a short `franca demo` on the GPU (90-second training budget),
#   8. the batched photometric augmentation on the GPU,
#   9. the ViT-L step with train.compile (torch.compile of every block and head, and the loss kernels).
# Every step has its own time limit, so a slow one cannot take the others' results with it. Output goes to
# ${OUT:-benchmarks/out/gpu}: check.log (everything printed) plus the benchmarks' JSON, the two loop runs' metrics and
# the demo's metrics.json (eight files at most: what the device tool brings back).
#
# Usage, from the repository root on the GPU machine (torch, torchvision, timm, numpy, scipy, scikit-learn,
# matplotlib, safetensors, pyyaml, tqdm present; omegaconf may have to travel as a wheel in .whl/, see below):
#   bash benchmarks/gpu_check.sh [DEADLINE_SECONDS]      (default 540)
# Through this workplace's device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600),
# after `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0` here (and `echo /.whl/ >> .git/info/exclude`).
# Then record the numbers in benchmarks/RESULTS.md (machine, date, versions), the ones that miss a target too.
# LOOP_OVERRIDES (extra key=value for both loop runs) and PYTHON let the script be tried on a CPU with a tiny model;
# GPU_STEPS="train_step profile ..." runs only the named steps (a re-measurement after a fix);
# DEMO_MINUTES sets the demo's training budget (default 1.5).
set -uo pipefail

out=${OUT:-benchmarks/out/gpu}
deadline=${1:-540}
mkdir -p "$out"
log="$out/check.log"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/franca_site \
        .whl/*.whl && export PYTHONPATH=/tmp/franca_site:$PYTHONPATH
fi
scratch=${SCRATCH:-/tmp/franca_gpu}
rm -rf "$scratch" && mkdir -p "$scratch"

started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
step() {  # step NAME SECONDS COMMAND...: run with a time limit (cut to the deadline), everything into the log
    local name=$1 limit=$2
    shift 2
    if [[ -n ${GPU_STEPS:-} && " $GPU_STEPS " != *" $name "* ]]; then
        return
    fi
    local left=$((deadline - $(elapsed)))
    if ((left < 20)); then
        echo "=== $name: skipped, ${left}s left before the deadline" | tee -a "$log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, $(elapsed)s elapsed): $*" | tee -a "$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    local status=$?
    echo "=== $name: exit $status after $(elapsed)s" | tee -a "$log"
}

loop_run() {  # loop_run ITERATIONS OVERRIDES...: the real training loop, one torchrun process, FSDP2
    "$python" -m torch.distributed.run --standalone --nproc_per_node 1 -m franca train --config vitb14_in21k \
        --output-dir "$scratch/loop" --no-progress model.arch=vit_small data.path="$scratch/synth/train" \
        train.global_batch_size=null train.batch_size_per_device=64 train.num_workers=14 distributed.strategy=fsdp \
        train.iterations="$1" train.checkpoint_every=1000 train.log_every=10 optim.warmup_iterations=10 \
        optim.freeze_last_layer_iterations=5 loss.teacher_temp_warmup_iterations=10 "${@:2}" ${LOOP_OVERRIDES:-}
}
export python scratch LOOP_OVERRIDES
export -f loop_run  # `timeout` runs programs, so the loop steps call it through bash -c

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    nproc
    df -h /dev/shm /tmp
} >>"$log" 2>&1

step train_step 170 "$python" benchmarks/bench_train_step.py --device cuda --phases --json "$out/train_step.json"
step loss 45 "$python" benchmarks/bench_loss.py --device cuda --compile
step train_step_fsdp 110 "$python" benchmarks/bench_train_step.py --device cuda --configs vit_large vit_small \
    --strategy fsdp --phases --json "$scratch/train_step_fsdp.json"
step profile 60 "$python" benchmarks/profile_train_step.py --config vit_large --device cuda --rows 40 \
    --json "$out/profile.json"
step synth 40 "$python" -m franca data synth --out "$scratch/synth" --num-images 4000 --val-images 0 --size 224 \
    --workers 16 --quiet
step loop_per_image 90 bash -c "loop_run 60"
step loop_on_device_resumed 90 bash -c "loop_run 120 crops.augment_on_device=true"
cp "$scratch/loop/metrics.jsonl" "$out/loop_metrics.jsonl" 2>/dev/null
ls -la "$scratch/loop" "$scratch/loop/checkpoints" >>"$log" 2>&1
step inference 60 "$python" benchmarks/bench_inference.py --device cuda --arch vit_large --batch 64 \
    --repeats 10 --out "$out/inference.json"
step demo 150 "$python" -m franca demo --device cuda --output-dir "$scratch/demo" --time-budget-min ${DEMO_MINUTES:-1.5} --no-progress
cp "$scratch/demo/metrics.json" "$out/demo_metrics.json" 2>/dev/null
step augment 40 "$python" benchmarks/bench_augment.py --device cuda --workers 0 --json "$out/augment.json"
step train_step_compiled 120 "$python" benchmarks/bench_train_step.py --device cuda --configs vit_large --compile \
    --phases --json "$out/train_step_compiled.json"
echo "total $(elapsed)s" | tee -a "$log"
