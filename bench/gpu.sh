#!/usr/bin/env bash
# The one prepared GPU benchmark run (H100/H200 through the `device` tool), under ~9.5 minutes, in ONE
# device call (a second call ~30 s later finds the machine given back and pays another start):
#   bash bench/gpu.sh     # results in $OUT (or bench/): results-gpu.jsonl, nvjpeg-probe.json,
#                         # priority.json, gpu.log; call the device tool with timeout_s 590
# The device machine has no network but has torch (CUDA), torchvision, transformers, pyarrow, fsspec;
# what oncoflow needs beyond that (prefect, pydantic, s3fs, ...) travels as wheels in ./.whl (see
# bench/README.md for the pip download command) and is installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-bench}"
# Everything this script prints, from here on, is kept in $DEST/gpu.log (a new one per run): there is
# one try per session. The tee is waited for at the end, so the last lines are never lost.
exec {console}>&1 > >(tee "$DEST/gpu.log") 2>&1
tee_pid=$!
if [ ! -d .whl ]; then
  echo "WARNING: no .whl folder: call the device tool with carry: [\".whl\"] (built by bench/gpu_wheels.sh);" \
       "without it prefect and the other wheels are missing and the flow sections fail"
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v -i "warning" | tail -3
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PREFECT_HOME=/tmp/prefect-home PYTHONUNBUFFERED=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120  # a cold temporary server took 12 s on 2 CPUs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import torch, torchvision, transformers, prefect
from torchvision.io import decode_jpeg, encode_jpeg
print("torch", torch.__version__, "torchvision", torchvision.__version__, "transformers", transformers.__version__,
      "prefect", prefect.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
jpeg = encode_jpeg(torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8))
print("nvjpeg decode:", tuple(decode_jpeg([jpeg, jpeg], device="cuda")[0].shape))
PY
# How nvjpeg treats odd and damaged JPEGs (a few seconds): what the CPU tests cannot show.
timeout 60 python3 bench/nvjpeg_probe.py --device cuda --json "$DEST/nvjpeg-probe.json" 2>&1 \
  | grep --line-buffered -v -E "it/s\]|Loading weights|Writing model|INFO"
probe=${PIPESTATUS[0]}
[ "$probe" -eq 0 ] || echo "FAILED bench/nvjpeg_probe.py (exit status $probe): see above; the benchmark goes on"
# The host-decoding engine runs (~1,000 img/s on a GPU machine) take 4,000 of the 16,000 images: the
# 2,000 distinct ones and their first links, enough for their rate and for the fp32 reference.
timeout "${BENCH_TIMEOUT:-400}" python3 bench/throughput.py --device cuda --images "${IMAGES:-16000}" \
  --unique-images 2000 --batch-size "${BATCH:-256}" --snippet-images 200 --pipeline-images 500 \
  --cpu-decode-images 4000 \
  --rss-images 0 0 --discovery-files 0 --flow-shard-sizes 4000 10000 \
  --json "$DEST/results-gpu.jsonl" 2>&1 | grep --line-buffered -v -E "it/s\]|Loading weights|Writing model|INFO"
status=${PIPESTATUS[0]}
case "$status" in
  0) echo "bench/throughput.py: every section ran" ;;
  124) echo "bench/throughput.py was cut off after ${BENCH_TIMEOUT:-400} s: the figures so far are in $DEST/results-gpu.jsonl.partial" ;;
  *) echo "bench/throughput.py exit status $status: a section failed, see FAILED and its traceback above" ;;
esac
# Which defaults the figures call for (bench/README.md, "Ready for the next GPU session")
if [ "$status" -eq 0 ] && [ -s "$DEST/results-gpu.jsonl" ]; then
  python3 bench/decide.py "$DEST/results-gpu.jsonl"
elif [ -s "$DEST/results-gpu.jsonl.partial" ]; then
  python3 bench/decide.py "$DEST/results-gpu.jsonl.partial"
fi
# GIL or GPU, and libnvjpeg called directly on a high-priority stream (bench/nvjpeg_priority.py; it
# saves its JSON after each part, so a cut-off run keeps what it measured).
timeout "${PRIORITY_TIMEOUT:-120}" python3 bench/nvjpeg_priority.py --seconds 2.5 --json "$DEST/priority.json" 2>&1 \
  | grep --line-buffered -v -E "it/s\]|Loading weights|Writing model|INFO"
priority=${PIPESTATUS[0]}
[ "$priority" -eq 0 ] || echo "bench/nvjpeg_priority.py exit status $priority (124: cut off): see above and $DEST/priority.json"
exec >&"$console" 2>&1   # close the pipe into tee, then wait for it to write the last lines
wait "$tee_pid"
exit "$status"
