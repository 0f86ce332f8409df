#!/usr/bin/env bash
# The test suite (CPU only; GPU tests live in tests/gpu and run on the GPU machine with `-m gpu`).
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
