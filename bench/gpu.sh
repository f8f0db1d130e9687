#!/usr/bin/env bash
# One GPU benchmark run for the `device` tool (H100/H200): prepared to run once, under ~8 minutes.
#   run: bash bench/gpu.sh            (writes bench/results-gpu.jsonl and prints the table)
# The device machine has no network: it needs torch (CUDA) + torchvision (for nvjpeg), transformers,
# prefect, pyarrow, fsspec there already, or wheels carried in ./wheelhouse (pip install --no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d wheelhouse ]; then python3 -m pip install -q --no-index --find-links wheelhouse -e . || true; fi
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PREFECT_HOME="${OUT:-/tmp}/prefect"
python3 bench/throughput.py --device cuda --images "${IMAGES:-4000}" --batch-size 256 --snippet-images 200 \
  --rss-images 1000 20000 --json "${OUT:-bench}/results-gpu.jsonl"
