#!/usr/bin/env bash
# Issue 7's GPU comparison as one command, from the project root on the GPU machine (see
# ../shared/reference/gpu-facts.md; build .gpu/ here first with ../shared/tools/gpu-bundle):
#
#   bash benchmarks/gpu_data_path.sh          # Swin-T, COCO head, 480x640 JPEGs -> 800x1088, bf16, 2000 images;
#                                             # then the same with --compile
#   bash benchmarks/gpu_data_path.sh --tiny   # tiny model on CPU, a dozen images: checks that the script runs
#
# PYTHON picks the interpreter (default: python on PATH). Each run prints the stage costs (host CPU and object-store bytes per image), the bare model loop on the same
# device/batch/dtype, the job's end-to-end, marginal and steady rates and their ratios; results go to
# $OUT (the device tool's output folder) or out/gpu-data-path, written as they come.
set -euo pipefail
if [ -f .gpu/install.sh ]; then
    bash .gpu/install.sh
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python="${PYTHON:-python}"
results="${OUT:-out/gpu-data-path}"
mkdir -p "$results"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$results/env.txt"

if [ "${1:-}" = "--tiny" ]; then
    "$python" benchmarks/pipeline_throughput.py --random-model tiny --images 12 --cost-images 4 --image-size 96x128 \
        --device cpu --work-dir "$results/work-tiny" --json "$results/tiny.json" 2>&1 | tee "$results/tiny.log"
    exit 0
fi

common=(--random-model swin-t --processor coco --images 2000 --cost-images 64 --image-size 480x640 --device cuda
        --dtype bfloat16 --batch-size 16 --work-dir "$results/work")
"$python" benchmarks/pipeline_throughput.py "${common[@]}" --json "$results/bf16.json" 2>&1 | tee "$results/bf16.log"
"$python" benchmarks/pipeline_throughput.py "${common[@]}" --compile --json "$results/bf16-compile.json" 2>&1 \
    | tee "$results/bf16-compile.log"
