#!/usr/bin/env bash
# Train a recipe in the image on the host's GPUs, with ./data and ./runs mounted:
#   docker/train.sh r18_arcface_224 [--set train.epochs=30 ...]
#   NPROC=8 docker/train.sh r50_arcface_224     # 8 GPUs, one process each, via torchrun
# Env: FASTCIFAR_IMAGE (default fastcifar:latest), GPUS (docker --gpus value, default all), NPROC (default 1).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: docker/train.sh RECIPE [fastcifar train options...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p data runs
image=${FASTCIFAR_IMAGE:-fastcifar:latest}
nproc=${NPROC:-1}
tty=()
if [ -t 1 ]; then tty=(-it); fi   # progress bars when run from a terminal, plain logs otherwise

# --ipc=host: DALI and torch workers share memory through /dev/shm, which Docker caps at 64 MB.
run=(docker run --rm "${tty[@]}" --gpus "${GPUS:-all}" --ipc=host
     --ulimit memlock=-1 --ulimit stack=67108864
     -v "$PWD/data:/data" -v "$PWD/runs:/workspace/runs"
     -e FASTCIFAR_DATA=/data/cifar100
     --user "$(id -u):$(id -g)" -e HOME=/tmp)   # files in runs/ belong to you, caches go to /tmp
if [ "$nproc" -gt 1 ]; then   # torchrun behind NGC's entrypoint (driver check, CUDA compatibility)
  exec "${run[@]}" --entrypoint /opt/nvidia/nvidia_entrypoint.sh "$image" \
       torchrun --standalone --nproc-per-node "$nproc" -m fastcifar train "$@"
fi
exec "${run[@]}" "$image" train "$@"
