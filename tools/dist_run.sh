#!/usr/bin/env bash
# Shared torchrun launcher of dist_train.sh and dist_test.sh: dist_run.sh SCRIPT NPROC ARGS...
# One process per GPU (or, without a GPU, per CPU worker over gloo). Multi-node: NNODES, NODE_RANK, MASTER_ADDR,
# PORT.
SCRIPT=$1
NPROC=$2
DIR=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-"$DIR/../.venv/bin/python"}
[ -x "$PY" ] || PY=python

PYTHONPATH="$DIR/..":$PYTHONPATH \
exec "$PY" -m torch.distributed.run \
    --nnodes=${NNODES:-1} \
    --node_rank=${NODE_RANK:-0} \
    --master_addr=${MASTER_ADDR:-127.0.0.1} \
    --nproc_per_node=$NPROC \
    --master_port=${PORT:-29500} \
    "$DIR/$SCRIPT" "${@:3}" --launcher pytorch
