"""oatoplan's prefetching Q4_K/Q6_K dot products (patches/0004, native/ggml-cpu/oato-matvec.c): the switch and the
results. Stock-ggml equality of every fused and plain case is in test_fused.py (fresh processes, both switches off);
here the switch is flipped inside one process, on rows long enough (4,096 weights, 16 blocks) for the prefetch to
land inside the row. benchmarks/matvec_kernel.sh compares the kernels bit for bit on random rows and times them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from oatoplan import ggml

pytestmark = pytest.mark.skipif(ggml.matvec_enabled() is None, reason="libggml-cpu without oatoplan's dot products "
                                "(run `oatoplan build --cpu`; test_patched.py fails for this too)")


def _matvec(backend: ggml.Backend, weight_type: str, n_tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    with ggml.graph_on(backend, 16) as graph:
        out = graph.op("ggml_mul_mat", graph.tensor(weight_type, 4096, 67), graph.tensor("F32", 4096, n_tokens))
        graph.output(out)
        graph.allocate(lambda t, kind, n_bytes: ggml.random_bytes(kind, n_bytes, rng))
        graph.compute()
        return graph.read(out)


@pytest.mark.parametrize("weight_type", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_switch_changes_no_bit(weight_type, n_tokens):
    backend = ggml.Backend("CPU", 3)
    try:
        results = {}
        for enabled in (True, False, True):
            ggml.set_matvec(enabled)
            results.setdefault(enabled, []).append(_matvec(backend, weight_type, n_tokens, seed=1))
    finally:
        ggml.set_matvec(True)
        backend.close()
    on, off = results[True][0], results[False][0]
    assert on.shape == (n_tokens * 67,) and np.isfinite(off).all() and np.abs(off).max() > 0
    np.testing.assert_array_equal(on, off)
    np.testing.assert_array_equal(results[True][1], on)


@pytest.mark.parametrize("value,expected", [(None, True), ("ggml", False), ("anything-else", True)])
def test_environment_switch(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "OATO_CPU_MATVEC"}
    if value is not None:
        env["OATO_CPU_MATVEC"] = value
    code = "from oatoplan import ggml; print(ggml.matvec_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
