#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG CHECKPOINT GPUS [test.py args]. One process per GPU (or per CPU worker with gloo when
# no GPU is present), launched with torchrun. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT.
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
DIR=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-"$DIR/../.venv/bin/python"}
[ -x "$PY" ] || PY=python

PYTHONPATH="$DIR/..":$PYTHONPATH \
"$PY" -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    "$DIR/test.py" \
    $CONFIG \
    $CHECKPOINT \
    --launcher pytorch ${@:4}
