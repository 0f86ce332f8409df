"""Differential tests of oatoplan's fused CPU ops (patches/0002, native/ggml-cpu/oato-fused.c) and prefetching dot
products (patches/0004, oato-matvec.c): with both on, results are bit-identical to stock ggml's with both off
(stricter than test-backend-ops' NMSE bound: the fused code reuses the unfused kernels and rounding, the dot products
are ggml's plus prefetches), the fused paths really run, and OATO_CPU_DISABLE_FUSION=1 turns them off. Each run is
a fresh process because ggml reads the switches once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fused_graphs
from oatoplan.ggml import fusion_counts

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(fusion_counts() is None, reason="libggml-cpu without oatoplan's fused ops "
                                "(run `oatoplan build --cpu`; test_patched.py fails for this too)")


def _in_fresh_process(args: list[str], tmp_path: Path, fusion: bool, name: str) -> Path:
    out = tmp_path / f"{name}-{'on' if fusion else 'off'}.npz"
    env = {**os.environ, "OATO_CPU_DISABLE_FUSION": "0" if fusion else "1",
           "OATO_CPU_MATVEC": "oato" if fusion else "ggml",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, *args, str(out)], env=env, check=True, cwd=HERE.parent)
    return out


@pytest.fixture(scope="module")
def graph_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    return {fusion: np.load(_in_fresh_process([str(HERE / "fused_graphs.py")], tmp, fusion, "graphs"))
            for fusion in (True, False)}


@pytest.mark.parametrize("case,weight_type,n_tokens", fused_graphs.CASES)
def test_fused_equals_unfused(graph_runs, case, weight_type, n_tokens):
    key = f"{case}-{weight_type}-{n_tokens}"
    fused, unfused = graph_runs[True][key], graph_runs[False][key]
    assert np.isfinite(unfused).all() and np.abs(unfused).max() > 0
    np.testing.assert_array_equal(fused, unfused)


def test_fused_paths_ran_only_when_on(graph_runs):
    n_types = len(fused_graphs.TYPES)
    # per batch-1 case: swiglu and geglu for every type, mat-vec+ADD for every type, one RMS_NORM+MUL+ADD;
    # never for two tokens or f32 weights
    assert list(graph_runs[True]["counts"]) == [2 * n_types, n_types, 1]
    assert list(graph_runs[False]["counts"]) == [0, 0, 0]


GREEDY = """
import sys, numpy as np
from oatoplan.ggml import fusion_counts
from oatoplan.testing import greedy
tokens = greedy(sys.argv[1], repack=sys.argv[2] == "1", n_tokens=64)
np.savez(sys.argv[3], tokens=np.array(tokens), counts=np.array(fusion_counts()))
"""


@pytest.mark.parametrize("repack", [True, False], ids=["repacked", "plain-weights"])
def test_gemma_greedy_identical_with_and_without_fusion(gemma_model, tmp_path, repack):
    """Issue #8: Gemma 3 270M's greedy 64 tokens on the CPU are the same with the fused ops and prefetching dot
    products on and with both off (with llama.cpp's weight repacking, only RMS_NORM+MUL+ADD and mat-vecs of types
    it does not repack fuse)."""
    runs = {}
    for fusion in (True, False):
        path = _in_fresh_process(["-c", GREEDY, str(gemma_model), "1" if repack else "0"], tmp_path, fusion,
                                 f"gemma-{repack}")
        runs[fusion] = np.load(path)
    assert len(runs[True]["tokens"]) == 64
    np.testing.assert_array_equal(runs[True]["tokens"], runs[False]["tokens"])
    counts_on = runs[True]["counts"]
    assert counts_on[2] > 0                       # Gemma's post-norms: RMS_NORM, MUL, ADD of the residual
    if not repack:
        assert counts_on[0] > 0                   # gate+up+GEGLU (Gemma has no mat-vec followed by an ADD)
    assert list(runs[False]["counts"]) == [0, 0, 0]
