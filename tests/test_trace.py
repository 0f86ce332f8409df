"""oatoplan's CPU op timing (patches/0003, native/ggml-cpu/oato-trace.c): off by default, and when on it counts
every node of a real graph under its op (a fused span once), the MUL_MAT weight bytes, and times that add up."""

from __future__ import annotations

import pytest

import fused_graphs
from oatoplan import ggml
from oatoplan.schema import CpuTrace

pytestmark = pytest.mark.skipif(ggml.cpu_trace() is None, reason="libggml-cpu without oatoplan's op timing "
                                "(run `oatoplan build --cpu`; test_patched.py fails for this too)")


@pytest.fixture
def backend():
    b = ggml.Backend("CPU", fused_graphs.N_THREADS)
    ggml.cpu_trace(reset=True)
    yield b
    ggml.set_cpu_trace(False)
    ggml.cpu_trace(reset=True)
    b.close()


def test_off_by_default_records_nothing(backend):
    fused_graphs.run("matvec_add", "Q8_0", 2, backend)
    assert ggml.cpu_trace().n_graphs == 0


def test_counts_nodes_bytes_and_time(backend):
    ggml.set_cpu_trace(True)
    for _ in range(3):
        fused_graphs.run("matvec_add", "Q8_0", 2, backend)     # two tokens: MUL_MAT and ADD, not fused
    trace = ggml.cpu_trace()
    assert trace.n_graphs == 3
    assert trace.op_count == {"MUL_MAT": 3, "ADD": 3} and trace.op_fused == {"MUL_MAT": 0, "ADD": 0}
    row_bytes = ggml.row_bytes("Q8_0", fused_graphs.N_EMBD)
    assert trace.op_weight_bytes == {"MUL_MAT": 3 * row_bytes * fused_graphs.N_ROWS, "ADD": 0}
    assert all(ns > 0 for ns in trace.op_ns.values())
    assert 0 <= trace.start_ns < trace.graph_ns and sum(trace.op_ns.values()) <= trace.graph_ns


def test_fused_span_counts_once_under_its_first_op(backend):
    ggml.set_cpu_trace(True)
    fused_graphs.run("swiglu", "Q4_K", 1, backend)            # up, gate, GLU: one fused span (fusion on)
    trace = ggml.cpu_trace(reset=True)
    assert trace.op_count == {"MUL_MAT": 1} and trace.op_fused == {"MUL_MAT": 1}
    assert trace.op_weight_bytes["MUL_MAT"] == 2 * ggml.row_bytes("Q4_K", fused_graphs.N_EMBD) * fused_graphs.N_ROWS


def test_reset_clears(backend):
    ggml.set_cpu_trace(True)
    fused_graphs.run("rms_norm_mul_add", "F32", 2, backend)
    assert ggml.cpu_trace(reset=True).n_graphs == 1
    assert ggml.cpu_trace() == CpuTrace(0, 0, 0, {}, {}, {}, {})
