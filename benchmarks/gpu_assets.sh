#!/usr/bin/env bash
# What gpu_check.sh needs that a bare GPU machine lacks, into the checkout's ignored folders (then
# run(carry=["gpu-assets", ".whl"]), about 42 MB): ImageNet ViT-Ti/16 and CIFAR-10 from ../shared, a key (kept
# when there: a continued preset needs the key of its cells), Debian's wrk with its libluajit (the serving load:
# a C client in a process of its own; wrk needs GLIBC 2.34 and libssl.so.3, which Ubuntu 24.04 has), and the
# wheels of the extras the machine's image lacks (gpu_wheels.sh). Run where ../shared and a venv are.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
ASSETS="${ASSETS:-gpu-assets}"
mkdir -p "$ASSETS/bin" "$ASSETS/lib"
cp "$SHARED/weights/vit_tiny_patch16_224.safetensors" "$SHARED/datasets/cifar10-jpeg.tar.gz" "$ASSETS/"
test -f "$ASSETS/gpu.key" || PYTHONPATH=src .venv/bin/python -m ppvit.cli keygen "$ASSETS/gpu.key"
wrk=$(command -v wrk) || { echo "gpu_assets: wrk not found (Debian: apt-get install wrk)"; exit 2; }
cp "$wrk" "$ASSETS/bin/"
luajit=$(ldd "$wrk" | awk '/libluajit/ {print $3}')
test -f "$luajit" || { echo "gpu_assets: $wrk links no libluajit that ldd can find"; exit 2; }
cp -L "$luajit" "$ASSETS/lib/"
bash benchmarks/gpu_wheels.sh >/dev/null
du -sh "$ASSETS" .whl
