#!/usr/bin/env bash
# The GPU check: one script, about 7 minutes on one H200, run from the checkout with what that
# machine has (python3 with torch, timm, numpy, typer, tqdm, tensorboard) plus DALI unpacked to
# /tmp/dali-site (../shared/gpu/pack-dali.sh, then .dali3/unpack.sh there; put on PYTHONPATH here
# if the folder exists, or DALI_SITE=DIR). Steps, in this order (what the issue's targets need
# first, the eager extras last), each logged to OUT/STEP.log:
#   env            versions, the card; fails if DALI does not import
#   store          a synthetic store, 50000 + 10000 images (throughput does not depend on the pictures)
#   agree          DALI-GPU, DALI-CPU and torch give the same images for one seed (bench/agree.py:
#                  OneOf, TrivialAugment, RandAugment), batches of 1-4 with empty conditional
#                  branches, torch's images with TF32 on
#   pipeline       img/s of DALI, torch and the tutorial's path at 224/32 (in that order): no aug,
#                  OneOf, TrivialAugment, RandAugment
#   train_compiled r18_cifar_32 compiled, bf16, on DALI-GPU: 3 epochs (291 steps), 1000 test
#                  images (eval batches of 512 and 488), TORCH_LOGS=recompiles: recompiles counted;
#                  its one-cycle schedule ends at 1% of the peak LR, not 0, so that ...
#   resume         --resume it for a 4th epoch, at that final LR (the compiled graphs come from
#                  inductor's cache)
#   train_step     the ladder for resnet18 at 224 and 32: eager vs compiled, bf16 channels_last
#   end_to_end     DALI feeding the compiled resnet18 step at 224 and 32: the graphs train_step
#                  compiled (same inputs), so inductor's cache spares a second compile
#   train_step_r50 the same ladder for resnet50 (each compile of it takes longest)
#   fp16           r18_cifar_32 in fp16 with a GradScaler, a fifth of an epoch, eager
#   arcface224     a few steps of r18_arcface_224 (no pretrained weights offline)
#   teacher        a tiny r50_arcface_224 run, the teacher of ...
#   distill        ... a few steps of r18_arcface_kd: two views (32 for the student, 224 for it)
# then prints one table last (bench/gpu_report.py, also OUT/summary.md). A step that fails or
# runs out of time is recorded and the rest still run; the exit status is 1 if any step did not
# pass. The bench steps write their JSON after every row, so one cut by its time keeps the rows
# it measured (the table marks them partial). GPU_CHECK_BUDGET (seconds, default 420) caps the
# whole run: a step gets what is left, and steps that no longer fit are skipped (and named).
# GPU_CHECK_STEPS="train_step end_to_end" runs only those (the store is always made): the way to
# finish a check that ran out of time. Record the table, card and command in bench/RESULTS.md:
#   bench/gpu_check.sh [OUT_DIR]          (default bench/out)
# GPU_CHECK_TINY=1 runs the same steps at toy sizes on a CPU (tests/test_bench.py runs it): same
# commands and files, tiny models and stores, no compiling (a CPU compile takes ~40 s), so there
# the recompile count only proves the log is read.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd) || exit 2
out=${1:-$root/bench/out}
if ! mkdir -p "$out" || ! out=$(cd "$out" && pwd); then echo "gpu_check.sh: cannot write to $out" >&2; exit 2; fi
cd "$root" || exit 2
site=${DALI_SITE:-/tmp/dali-site}
if [ -d "$site" ] && [[ ":${PYTHONPATH:-}:" != *":$site:"* ]]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data="$work/cifar100"
only=" ${GPU_CHECK_STEPS:-} "

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  budget=${GPU_CHECK_BUDGET:-600}
  store=(--train 1200 --test 300)
  agree=(--device cpu --rows 100 --batch 50 --specs oneof)
  # the recipes' own settings, shrunk: timm's 0.4M-parameter test_resnet, a step or two per epoch
  tiny=(--set model.name=test_resnet --set model.pretrained=false --set train.compile=false --set train.device=cpu)
  compiled=("${tiny[@]}" --set data.batch_size=50 --set data.subset=0.05 --set data.test_subset=0.3  # eval 50 + 40
            --set schedule.final_lr=0.01)
  fp16=("${tiny[@]}" --set data.batch_size=50 --set data.subset=0.05 --set data.test_subset=0.2)
  few=("${tiny[@]}" --set data.batch_size=10 --set data.subset=0.01 --set data.test_subset=0.02)  # 224 px on a CPU
  pipeline=(--quick --device cpu --batch-size 2)
  ladder=(--quick --device cpu --batch-size 2 --model test_resnet --setting cl_fp32 --setting cl_amp)
  e2e=(--quick --device cpu --batch-size 2 --model test_resnet --setting cl_amp)
  ladder_r50=(--quick --device cpu --batch-size 2 --model test_resnet --setting cl_amp)
else
  budget=${GPU_CHECK_BUDGET:-420}
  store=(--train 50000 --test 10000)
  agree=(--device cuda)
  compiled=(--set data.test_subset=0.1 --set schedule.final_lr=0.01)         # eval batches of 512 and 488
  fp16=(--set data.subset=0.2 --set data.test_subset=0.1)
  few=(--set model.pretrained=false --set data.subset=0.05 --set data.test_subset=0.05)
  pipeline=(--device cuda)
  ladder=(--model resnet18 --setting cl_amp --setting compiled_cl_amp)
  e2e=(--model resnet18 --setting compiled_cl_amp)
  ladder_r50=(--model resnet50 --setting cl_amp --setting compiled_cl_amp)
fi
train=("$py" -m fastcifar train --data-dir "$data" --set data.backend=dali)

t0=$(date +%s)
printf 'step\tstatus\tseconds\n' > "$out/steps.tsv"
status=0

# step NAME CAP_SECONDS CMD...: run CMD with at most CAP seconds (and what the budget has left),
# output to OUT/NAME.log; record NAME, ok | FAILED (rc) | TIMEOUT | SKIPPED, seconds.
step() {
  local name=$1 cap=$2 left start rc result
  shift 2
  if [ -n "${only// /}" ] && [[ "$only" != *" $name "* ]] && [ "$name" != store ]; then return 0; fi
  left=$(( budget - ($(date +%s) - t0) ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tSKIPPED (no time left)\t0\n' "$name" >> "$out/steps.tsv"
    echo "== $name: SKIPPED, the ${budget} s budget is spent"
    status=1
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (at most $cap s)"
  start=$(date +%s)
  timeout --kill-after=20 "$cap" "$@" > "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124|137) result="TIMEOUT after $cap s" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$result" "$(( $(date +%s) - start ))" >> "$out/steps.tsv"
  if [ "$rc" != 0 ]; then
    status=1
    echo "   $result; the end of $out/$name.log:"
    tail -n 15 "$out/$name.log" | sed 's/^/   | /'
  fi
}

# copy a run's summary.json beside the logs (a run that died has none)
keep() { [ -f "$1/summary.json" ] && cp "$1/summary.json" "$out/$2_summary.json"; return 0; }

step env 60 "$py" - "$out/env.json" <<'EOF'
import json, subprocess, sys
from importlib.metadata import version
import torch
env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
       "timm": version("timm"), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired):
    env["nvidia_smi"] = None
try:
    import nvidia.dali
    env["dali"] = nvidia.dali.__version__
except ImportError as e:
    env["dali"] = None
    env["dali_error"] = str(e)
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
sys.exit(0 if env["dali"] else "DALI does not import: unpack it (../shared/gpu/unpack-dali.sh) and put /tmp/dali-site on PYTHONPATH")
EOF

step store 120 "$py" -m fastcifar prepare --synthetic "${store[@]}" --data-dir "$data"
step agree 150 "$py" bench/agree.py --data-dir "$data" --json "$out/agree.json" "${agree[@]}"
# DALI at 224 first (the issue's pipeline target), the tutorial's slow per-image path last
step pipeline 120 "$py" -m fastcifar bench --stage pipeline --size 224 --size 32 --backend dali --backend torch \
  --backend tutorial "${pipeline[@]}" --data-dir "$data" --json "$out/pipeline.json"

TORCH_LOGS=recompiles step train_compiled 180 "${train[@]}" r18_cifar_32 --set train.epochs=3 "${compiled[@]}" --out "$work/compiled"
keep "$work/compiled" train_compiled
TORCH_LOGS=recompiles step resume 120 "${train[@]}" --resume "$work/compiled" --set train.epochs=4 "${compiled[@]}"
keep "$work/compiled" resume

# resnet18's step and what DALI feeding it gives (the end_to_end / step targets), then resnet50's
# step; the issue's step targets are at 224 px: measured first
step train_step 200 "$py" -m fastcifar bench --stage train_step --size 224 --size 32 "${ladder[@]}" --data-dir "$data" \
  --json "$out/train_step.json"
step end_to_end 120 "$py" -m fastcifar bench --stage end_to_end --size 224 --size 32 --backend dali "${e2e[@]}" \
  --data-dir "$data" --json "$out/end_to_end.json"
step train_step_r50 200 "$py" -m fastcifar bench --stage train_step --size 224 --size 32 "${ladder_r50[@]}" \
  --data-dir "$data" --json "$out/train_step_r50.json"

step fp16 90 "${train[@]}" r18_cifar_32 --set train.amp=fp16 --set train.compile=false --set train.epochs=1 "${fp16[@]}" \
  --out "$work/fp16"
keep "$work/fp16" fp16
step arcface224 90 "${train[@]}" r18_arcface_224 --set train.epochs=1 --set train.compile=false "${few[@]}" \
  --out "$work/arcface224"
keep "$work/arcface224" arcface224
step teacher 90 "${train[@]}" r50_arcface_224 --set train.epochs=1 --set train.compile=false "${few[@]}" \
  --out "$work/teacher"
keep "$work/teacher" teacher
step distill 90 "${train[@]}" r18_arcface_kd --set distill.teacher="$work/teacher" --set train.epochs=1 \
  --set train.compile=false "${few[@]}" --out "$work/distill"
keep "$work/distill" distill

# The table last: what bench/RESULTS.md records.
echo
echo "## GPU check: $(( $(date +%s) - t0 )) s in all; command: ${GPU_CHECK_TINY:+GPU_CHECK_TINY=$GPU_CHECK_TINY }bench/gpu_check.sh"
"$py" bench/gpu_report.py "$out" || status=1
exit $status
