#!/usr/bin/env bash
# Download (here, with network) the wheels bench/gpu.sh installs on the device machine, whose image
# has torch/torchvision/transformers but not prefect and its dependencies (Python 3.12, x86-64).
#   bash bench/gpu_wheels.sh      # → ./.whl (about 53 MB; ignored through .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl -r bench/gpu-wheels.txt
du -sh .whl
