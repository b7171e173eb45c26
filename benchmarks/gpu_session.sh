#!/usr/bin/env bash
# The GPU work of a session that is lent a CUDA machine, as one prepared script.
#
#   bash benchmarks/gpu_session.sh session SECONDS   # within SECONDS: CUDA tests, evidence
#   bash benchmarks/gpu_session.sh continue SECONDS  # a second call: the evidence goes on
#   bash benchmarks/gpu_session.sh checks            # CUDA tests, full probe, loss speed, smokes
#   bash benchmarks/gpu_session.sh evidence MINUTES  # the second benchmark (evidence_v2.py);
#                                                    # JOBS=N: runs side by side (default 8);
#                                                    # GROUP=1: runs of a seed as one step;
#                                                    # ARMS="baseline se ...": only these arms;
#                                                    # SIZES="100": only these sizes
#                                                    # (also for session and continue)
#   bash benchmarks/gpu_session.sh groups K...       # K groups of 4 copies side by side
#                                                    # (FUSED=1: fused attention kernel)
#   bash benchmarks/gpu_session.sh levers MINUTES    # issue 7's investigation variants
#
# `session` is what a lent GPU should run (one call, one machine start): the CUDA tests (about
# 30 s), a group of 4 copies with explicit and with fused attention (about 50 s, with a run
# alone in the engine's loop to set beside them; the evidence's
# groups use the fused kernel if it took <= 0.9x the time, `--fused-attention`), then the
# evidence run for the time left: 8 processes side by side (JOBS), with --group
# (the runs of a seed and size that differ only in their regularisers as one vmapped step,
# spatial_entropy.grouped) where the committed probe found 4 copies as one group at >= 1.5x the
# rate of 1 (benchmarks/results/gpu_probe_session_cuda.json: 2.95x on an H200), and starting
# only a unit expected to finish at STEP_SECONDS (default 0.1) per step (DataLoaders if the
# device batches failed their CUDA test). PROBE=1 measures first instead (a short probe,
# about 2 minutes: one step's time and kernels, 1-16 copies of the model as one vmapped step,
# 1 and 4 runs trained as one group, 1/6/12 engine runs side by side) and runs as many
# processes as its engine_parallel found fastest. The evidence record is itself the
# measurement of that arrangement (each run's steps and training time).
# A lent session's 15 minutes fit two calls: `THEN=240 ... session 540`, then at once (while
# the machine is warm, 30 s) `... continue 240`. The second call goes on from the first one's
# record and checkpoints on the machine, so units that take longer than one call (n = 100:
# 6,000 steps) can finish, and the first call plans its units for both calls.
# It ends by itself about 20 s before SECONDS and leaves in $OUT:
#   checks.txt            the CUDA tests, the attention A/B (and the probe, PROBE=1) as printed
#   group_attention.json  the attention A/B's rows (gpu_probe.json with PROBE=1)
#   gpu_probe.json        the probe's rows (PROBE=1)
#   evidence_v2.json/.md  the record (continuing the committed one) and its report
#   evidence.log          the evidence run's lines, then GPU utilisation every 10 s during it
# (the plot is left out: `evidence_v2.py --report` draws it again from the JSON)
# `checks` is for a session that measures instead: the CUDA tests, the full probe (also the
# loss's kernels, the step as CUDA graphs, the engine eager / through DataLoaders / compiled /
# without checkpoints), the loss-speed table (loss_speed_cuda.json: every labeller with its host
# syncs, the CUDA-graph capture of the loss, bf16 training steps of the benchmark model and of
# ViT-S/16, ViT-B/16, ViT-S/16@384 with and without the loss) and the training smokes
# (smokes.txt: fp16, torch.compile, torchrun + resume, evaluate).
# Copy evidence_v2.json (and gpu_probe.json, loss_speed_cuda.json) into benchmarks/results/ and
# commit them.
#
# `checks` and `session` tried on the CPU: `SMOKE=1 bash benchmarks/gpu_session.sh session 600`
# runs the same steps with tiny settings on the CPU (evidence: 1-epoch pilot, two arms, a
# scratch record).
#
# Runs from the repository root with PYTHONPATH=src (the GPU image has torch, timm, scipy,
# scikit-image, safetensors). Fashion-MNIST is looked up as usual; with no network, put the four
# IDX .gz files in $SPATIAL_ENTROPY_CACHE/FashionMNIST/raw beforehand, or in .gpu_data/ (carried:
# copied there by this script).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
py=${PYTHON:-python3}
start=$SECONDS
# the arms and sizes the evidence runs (ARMS, SIZES; all when unset), one place for every call
# shellcheck disable=SC2206  # arm names and sizes, one word each
selection=(${ARMS:+--arms $ARMS} ${SIZES:+--sizes $SIZES})
strip() { tr '\r' '\n' | grep -v -E 'it/s\]|s/it\]|^\s*$'; }
if [ -n "${SMOKE:-${CHECKS_SMOKE:-}}" ]; then
    device=cpu
    speed=(--shapes 1 --repeats 1 --reference-repeats 1 --step-batch 4 --model-batch 2
        --models vit_small_patch16_224)
    evidence_extra=(--sizes 50 --seeds 1 --arms baseline se --pilot-epochs 1 --jobs 2 --threads 1
        ${GROUP:+--group})
    probe=(--runs-at-once 1 --engine-epochs 1 --models-at-once 1 2 --copies-at-once 1 2
        --batch 8)
    quick_probe=("${probe[@]}")
else
    device=cuda
    speed=()
    # runs side by side, one process each, their data on the GPU (no loader processes); with
    # PROBE=1 the session replaces 8 with the count the probe's engine_parallel found fastest
    # shellcheck disable=SC2086  # GROUP: one flag
    evidence_extra=(--jobs "${JOBS:-8}" --threads 1 ${GROUP:+--group}
        --step-seconds "${STEP_SECONDS:-0.1}" "${selection[@]}")
    probe=(--runs-at-once 1 4 8 16)
    # session: ~2 min of its minutes
    quick_probe=(--runs-at-once 1 6 12 --copies-at-once 1 4 --engine-epochs 5
        --group-attention explicit fused)
fi
if [ -d .gpu_data ]; then  # Fashion-MNIST carried with the working tree
    export SPATIAL_ENTROPY_CACHE=${SPATIAL_ENTROPY_CACHE:-/tmp/se_cache}
    mkdir -p "$SPATIAL_ENTROPY_CACHE/FashionMNIST/raw"
    cp .gpu_data/*.gz "$SPATIAL_ENTROPY_CACHE/FashionMNIST/raw/"
fi
printf 'import sys\nfrom spatial_entropy.cli import main\nsys.exit(main())\n' > /tmp/se_cli.py

cuda_tests() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
    echo "== CUDA tests"
    timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_components.py \
        tests/test_entropy.py tests/test_sync_free.py tests/test_attention.py \
        tests/test_grouped.py -k cuda -rA \
        2>&1 | tee /tmp/cuda_tests.txt | grep -v "^PASSED" | tail -8
}

# speed-only flags of the evidence: DataLoaders if the CUDA tests ran and the device batches
# did not pass theirs (the same batches either way; a failing fast path must not cost the
# session its runs)
data_flags() {
    if [ $device = cuda ] && [ -f /tmp/cuda_tests.txt ] \
        && ! grep -q "^PASSED.*device_batches" /tmp/cuda_tests.txt; then
        echo "--data-on-device off --num-workers 1"
    fi
}

loss_speed() {
    echo "== loss speed ($device): labellers, host syncs, CUDA graph, model training steps"
    timeout "${1:-420}" $py benchmarks/loss_speed.py --device $device --alternatives \
        "${speed[@]}" --out "$OUT/loss_speed_$device.json" 2>&1
}

smokes() {
    [ $device = cuda ] || return 0
    # each command gets at most $1 s and none runs past $2 (SECONDS of this script)
    local most=${1:-300} deadline=${2:-999999}
    lim() { local r=$((deadline - SECONDS)); echo $((r < most ? (r > 1 ? r : 1) : most)); }
    export TORCHINDUCTOR_COMPILE_THREADS=1  # beside the evidence runs: leave them the cores
    echo "== train smoke: compile=true (inductor) with the regulariser, bf16, 40 steps"
    timeout $(lim) $py /tmp/se_cli.py train --config configs/demo.yaml --output /tmp/smoke_compile \
        --set device=cuda --set compile=true --set max_steps=40 2>&1 | strip | tail -6
    echo "== the same 40 steps eager, to compare"
    timeout $(lim) $py /tmp/se_cli.py train --config configs/demo.yaml --output /tmp/smoke_eager \
        --set device=cuda --set max_steps=40 2>&1 | strip | tail -3
    echo "== train smoke: fp16 + GradScaler, RandAugment, Mixup/CutMix, EMA, 2 workers"
    timeout $(lim) $py /tmp/se_cli.py train --config configs/demo.yaml --output /tmp/smoke_fp16 \
        --set device=cuda --set amp=fp16 --set max_steps=60 \
        --set auto_augment=rand-m9-mstd0.5-inc1 --set mixup=0.8 --set cutmix=1.0 \
        --set reprob=0.25 --set model_ema=true --set num_workers=2 2>&1 | strip | tail -6
    echo "== train smoke: torchrun 1 process (NCCL), bf16, then --resume auto to more steps"
    timeout $(lim) $py -m torch.distributed.run --nproc_per_node 1 /tmp/se_cli.py train \
        --config configs/demo.yaml --output /tmp/smoke_ddp --set device=cuda --set max_steps=40 \
        --set checkpoint_every=20 2>&1 | strip | tail -4
    timeout $(lim) $py -m torch.distributed.run --nproc_per_node 1 /tmp/se_cli.py train \
        --config configs/demo.yaml --output /tmp/smoke_ddp --resume auto --set device=cuda \
        --set max_steps=80 --set checkpoint_every=20 2>&1 | strip | tail -4
    echo "== evaluate --attention on CUDA"
    timeout $(lim) $py /tmp/se_cli.py evaluate /tmp/smoke_ddp --attention 2>&1 | strip | tail -8
}

# evidence SECONDS [HORIZON]: the second benchmark for SECONDS, continuing the record (runs
# recorded there are skipped; every run finished here is written to it at once, so a cut-off
# call still leaves a consistent, paired record in seed order). The record and the runs'
# directories stay on the machine (runs/evidence_v2_gpu: a warm machine keeps ignored files
# between calls), so a second call of the same lent session (`continue`) goes on from the
# runs' checkpoints; the record starts as the committed one and is mirrored into $OUT every
# 10 s. Units start while they are expected to finish within HORIZON (default SECONDS; more
# when a second call will follow) and not in its last 30 s.
evidence_work=runs/evidence_v2_gpu  # kept between the calls of a lent session
[ -n "${SMOKE:-}" ] && evidence_work=/tmp/gpu_session_smoke_evidence
evidence() {
    local seconds=$1 horizon=${2:-$1} work=$evidence_work
    local results=$work/evidence_v2.json
    mkdir -p "$work"
    if [ -z "${SMOKE:-}" ] && [ ! -f "$results" ]; then
        cp benchmarks/results/evidence_v2.json "$results" 2>/dev/null
    fi
    local budget
    budget=$(awk -v s="$horizon" 'BEGIN { m = (s - 30) / 60; printf "%.2f", (m > 0.5 ? m : 0.5) }')
    (while sleep 10; do cp "$results" "$OUT/" 2>/dev/null; done) &
    local mirror=$!
    # shellcheck disable=SC2046  # the flags are words
    timeout $((seconds)) $py benchmarks/evidence_v2.py --device $device "${evidence_extra[@]}" \
        $(data_flags) --time-budget $budget --results "$results" --work-dir "$work" 2>&1 \
        | strip >> "$OUT/evidence.log"
    kill $mirror 2>/dev/null
    cp "$results" "$OUT/evidence_v2.json" 2>/dev/null
    $py benchmarks/evidence_v2.py --report "$OUT/evidence_v2.json" > /dev/null 2>&1
    tail -40 "$OUT/evidence.log"
}

# best_jobs PROBE_JSON: the runs-at-once count with the most steps per second together in the
# probe's engine_parallel rows (8 when the probe has none)
best_jobs() {
    $py - "$1" <<'PY'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1]))["engine_parallel"] if "runs" in r]
    print(max(rows, key=lambda r: r["steps_per_s_together"])["runs"])
except Exception:
    print(8)
PY
}

# use_group PROBE_JSON: "--group" when the probe's group_engine trained 4 copies in one
# process at >= 1.5x the copy-steps per second of 1 (runs trained as one vmapped step pay on
# this GPU), else nothing (runs alone, side by side). Conservative: the 4 copies are baseline,
# se, drloc and se_drloc (the regularisers cost extra), the 1 is the baseline alone.
use_group() {
    $py - "$1" <<'PY'
import json, sys
try:
    rows = {r["copies"]: r["copy_steps_per_s"] for r in json.load(open(sys.argv[1]))["group_engine"]
            if r.get("attention", "explicit") == "explicit"}
    print("--group" if rows[4] >= 1.5 * rows[1] else "")
except Exception:
    print("")
PY
}

# use_fused JSON: "--fused-attention" when group_engine's group of 4 copies took at most 0.9x
# the seconds per group step with the fused attention kernel as with explicit attention
use_fused() {
    $py - "$1" <<'PY'
import json, sys
try:
    rows = {r.get("attention", "explicit"): r["s_per_group_step"]
            for r in json.load(open(sys.argv[1]))["group_engine"] if r["copies"] == 4}
    print("--fused-attention" if rows["fused"] <= 0.9 * rows["explicit"] else "")
except Exception:
    print("")
PY
}

case "${1:-checks}" in
session)
    total=${2:?usage: $0 session SECONDS}
    # THEN=S: a second call, `continue S`, will follow at once on the same machine: plan the
    # evidence's units for both calls
    [ -n "${SMOKE:-}" ] && rm -rf "$evidence_work"
    # PROBE=1: measure again how the evidence should run (about 2 minutes); otherwise the
    # committed measurements decide it (benchmarks/results/gpu_probe_session_cuda.json and
    # gpu_groups_side_by_side_cuda.txt, an H200 on 2026-11-28), and the minutes go to runs
    probe_json=benchmarks/results/gpu_probe_session_cuda.json
    {
        cuda_tests
        if [ -n "${PROBE:-}" ] || [ $device = cpu ]; then
            # only what decides how the evidence runs (a step's device time alone and as
            # vmapped copies; how many runs side by side pay)
            echo "== where a small model's step goes (benchmarks/gpu_probe.py)"
            timeout 200 $py benchmarks/gpu_probe.py --device $device --parts step \
                models_batched group_engine engine_parallel "${quick_probe[@]}" \
                --out "$OUT/gpu_probe.json" 2>&1 | strip | cut -c1-400
            probe_json=$OUT/gpu_probe.json
            attention_json=$probe_json
        else  # about 50 s: a group's attention, explicit against the fused kernel under vmap,
            # and beside it one run alone in the engine's loop after its first 5 epochs
            echo "== a group of 4 copies, explicit against fused attention; a run alone" \
                "(gpu_probe.py)"
            timeout 120 $py benchmarks/gpu_probe.py --device $device --parts group_engine \
                engine_variants --copies-at-once 4 --group-attention explicit fused \
                --engine-variants eager --engine-epochs 8 \
                --out "$OUT/group_attention.json" 2>&1 | strip | cut -c1-400
            attention_json=$OUT/group_attention.json
        fi
    } > "$OUT/checks.txt" 2>&1
    cat "$OUT/checks.txt" | tail -30
    if [ $device = cuda ]; then
        group=$(use_group "$probe_json")
        if [ -n "${PROBE:-}" ]; then  # as many runs side by side as gave the most steps/s
            jobs=$(best_jobs "$probe_json")
        else
            # 8 processes: 6 groups of 4 side by side ran at 0.09-0.10 s per group step
            # (267 copy-steps/s together), 12 runs alone at 0.07-0.10 s per step (125 steps/s);
            # a group in a mix of 12 processes could not finish 2,800 steps in 7 minutes
            jobs=${JOBS:-8}
        fi
        [ -n "$group" ] && group="$group $(use_fused "$attention_json")"
        # start only a unit expected to finish: a group or run at STEP_SECONDS per step (6 groups
        # of 4 side by side took 0.09-0.10 s a group step; runs alone among 12 processes 0.071)
        # shellcheck disable=SC2086  # group: flags, one word each
        evidence_extra=(--jobs "$jobs" --threads 1 $group --step-seconds "${STEP_SECONDS:-0.1}"
            "${selection[@]}")
        echo "== evidence with $jobs runs side by side ${group:-(no groups)} ($probe_json)" \
            "$(data_flags)"
    fi
    left=$((total - (SECONDS - start) - 20))
    if [ $left -lt 240 ]; then  # too little for any run to finish: nothing would be recorded
        echo "== no evidence run: $left s left after the checks ($((SECONDS - start)) s)"
        exit 0
    fi
    echo "== evidence for $left s, planned for $((left + ${THEN:-0})) s (checks took" \
        "$((SECONDS - start)) s)"
    mkdir -p "$evidence_work"
    printf '%s\n' "${evidence_extra[@]}" > "$evidence_work/arrangement"  # for `continue`
    if [ $device = cuda ]; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 10 \
            > /tmp/gpu_util.txt 2>&1 &
        util=$!
    fi
    evidence $left $((left + ${THEN:-0}))
    kill ${util:-} 2>/dev/null
    [ -f /tmp/gpu_util.txt ] && cat /tmp/gpu_util.txt >> "$OUT/evidence.log"
    rm -f "$OUT/evidence_v2.png"
    echo "== session took $((SECONDS - start)) s"
    ;;
continue)
    # the second call of a lent session, at once after `THEN=S session ...` on the same warm
    # machine: the evidence for S - 20 s more, with the first call's arrangement, its record
    # and its runs' checkpoints (a unit cut off by the first call's end resumes)
    total=${2:?usage: $0 continue SECONDS}
    if [ -f "$evidence_work/arrangement" ]; then
        mapfile -t evidence_extra < "$evidence_work/arrangement"
        # what the first call began resumes whatever the time left (else it is lost)
        [ $device = cuda ] && evidence_extra+=(--resume-begun)
        echo "== evidence for $((total - 20)) s more, going on from the first call"
    else  # a fresh machine: the committed probe's arrangement, explicit attention
        [ $device = cuda ] && evidence_extra=(--jobs "${JOBS:-8}" --threads 1 \
            $(use_group benchmarks/results/gpu_probe_session_cuda.json) \
            --step-seconds "${STEP_SECONDS:-0.1}" "${selection[@]}")
        echo "== evidence for $((total - 20)) s (no first call on this machine)"
    fi
    evidence $((total - 20))
    rm -f "$OUT/evidence_v2.png"
    ;;
checks)
    {
        cuda_tests
        echo "== the full probe (benchmarks/gpu_probe.py)"
        timeout 300 $py benchmarks/gpu_probe.py --device $device --parts loss step \
            graphed_step models_batched engine_parallel engine_variants "${probe[@]}" \
            --out "$OUT/gpu_probe.json" 2>&1 | strip | cut -c1-400
        loss_speed 420
        smokes 300
    } > "$OUT/checks.txt" 2>&1
    ;;
evidence)
    nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/evidence_gpu.txt" 2>&1
    evidence $((${2:-10} * 60 - 15))
    ;;
groups)
    # each K: K processes side by side, each training 4 copies as one group (gpu_probe.py
    # group_engine: baseline, se, drloc, se_drloc, 6 epochs): seconds per group step of each
    shift
    ks=("$@")
    [ ${#ks[@]} -gt 0 ] || ks=(3 6)
    for k in "${ks[@]}"; do
        for i in $(seq "$k"); do
            timeout 75 $py benchmarks/gpu_probe.py --device $device --parts group_engine \
                --copies-at-once 4 --engine-epochs 6 ${FUSED:+--group-attention fused} \
                > "/tmp/groups${k}_$i.log" 2>&1 &
        done
        wait
        echo "== $k groups of 4 side by side"
        grep -h "^{'copies'" /tmp/groups"${k}"_*.log
    done 2>&1 | tee "$OUT/groups_side_by_side.txt"
    ;;
levers)
    minutes=${2:-4}
    common=(--device cuda --threads 1 --time-budget "$minutes" --out-dir /tmp/levers)
    # Longer training: 4x the benchmark's epochs at the two smallest sizes.
    $py benchmarks/data_efficiency.py "${common[@]}" --jobs 8 --epochs-scale 4 --sizes 50 100 \
        --arms baseline se se_no_last_skip se_const_0.1 2>&1 | strip > "$OUT/x4epochs.log" &
    # The paper's 14x14 grid (64-px scenes resized to 112, patch 8), same 4x length, n=50.
    $py benchmarks/data_efficiency.py "${common[@]}" --jobs 6 --epochs-scale 4 --img-size 112 \
        --sizes 50 --arms baseline se se_no_last_skip se_const_0.1 2>&1 | strip > "$OUT/img112.log" &
    wait
    cp /tmp/levers/*.json /tmp/levers/*.md "$OUT"/ 2>/dev/null
    # every finished run, also of an invocation cut off before its tables
    $py - "$OUT/lever_runs.json" <<'PY'
import json, pathlib, sys
runs = {str(p): json.loads(p.read_text()) for p in pathlib.Path("runs").glob("data_efficiency_*_cuda/*/*/seed*/result.json")}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=1))
print(len(runs), "finished runs")
PY
    ;;
*)
    echo "usage: $0 session SECONDS | continue SECONDS | checks | evidence MINUTES |" \
        "groups K... | levers MINUTES" >&2
    exit 2
    ;;
esac
