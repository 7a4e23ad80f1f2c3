#!/usr/bin/env bash
# The wheels gpu_check.sh needs on the GPU machine's image (Python 3.12; it has torch, timm, peft, accelerate,
# httpx, prometheus-client, pyyaml, but not the `serve` extra's fastapi/uvicorn/pydantic nor the `data` extra's
# webdataset: seen 2026-12-04, bench_service failed without webdataset; pytest for the CUDA-only tests). Run here, where pip reaches an index;
# the versions are the ones this checkout's venv has (tested), downloaded for that machine into the ignored .whl/, then carried: run(carry=["gpu-assets", ".whl"])
# (gpu_assets.sh runs this with the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PKGS="fastapi starlette pydantic pydantic_core annotated-types typing-inspection typing_extensions opentelemetry-api
  uvicorn webdataset braceexpand pytest pluggy iniconfig packaging pygments"
rm -rf .whl  # one version of each: two of a package make gpu_check.sh's install fail
for p in $PKGS; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/ {print $2}')
  test -n "$v" || { echo "gpu_wheels: $p is not installed in $PY's environment (make venv first)"; exit 2; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$p==$v"
done
ls .whl
