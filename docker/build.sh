#!/usr/bin/env bash
# Build the fastcifar image: docker/build.sh [extra docker build args, e.g. --build-arg BASE=...]
set -euo pipefail
cd "$(dirname "$0")/.."
docker build -f docker/Dockerfile -t "${FASTCIFAR_IMAGE:-fastcifar:latest}" "$@" .
