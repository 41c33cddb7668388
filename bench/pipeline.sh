#!/usr/bin/env bash
# Reproduce the README's pipeline table: loader images/s per backend (DALI, torch) at 32 and 224 px,
# augmentation off, the tutorial's OneOf (p=1), TrivialAugment and RandAugment, beside the
# tutorial's per-sample DataLoader path,
# all in one run, batch 250. For the tutorial's real cv2 + albumentations baseline install the
# bench extra first: pip install -e ".[bench]". Run it on a quiet machine: the load is printed
# before and after, and a busy CPU shows up in every figure.
#   bench/pipeline.sh [OUT.json]      (default bench/pipeline_cpu.json; extra args go to fastcifar bench)
# An existing OUT is replaced only if a bench wrote it: move the checkout's copy away to rerun into it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/pipeline_cpu.json}
shift || true
echo "load before: $(uptime)"
fastcifar bench --stage pipeline --json "$out" "$@"
echo "load after:  $(uptime)"
