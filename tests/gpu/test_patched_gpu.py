"""GPU-only: the patched CUDA build computes what the CPU computes (issue #7), on the real Gemma 3 270M. The same
check as `python3 -m benchmarks.gpu_patched_check` (run on the H100 machine on 2026-11-23:
benchmarks/results/2026-11-23-h100-gemma3-270m-gpu-vs-cpu.json); as a pytest it has not run on a GPU yet."""

import pytest

from oatoplan.machine import gpu_devices, loaded_series
from oatoplan.testing import greedy, top1_agreement

pytestmark = pytest.mark.gpu


def test_gemma_greedy_tokens_agree_on_gpu_and_cpu(gemma_model):
    if not gpu_devices():
        pytest.skip("no GPU in this llama.cpp build")
    assert loaded_series() is not None, "stock llama-cpp-python: run `oatoplan build --cuda`"
    cpu = greedy(str(gemma_model), 0, 32)
    gpu = greedy(str(gemma_model), 99, 32)
    # CUDA kernels may round differently: identical tokens, or >= 95% top-1 agreement on the CPU's sequence
    assert gpu == cpu or top1_agreement(str(gemma_model), 99, cpu) >= 0.95
