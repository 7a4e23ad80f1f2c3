#!/usr/bin/env bash
# Issue 30's GPU checks in one run of at most 9 minutes, on a bare GPU machine that has only this checkout.
#
# Before, on a machine with ../shared and a venv: `bash benchmarks/gpu_assets.sh` copies the weights, CIFAR-10,
# a key, Debian's wrk and the wheels of the extras the machine's image lacks into the ignored gpu-assets/ and .whl/
# (about 42 MB: carried by the device tool, carry=["gpu-assets", ".whl"]; the wheels install into /tmp/site there).
# To continue the preset from an earlier run, unpack its reproduce-gpu.tar.gz into gpu-assets/ first, with the
# key that run used: finished cells are skipped, an interrupted one resumes from its checkpoint.
# Seen on an H200 (2026-12-04, BENCHMARKS.md): versions, bench and serve took about 4.5 minutes together.
# Run:  OUT=/some/folder bash benchmarks/gpu_check.sh       (STAGES="bench preset" to run fewer stages)
# It installs only those wheels (PYTHONPATH=src, the machine's own torch, timm, peft, accelerate), and prints the
# versions first. Each stage runs under its own `timeout`; the preset gets what is left of TOTAL_S.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
OUT="${OUT:-gpu-check-out}"
TOTAL_S="${TOTAL_S:-570}"
STAGES="${STAGES:-versions tests bench serve serve-load service preset}"
ASSETS="${ASSETS:-gpu-assets}"
DEVICE="${DEVICE:-cuda}"  # the serve and serve-load stages' device (DEVICE=cpu: their plumbing on a CPU)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # the serve extra the image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PPVIT_WEIGHTS="$PWD/$ASSETS/vit_tiny_patch16_224.safetensors" PPVIT_CIFAR10="$PWD/$ASSETS/cifar10-jpeg.tar.gz"
export PPVIT_CACHE="${PPVIT_CACHE:-/tmp/ppvit-cache}"
export PATH="$PWD/$ASSETS/bin:$PATH" LD_LIBRARY_PATH="$PWD/$ASSETS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # wrk
PY="${PY:-python3}"
for f in "$PPVIT_WEIGHTS" "$PPVIT_CIFAR10" "$ASSETS/gpu.key"; do
  test -f "$f" || { echo "gpu_check: $f missing (see the top of $0)"; exit 2; }
done

stage() {  # stage NAME SECONDS COMMAND...: its output into $OUT/gpu_check.log (the device tool returns 8 files)
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (at most ${limit} s, $((SECONDS - start)) s in)"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (its time ran out)')" | tee -a "$OUT/gpu_check.log"
}

stage versions 30 "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version())
for name in ("torch", "timm", "peft", "accelerate", "numpy", "safetensors", "fastapi", "uvicorn", "httpx", "pydantic"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY

# the tests that need a GPU (skipped in CI): CUDA graphs of routed passes against eager ones, on the last device
stage tests 120 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/models/test_graphs.py

# (a)-(d): peak, ceiling, pipeline, lora-pe/full, ViT-Ti/16 at 224, batch 512, on 20,000 CIFAR-10 images,
# eager then compiled (each figure printed and saved as it lands)
stage bench 240 "$PY" benchmarks/bench_gpu.py --data "$PPVIT_CIFAR10" --json "$OUT/bench_gpu.json"

# serving on CUDA: one routed pass for 1, 16 and 64 tenants vs the merged model vs one pass per adapter (and
# where routed's device time goes, --profile: it was 0.48-0.64x merged on 2026-12-04, before a pass stopped
# reading the device: a bool() a layer with one image a tenant, an index copied a head),
# and the passes' host time (--host-cost: ViT-Ti's layers at width 8, next to no arithmetic; on the GPU, what
# launching a pass's kernels costs, which bounds a pass of a few images), and whether a routed pass ever makes the
# host wait for the GPU (CUDA's sync debug mode: a blocking copy or a device value read, which the CPU tests' meta
# device cannot see); mixed passes gather from slot tables since 2026-12-05 (fifteenth session); on CUDA it also
# times routed and merged passes replayed as CUDA graphs (`ppvit serve --cuda-graphs`, sixteenth session), and PEFT's
# own adapter_names mixed batch (issue 30: routed >= 3x it; on 2 CPU cores its host time was 5.3x routed's at 16)
stage serve 180 "$PY" benchmarks/bench_serve.py --device "$DEVICE" --size 224 --batch 64 --tenant-counts 1,16,64 \
  --repeats 5 --skip-loopback --profile --host-cost
# then `ppvit serve --device $DEVICE` under wrk (a C client in its own process; bench_serve's loopback clients shared
# the server's interpreter: 148.5 requests/s, p50 175 ms, p99 799 ms on 2026-12-04), 16 tenants of ViT-Ti/16 at
# 224, one image a request, then 8: requests/s, p50/p99, the server's CPU per request (BENCHMARKS.md: on 2 CPU
# cores the server's CPU per request fell 0.52-0.68x since, a pass's images go to the device as uint8, its logits
# come back in one copy, gc is frozen); the server needs the extra `serve`, wrk comes from gpu-assets/
# (and at 8 images a request with --cuda-graphs: each pass one graph launch); SERVE_LOAD: the runs, comma-separated
IFS=, read -ra runs <<< "${SERVE_LOAD:-1,8,8 --cuda-graphs}"
for run in "${runs[@]}"; do
  # shellcheck disable=SC2086  # run: the images, then a flag
  set -- $run
  stage serve-load 70 "$PY" benchmarks/bench_serve_overhead.py --device "$DEVICE" --model vit_tiny_patch16_224 \
    --size 224 --weights "$PPVIT_WEIGHTS" --tenants 16 --connections 32 --images "$@" --seconds 8
done

# a service job trained on a CUDA slot (the micro ViT: the slot's path, not its speed)
stage service 70 "$PY" benchmarks/bench_service.py --quick --train-device cuda:0

# issue 28 (opt-in: STAGES="versions mixing"): lora-pe on the dense mixings beside shuffle, the gpu preset's cells
# (224, all of CIFAR-10, 10 epochs), 3 seeds, one key: 9 cells of about 45 s
stage mixing "${MIXING_S:-480}" "$PY" -m ppvit.cli reproduce --preset gpu --one-process --minutes 0 \
  --methods lora-pe --schemes shuffle,mix,lift --out "$ASSETS/reproduce-gpu-mixing" --key "$ASSETS/gpu.key"
for f in results.md results.json; do
  test -f "$ASSETS/reproduce-gpu-mixing/$f" && cp "$ASSETS/reproduce-gpu-mixing/$f" "$OUT/mixing-$f"
done

# the gpu preset, in one process, within what is left (its budget shrinks the cells where slower, and says so)
# (the estimate and the trial cell take about a minute of it). PRESET_ARGS="--minutes 0" keeps all 50,000
# images (in a fresh ASSETS/reproduce-gpu: a budget, once chosen, stands for its folder) over several runs.
left=$((TOTAL_S - (SECONDS - start) - 30))
if [ "$left" -gt 60 ]; then
  # shellcheck disable=SC2086  # PRESET_ARGS: flags, one a word
  stage preset "$left" "$PY" -m ppvit.cli reproduce --preset gpu --one-process --out "$ASSETS/reproduce-gpu" \
    --key "$ASSETS/gpu.key" --minutes "$(awk "BEGIN {print ($left - 60) / 60}")" ${PRESET_ARGS:-}
  for f in results.md results.json; do
    test -f "$ASSETS/reproduce-gpu/$f" && cp "$ASSETS/reproduce-gpu/$f" "$OUT/preset-$f"
  done
  # finished cells (their configs and results, no key, no weights) to continue in a later run
  test -d "$ASSETS/reproduce-gpu/cells" && tar -czf "$OUT/reproduce-gpu.tar.gz" -C "$ASSETS" \
    --exclude='*.pt' --exclude='*.safetensors' --exclude='*.key' reproduce-gpu
fi
echo "gpu_check: $((SECONDS - start)) s in all; results in $OUT"
