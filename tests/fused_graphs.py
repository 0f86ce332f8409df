"""The decode-time node chains that oatoplan's fused CPU ops replace (native/ggml-cpu/oato-fused.c), built with ggml's
graph API on the CPU backend and computed on random inputs, plus lone mat-vecs (ggml's MUL_MAT with oatoplan's
prefetching dot products, native/ggml-cpu/oato-matvec.c). Run as a script in a fresh process (the switches,
OATO_CPU_DISABLE_FUSION and OATO_CPU_MATVEC, are read once per process):

    python tests/fused_graphs.py OUT.npz

writes every case's output and the library's fusion counters; tests/test_fused.py compares a run with both on
against one with both off (stock ggml), and benchmarks/fused_ops.py times them."""

from __future__ import annotations

import sys

import numpy as np

from oatoplan import ggml

# Weight types the fused mat-vecs are checked for (issue #8), and f32, which they leave alone.
TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "F16"]
N_EMBD = 512       # activation length: two K-quant super-blocks
N_ROWS = 203       # output rows: not a multiple of 16, so the last thread's chunk has a scalar tail
N_THREADS = 3      # uneven row split


def build(graph: ggml.Graph, case: str, weight_type: str, n_tokens: int) -> int:
    """The output tensor of one case; every input is a fresh tensor of `graph`."""
    x = graph.tensor("F32", N_EMBD, n_tokens)
    if case in ("swiglu", "geglu"):
        up = graph.op("ggml_mul_mat", graph.tensor(weight_type, N_EMBD, N_ROWS), x)
        gate = graph.op("ggml_mul_mat", graph.tensor(weight_type, N_EMBD, N_ROWS), x)
        return graph.op(f"ggml_{case}_split", gate, up)
    if case == "matvec":
        return graph.op("ggml_mul_mat", graph.tensor(weight_type, N_EMBD, N_ROWS), x)
    if case == "matvec_add":
        mm = graph.op("ggml_mul_mat", graph.tensor(weight_type, N_EMBD, N_ROWS), x)
        return graph.op("ggml_add", mm, graph.tensor("F32", N_ROWS, n_tokens))
    if case == "rms_norm_mul_add":
        normed = graph.op("ggml_rms_norm", x, 1e-6)
        scaled = graph.op("ggml_mul", normed, graph.tensor("F32", N_EMBD))
        return graph.op("ggml_add", scaled, graph.tensor("F32", N_EMBD, n_tokens))
    raise ValueError(case)


CASES = [(case, t, 1) for case in ("swiglu", "geglu", "matvec_add") for t in TYPES]
CASES += [("rms_norm_mul_add", "F32", 1)]
# not fused: two tokens (prefill), f32 weights, a lone mat-vec (its dot products are oatoplan's for Q4_K and Q6_K)
CASES += [("swiglu", "Q4_K", 2), ("matvec_add", "Q8_0", 2), ("rms_norm_mul_add", "F32", 2), ("matvec_add", "F32", 1)]
CASES += [("matvec", t, n) for t in ("Q4_K", "Q6_K", "Q8_0") for n in (1, 3)]


def run(case: str, weight_type: str, n_tokens: int, backend: ggml.Backend, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    with ggml.graph_on(backend, 64) as graph:
        out = build(graph, case, weight_type, n_tokens)
        graph.output(out)
        graph.allocate(lambda t, kind, n_bytes: ggml.random_bytes(kind, n_bytes, rng))
        graph.compute()
        return graph.read(out)


def main(path: str) -> None:
    backend = ggml.Backend("CPU", N_THREADS)
    try:
        results = {f"{case}-{t}-{n}": run(case, t, n, backend) for case, t, n in CASES}
    finally:
        backend.close()
    counts = ggml.fusion_counts()
    np.savez(path, counts=np.array(counts if counts is not None else [-1, -1, -1]), **results)


if __name__ == "__main__":
    main(sys.argv[1])
