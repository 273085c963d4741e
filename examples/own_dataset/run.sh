#!/usr/bin/env bash
# Your own robot data, end to end at toy size (README: "Train on your own robot data"):
# recordings -> RLDS dataset -> inspect -> train -> evaluate -> serve -> query like deploy.py.
#
#   bash examples/own_dataset/run.sh            # WORK=/tmp/my_robot STEPS=200 PORT=8000 by default
#
# The model is the tiny `debug` preset of configs/debug.py (the Llama-2 tokenizer shipped in
# tests/fixtures/data); fine-tuning OpenVLA-7B is the same commands with configs/finetune.py.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
WORK=${WORK:-/tmp/my_robot}
STEPS=${STEPS:-200}
PORT=${PORT:-8000}
PY=${PYTHON:-python}
EX=examples/own_dataset

# 1. Recordings (stand-in for your logs) -> 2. the RLDS dataset (a tfds GeneratorBasedBuilder).
$PY $EX/make_recordings.py --out="$WORK/raw"
$PY $EX/build.py --manual_dir="$WORK/raw" --data_dir="$WORK/data"
# 3. Look at it as the training pipeline will.
$PY -m vla_jax.data.inspect --data_dir="$WORK/data" --dataset=my_robot_dataset \
    --dataset_configs=$EX/dataset_config.json --out="$WORK/inspect"
# 4. Train. The checkpoint records data_dir, the dataset config's content and the tokenizer.
$PY train.py --config=configs/debug.py --workdir="$WORK/run" --config.data.data_dir="$WORK/data" \
    --config.data.mixture=my_robot_dataset --config.data.dataset_configs=$EX/dataset_config.json \
    --config.num_steps="$STEPS" --config.log.progress=false ${TRAIN_FLAGS:-}
# 5. Evaluate on the held-out split of the training data: nothing but the checkpoint.
$PY eval.py --checkpoint="$WORK/run" --progress=false
# 6. Serve it and 7. query it as an OpenVLA deploy.py client.
$PY -m vla_jax.serve --checkpoint="$WORK/run" --port="$PORT" --max_batch=1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    $PY -c "import requests; requests.get('http://127.0.0.1:$PORT/health', timeout=2).raise_for_status()" \
        2>/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "the server stopped" >&2; exit 1; }
    sleep 1
done
$PY $EX/client.py --url="http://127.0.0.1:$PORT" --recording="$WORK/raw/val/episode_0000.npz"
$PY $EX/client.py --url="http://127.0.0.1:$PORT" --recording="$WORK/raw/val/episode_0000.npz" --gripper=dataset
