# Sourced by scripts/main.sh and scripts/test.sh: creates .venv (once) and installs oatoplan with its test extras.
# llama-cpp-python 0.3.36 is built from source the first time (about 6 minutes on 2 cores); pip caches the wheel.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
export PATH="$PWD/.venv/bin:$PATH"
