#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine, as one prepared script.
#
#   bash benchmarks/gpu_session.sh checks          # CUDA tests, loss speed, AMP/NCCL training smoke
#   bash benchmarks/gpu_session.sh levers MINUTES  # issue 7's investigation variants on the GPU
#   bash benchmarks/gpu_session.sh evidence MINUTES  # the second benchmark (evidence_v2.py)
#
# `checks` writes the GPU loss table to $OUT/loss_speed_cuda.json: every labeller with its host
# syncs per call, the CUDA-graph capture of the loss, and one training step (bf16, batch 128 or
# the largest that fits) of se_vit_small_patch8_64, vit_small_patch16_224, vit_base_patch16_224
# and vit_small_patch16_384 with and without the regulariser. Tried on CPU with
# `CHECKS_SMOKE=1 bash benchmarks/gpu_session.sh checks`, which runs the same steps on the CPU
# with tiny settings (the real-model rows with batch 2).
#
# Writes its reports to $OUT (default runs/gpu_session). Runs from the repository root with
# PYTHONPATH=src (the GPU image has torch, timm, scipy, scikit-image, safetensors). Fashion-MNIST
# is looked up as usual; with no network, put the four IDX .gz files in
# $SPATIAL_ENTROPY_CACHE/FashionMNIST/raw beforehand.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
py=${PYTHON:-python3}
strip() { tr '\r' '\n' | grep -v -E 'it/s\]|s/it\]|^\s*$'; }

case "${1:-checks}" in
checks)
    if [ -n "${CHECKS_SMOKE:-}" ]; then
        device=cpu
        speed=(--shapes 1 --repeats 1 --reference-repeats 1 --step-batch 4 --model-batch 2
            --models vit_small_patch16_224)
    else
        device=cuda
        speed=()
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        $py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
        echo "== CUDA tests"
        timeout 300 $py -m pytest -q -p no:cacheprovider tests/test_components.py \
            tests/test_entropy.py tests/test_sync_free.py tests/test_attention.py -k cuda -rs \
            2>&1 | tail -8
        echo "== loss speed ($device): labellers, host syncs, CUDA graph, model training steps"
        timeout 420 $py benchmarks/loss_speed.py --device $device --alternatives "${speed[@]}" \
            --out "$OUT/loss_speed_$device.json" 2>&1
        [ -n "${CHECKS_SMOKE:-}" ] && exit 0
        printf 'import sys\nfrom spatial_entropy.cli import main\nsys.exit(main())\n' > /tmp/se_cli.py
        echo "== train smoke: fp16 + GradScaler, RandAugment, Mixup/CutMix, EMA, 2 workers"
        timeout 300 $py /tmp/se_cli.py train --config configs/demo.yaml --output /tmp/smoke_fp16 \
            --set device=cuda --set amp=fp16 --set max_steps=60 \
            --set auto_augment=rand-m9-mstd0.5-inc1 --set mixup=0.8 --set cutmix=1.0 \
            --set reprob=0.25 --set model_ema=true --set num_workers=2 2>&1 | strip | tail -6
        echo "== train smoke: torchrun 1 process (NCCL), bf16, then --resume auto to more steps"
        timeout 300 $py -m torch.distributed.run --nproc_per_node 1 /tmp/se_cli.py train \
            --config configs/demo.yaml --output /tmp/smoke_ddp --set device=cuda --set max_steps=40 \
            --set checkpoint_every=20 2>&1 | strip | tail -4
        timeout 300 $py -m torch.distributed.run --nproc_per_node 1 /tmp/se_cli.py train \
            --config configs/demo.yaml --output /tmp/smoke_ddp --resume auto --set device=cuda \
            --set max_steps=80 --set checkpoint_every=20 2>&1 | strip | tail -4
        echo "== evaluate --attention on CUDA"
        timeout 300 $py /tmp/se_cli.py evaluate /tmp/smoke_ddp --attention 2>&1 | strip | tail -8
    } > "$OUT/checks.txt" 2>&1
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
evidence)
    # The second benchmark protocol, continuing the committed record: runs recorded there are
    # skipped; every run finished here is written to $OUT/evidence_v2.json at once, so a cut-off
    # session still leaves a consistent, paired record (seed order). Commits nothing: copy
    # $OUT/evidence_v2.json to benchmarks/results/ and commit it to continue in a later session.
    minutes=${2:-10}
    results="$OUT/evidence_v2.json"
    [ -f "$results" ] || cp benchmarks/results/evidence_v2.json "$results" 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/evidence_gpu.txt" 2>&1
    # 12 runs side by side (16 cores: each run loads its data on its own core); no run starts
    # in the last 3 minutes (a late run could not finish and is not recorded).
    timeout $((minutes * 60 - 15)) $py benchmarks/evidence_v2.py --device cuda --jobs 12 \
        --threads 1 --time-budget $((minutes > 4 ? minutes - 3 : 1)) --results "$results" \
        --work-dir runs/evidence_v2_cuda 2>&1 | strip > "$OUT/evidence.log"
    $py benchmarks/evidence_v2.py --report "$results" > /dev/null 2>&1
    tail -40 "$OUT/evidence.log"
    ;;
*)
    echo "usage: $0 checks | levers MINUTES | evidence MINUTES" >&2
    exit 2
    ;;
esac
