# Sourced by scripts/main.sh and scripts/test.sh: creates .venv (once), installs oatoplan with its test extras, then
# replaces llama-cpp-python with the patched build (oatoplan build --cpu). The first run builds llama-cpp-python
# twice from source (stock, as a dependency, then patched: about 6 minutes each on 2 cores); pip caches the first,
# oatoplan (~/.cache/oatoplan) the second, so later runs take seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# rebuild when the installed llama.cpp lacks this series or the RPC backend (a build of an older oatoplan)
if ! .venv/bin/python -c 'import sys, llama_cpp; from oatoplan.build import series, series_hash
from oatoplan.machine import loaded_series
sys.exit(0 if (loaded_series() or "").startswith(series_hash(series()) + ":") and llama_cpp.llama_supports_rpc() else 1)' 2>/dev/null; then
  .venv/bin/oatoplan build --cpu
fi
export PATH="$PWD/.venv/bin:$PATH"
