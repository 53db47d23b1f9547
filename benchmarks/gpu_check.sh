#!/usr/bin/env bash
# The GPU check: prcore's CUDA paths on a real GPU, in one call. Run from the repository root:
#
#     benchmarks/gpu_check.sh OUT [STAGE ...]        stages (default: all, in this order):
#       build        the full-size SD 1.5 and SDXL folders (random weights, fp16-only, drawn on the GPU)
#       tests        tests/test_cuda.py (bf16/fp16 DCO steps, CUDA vs CPU images, compile and channels-last
#                    vs eager, max_batch_rows vs peak memory on the full-size SD 1.5 at 512 px)
#       cli          the user's path: `prcore train` and `prcore sample` on the full-size SDXL folder,
#                    --device cuda, bfloat16 (the sidecar and training.json record device, dtype, peak memory)
#       suite-sd15   benchmarks/gpu_suite.py on SD 1.5 (512 px, 50 steps), fp16 and bf16, the speed options
#       suite-sdxl   the same on SDXL (1024 px, 30 steps)
#                    (SUITE_SD15_ARGS / SUITE_SDXL_ARGS: further gpu_suite.py arguments, e.g. --dtypes, --options)
#
# Writes 7 files to OUT (the device tool brings back 8 at most): stages.txt (machine, versions, each
# stage's exit code and seconds), tests.log, cuda_report.jsonl, cli.log, suite.log (with the suite's tables)
# and suite-sd15/gpu_suite.json, suite-sdxl/gpu_suite.json.
# Needs torch with CUDA, transformers, peft, accelerate, safetensors, typer, rich, pytest; a folder .whl of
# wheels (diffusers, ...) is installed into /tmp/site first when present. Each stage runs even if one
# before it failed. WORK (default /tmp/gpu-work) holds the model folders; a folder already built is reused.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT [build tests cli suite-sd15 suite-sdxl]}
shift
STAGES=${*:-build tests cli suite-sd15 suite-sdxl}
WORK=${WORK:-/tmp/gpu-work}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # cpu only for a dry run of the script itself
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}  # the wheels the GPU machine lacks
if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, diffusers, transformers, peft; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1
} >"$OUT/stages.txt"

stage() {  # stage NAME LOG COMMAND...: run, record exit code and seconds
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name" | tee -a "$OUT/$log"
  "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
}

build() {
  for arch in sd15 sdxl; do
    [ -f "$WORK/$arch/model_index.json" ] || $PY -m prcore.method.full_size "$arch" "$WORK/$arch" --fp16-only --device "$DEVICE" || return 1
  done
}

cli() {
  local app='from prcore.cli import build_app; build_app("train", "sample")()'
  $PY -c 'import sys, numpy as np; from PIL import Image; import os; os.makedirs(sys.argv[1], exist_ok=True)
rng = np.random.default_rng(0)
[Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/{i}.png") for i in range(4)]' "$WORK/refs" || return 1
  rm -rf "$WORK/cli-lora" "$WORK/cli-out"
  time $PY -c "$app" train --model "$WORK/sdxl" --images "$WORK/refs" --class-noun dog --out "$WORK/cli-lora" \
    --train-steps 20 --device "$DEVICE" --dtype bfloat16 --no-progress || return 1
  time $PY -c "$app" sample --model "$WORK/sdxl" --lora "$WORK/cli-lora" --prompt "a {subject} on the beach" \
    --class-noun dog --out "$WORK/cli-out" --device "$DEVICE" --dtype bfloat16 --num-images 2 --num-inference-steps 30 --no-progress || return 1
  $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); r.pop("losses"); print(json.dumps(r, indent=1))' "$WORK/cli-lora/training.json"
  cat "$WORK"/cli-out/*-000.json
}

for s in $STAGES; do
  case $s in
    build) stage build stages.txt build ;;
    tests) PRCORE_SD15_DIR=$WORK/sd15 PRCORE_CUDA_REPORT=$OUT/cuda_report.jsonl \
             stage tests tests.log $PY -m pytest tests/test_cuda.py -v -rA -p no:cacheprovider --timeout 600 ;;
    cli) stage cli cli.log cli ;;
    suite-sd15) stage suite-sd15 suite.log $PY benchmarks/gpu_suite.py --models sd15 --work "$WORK" --out "$OUT/suite-sd15" --repeats 1 \
                  ${SUITE_SD15_ARGS:-} ;;
    suite-sdxl) stage suite-sdxl suite.log $PY benchmarks/gpu_suite.py --models sdxl --work "$WORK" --out "$OUT/suite-sdxl" --repeats 1 \
                  ${SUITE_SDXL_ARGS:-} ;;
    *) echo "unknown stage $s" | tee -a "$OUT/stages.txt" ;;
  esac
done
rm -f "$OUT"/suite-*/gpu_suite.md  # the same tables are in suite.log
cat "$OUT/stages.txt"
