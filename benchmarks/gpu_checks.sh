#!/usr/bin/env bash
# The GPU measurements of the speed work, in priority order, each capped in time. The caps add up to 15.5
# minutes: on a borrowed card's 10-minute slot run it under `timeout 555`, which cuts the last steps (run them
# in a second, short call with STEPS if device time is left).
#
#     bash benchmarks/gpu_checks.sh [OUT]        # OUT: where logs and JSON go (default saved_results/gpu_checks)
#     STEPS="graphs mosei" bash benchmarks/gpu_checks.sh [OUT]     # only the steps named (e.g. a second, short call)
#
# 1. check_cuda.py: losses and gradients of the fast modes (both stackings, bf16) against the baseline on the GPU.
# 2. bench_train.py, MOSI shape, 5 timed passes each: baseline, fast (shipped: modalities joined along time, fusion
#    feed-forward recomputed, BERT's layers with one query/key/value matmul, bf16), fast-unfusedqkv (BERT through
#    transformers' layers), fast-twopass (the two views in two passes). The other variants (fast-nocheckpoint,
#    fast-nostack) were measured on an H200 on 2026-11-27 (benchmarks/results/h200-2026-11-27);
#    add them to the list to measure them again.
# 3. bench_mmsa_run.py at MOSI's full split sizes (1,284 training samples): one end-to-end MMSA_run epoch,
#    baseline against fast, and its phases (the training epoch's own ratio among them). Its workspace (a bert-base
#    and its checkpoints, ~1 GB) goes to a temporary folder; its phases.json is copied to OUT.
# 4. fast again under the profiler (GPU busy share, top kernels, host time per operation).
# 5. bench_graphs.py: the shipped step eager against its forward+backward replayed as a CUDA graph (an experiment:
#    how much of the step is host overhead).
# 6. bench_train.py, MOSEI shape: baseline and fast.
# 7. bench_train.py, MOSI shape: fast against fast-noaddmmlt (DISABLE_ADDMM_CUDA_LT=1).
# 8. bench_train.py, MOSI shape: fast-compile (BERT and the fusion through torch.compile/Inductor; the warm-up
#    compiles the training and the evaluation graphs: minutes).
# 9. bench_fusion.py on the GPU (metrics_report.py --device cuda needs a slot of its own).
# On the H200 of 2026-11-28 steps 1-7 took 435 s in all. The host's speed varied by up to 1.4x between processes
# there: compare modes within one step, and prefer more passes (--repeats) to more modes.
# Each step prints its last lines; a step that runs out of time is cut and the next one starts.
set -u
cd "$(dirname "$0")/.."
out=${1:-saved_results/gpu_checks}
mkdir -p "$out"
work=$(mktemp -d)  # bench_mmsa_run's workspace: large files, kept out of OUT
trap 'rm -rf "$work"' EXIT
step() {  # step NAME SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return
    fi
    echo "== $name (at most ${cap} s): $*"
    local start=$SECONDS
    timeout --kill-after=5 "$cap" "$@" >"$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    grep -v -e "Writing model shards" -e "Loading weights" "$out/$name.log" | tail -n 14
}
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/card.txt"
step check_cuda 70 python benchmarks/check_cuda.py
step mosi 170 python benchmarks/bench_train.py --shapes mosi --modes baseline fast fast-unfusedqkv fast-twopass \
    --repeats 5 --timeout 45 --out "$out/mosi.json"
step mmsa_run 130 python benchmarks/bench_mmsa_run.py --scale 1.0 --out "$work/mmsa_run"
for phases in "$work"/mmsa_run/*/phases.json; do
    [ -f "$phases" ] && cp "$phases" "$out/mmsa_run_phases.json"
done
step mosi_profile 50 python benchmarks/bench_train.py --shapes mosi --modes fast --steps 4 --repeats 1 --profile \
    --timeout 45 --out "$out/profile/mosi_profile.json"
step graphs 80 python benchmarks/bench_graphs.py --out "$out/graphs.json"
step mosei 90 python benchmarks/bench_train.py --shapes mosei --modes baseline fast --timeout 45 \
    --out "$out/mosei.json"
step noaddmmlt 60 python benchmarks/bench_train.py --shapes mosi --modes fast fast-noaddmmlt --repeats 5 --timeout 45 \
    --out "$out/mosi_noaddmmlt.json"
step compile 220 python benchmarks/bench_train.py --shapes mosi --modes fast-compile --steps 4 --repeats 2 \
    --timeout 215 --out "$out/mosi_compile.json"
step fusion 60 python benchmarks/bench_fusion.py --quick --device cuda --out "$out/fusion"
echo "logs in $out"
