#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG GPUS [train.py args]   (see dist_run.sh for multi-node variables)
exec "$(dirname "$0")/dist_run.sh" train.py "$2" "$1" "${@:3}"
