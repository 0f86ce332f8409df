#!/usr/bin/env bash
# Compile and run benchmarks/matvec_kernel.c: ggml's Q4_K/Q6_K dot products vs oatoplan's AVX-512 VNNI ones, bitwise
# check and weight GB/s at several thread counts (JSON lines on stdout, a header line with the machine first).
#   LCPP_SRC=<llama.cpp tree> GGML_LIB=<dir of libggml-cpu.so> bash benchmarks/matvec_kernel.sh [GIB] [THREADS] [REPS]
# Defaults: the vendored tree of the sdist extracted by sessions/gpu_session.sh, the installed llama_cpp's lib
# directory.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
LCPP_SRC=${LCPP_SRC:-${OATO_WORK:-/tmp/oato}/llama-cpp-python-0.3.36/vendor/llama.cpp}
LIB_OF_LLAMA_CPP='import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))'
GGML_LIB=${GGML_LIB:-$(python3 -c "$LIB_OF_LLAMA_CPP")}
BIN=$(mktemp -d)/matvec_kernel
gcc -O3 ${CFLAGS_EXTRA:-} -mavx2 -mfma -mf16c -fopenmp -ffp-contract=off \
    -I"$LCPP_SRC/ggml/include" -I"$LCPP_SRC/ggml/src" \
    -I"$REPO/oatoplan/native/ggml-cpu" "$REPO/benchmarks/matvec_kernel.c" \
    "$REPO/oatoplan/native/ggml-cpu/oato-matvec.c" \
    -L"$GGML_LIB" -lggml-cpu -lggml-base -Wl,-rpath,"$GGML_LIB" -o "$BIN"
printf '{"machine": "%s", "cpu": "%s", "cpus": %s, "date": "%s", "command": "%s"}\n' "$(hostname)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" "$(nproc)" "$(date -u +%FT%TZ)" \
    "bash benchmarks/matvec_kernel.sh ${*}"
OMP_PROC_BIND=${OMP_PROC_BIND:-false} "$BIN" "$@"
