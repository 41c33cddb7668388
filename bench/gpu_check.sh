#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100, that needs only what such a machine has
# (python3 with torch, timm, numpy, typer, tqdm, tensorboard; no DALI, no install: it runs from
# the checkout). It measures, on the GPU:
#   1. the torch backend's pipeline img/s at 32 and 224 (augmentation off / the tutorial's OneOf),
#      beside the tutorial's per-sample DataLoader path on this machine's CPUs;
#   2. train_step: resnet18 and resnet50 at 32 and 224, bf16 + channels_last, eager vs compiled;
#   3. end_to_end: the torch loader feeding the compiled step, and the headroom ratio;
#   4. a short real training run (r18_cifar_32, 2 epochs, eager) on a synthetic store;
# and prints a table last. Record its output, the card and this command in bench/RESULTS.md:
#   bench/gpu_check.sh [OUT_DIR]          (default bench/out; JSON and the run's summary go there)
# GPU_CHECK_TINY=1 runs the same steps at toy sizes on a CPU (the test suite checks the plumbing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${1:-bench/out}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=${PYTHON:-python3}

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  store=(--train 2000 --test 500)
  bench=(--quick --device cpu --batch-size 16 --model test_resnet --setting cl_fp32 --setting cl_amp)
  run=(smoke --set train.epochs=1 --set data.backend=torch)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  store=(--train 50000 --test 10000)
  bench=(--setting cl_amp --setting compiled_cl_amp)
  # eager: the compiled step is timed by the bench below, and two more compiles (train and eval
  # graphs of the CIFAR-stem model) would cost ~2 of the 8 minutes
  run=(r18_cifar_32 --set train.epochs=2 --set data.backend=torch --set train.compile=false)
fi
"$py" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}, cuda {torch.cuda.is_available()}")'

t0=$(date +%s)
"$py" -m fastcifar prepare --synthetic "${store[@]}" --data-dir "$work/cifar100"
"$py" -m fastcifar train "${run[@]}" --data-dir "$work/cifar100" --out "$work/run"
cp "$work/run/summary.json" "$out/train_summary.json"
"$py" -m fastcifar bench --data-dir "$work/cifar100" --backend tutorial --backend torch \
  "${bench[@]}" --json "$out/gpu_check.json"

# The tables last: what bench/RESULTS.md records.
echo
echo "## GPU check: $(( $(date +%s) - t0 )) s in all; command: bench/gpu_check.sh"
"$py" - "$out/train_summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"\nShort training run: {s['recipe']} ({s.get('model')}, {s.get('image_size')} px), {s['epochs_done']} epochs on a "
      f"synthetic store, {s['backend']} loader, {s['device']}: {s['train_images_per_sec']:,.0f} train img/s, "
      f"best test {s['best_acc']:.2f}% (synthetic data), {s['wall_seconds']:.0f} s.\n")
EOF
"$py" bench/tables.py "$out/gpu_check.json"
