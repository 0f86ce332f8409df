"""Several sequences share one prompt segment (issue #21, stage 4): llama.cpp's unified cache (kv_unified, one stream)
under OATO_SEGMENT_KV=P. The prompt is decoded once as sequence 0 and llama_memory_seq_cp'd to sequences 1-3 (the
cells of segment 0 then carry four sequence ids: metadata, no copy); each sequence's own tokens take cells of
segment 1. Four completions of one prompt on Gemma 3 270M (CPU), one token per sequence per llama_decode, each
starting from another of the prompt's four most likely next tokens, then greedy:

- A prompt of 303 tokens (P > 256; segment 1 grows while the sequences generate), flash attention off and on: the
  tokens equal the unified stock cache's, sequence for sequence, for 64 tokens. Against each completion run alone
  in a one-sequence stock context, the unified stock cache itself parts on a sequence now and then at a near tie
  (another batch shape and cell order; the cause was not isolated); the segmented cache parts there too, nowhere
  else.
- The suite's 6-token prompt leads to near ties: there the segmented and the unified stock cache part at them
  (top-2 gaps below 0.5) and agree otherwise.
- Memory: what memory.shared_segment_kv_cells predicts, to the byte (segment 0 once, not once per sequence).
- Refused or working: context shift (llama_memory_can_shift false), state save and load (0, llama.cpp logs the error),
  removing shared prompt cells (seq_rm, metadata; the tokens decoded again give the same next token)."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from benchmarks.segment_kv_shared import LLAMA_MAX_SEQ, completions, predicted_bytes, sequences_that_fit
from oatoplan.inventory import read_inventory
from oatoplan.machine import loaded_series
from oatoplan.testing import PROMPT
from test_segment_kv import CONTINUATION

pytestmark = pytest.mark.skipif("segment-kv-cache" not in (loaded_series() or ""),
                                reason="llama.cpp build without oatoplan's segment KV cache (patches/0007); run "
                                       "`oatoplan build --cpu`")

N_SEQ = 4
N_TOKENS = 64
N_CTX = 1024
# one thread: on a busy 2-core machine two threads spin at every barrier (seconds per token)
THREADS = 1


def _prompt(model, repeat: int = 1) -> list[int]:
    """The suite's prompt and repeat - 1 continuations."""
    llm = llama_cpp.Llama(str(model), n_ctx=256, verbose=False, vocab_only=True)
    tokens = llm.tokenize((PROMPT + CONTINUATION * (repeat - 1)).encode())
    llm.close()
    return tokens


def _run(model, prompt, flash_attn, unified=True, n_seq=N_SEQ, segmented=False, firsts=None, ctx_check=None):
    return completions(str(model), prompt, n_seq, N_TOKENS, flash_attn=flash_attn, unified=unified,
                       segment_cells=len(prompt) if segmented else None, n_ctx=N_CTX, firsts=firsts,
                       n_threads=THREADS, ctx_check=ctx_check)


def _alone(model, prompt, flash_attn, firsts) -> list[list[int]]:
    """Each completion run alone in a one-sequence stock context."""
    return [_run(model, prompt, flash_attn, n_seq=1, firsts=[f])[0][0] for f in firsts]


def _parting(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


# a top-2 logit gap this small is a near tie: last-bit differences (batch shape, cell order) move Gemma's logits
# by about this much
NEAR_TIE = 0.5


def _check_partings(tokens, gaps, reference, reference_gaps):
    """Every sequence equals the reference or parts from it where either run had a near tie."""
    for s, (a, b) in enumerate(zip(tokens, reference)):
        i = _parting(a, b)
        assert i is None or min(gaps[s][i - 1], reference_gaps[s][i - 1]) < NEAR_TIE, (s, i)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_completions_of_a_long_prompt(gemma_model, flash_attn):
    """P = 303: segment 1 holds the 209 cells up to 512 at first and grows by a chunk while the four sequences
    generate (4 x 63 cells). The tokens equal the unified stock cache's; against the runs alone, a sequence may part
    only where the unified stock cache parts too, at a near tie."""
    prompt = _prompt(gemma_model, 34)
    assert 512 - N_SEQ * (N_TOKENS - 1) < len(prompt) < 512
    seg, seg_gaps, seg_bytes = _run(gemma_model, prompt, flash_attn, segmented=True)
    stock, stock_gaps, stock_bytes = _run(gemma_model, prompt, flash_attn)
    assert len({t[0] for t in seg}) == N_SEQ and all(len(t) == N_TOKENS for t in seg)
    assert seg == stock, [_parting(a, b) for a, b in zip(seg, stock)]
    alone = [_run(gemma_model, prompt, flash_attn, n_seq=1, firsts=[t[0]]) for t in seg]
    for s in range(N_SEQ):
        i = _parting(seg[s], alone[s][0][0])
        assert i is None or (_parting(stock[s], alone[s][0][0]) == i
                             and min(stock_gaps[s][i - 1], alone[s][1][0][i - 1]) < NEAR_TIE), (s, i)

    hp = read_inventory(gemma_model).hparams
    assert seg_bytes == predicted_bytes(hp, N_CTX, N_SEQ, True, len(prompt), N_TOKENS - 1)
    assert stock_bytes == predicted_bytes(hp, N_CTX, N_SEQ, True, None, N_TOKENS - 1)
    assert predicted_bytes(hp, N_CTX, N_SEQ, True, len(prompt), 0) < seg_bytes < stock_bytes   # it grew


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_completions_of_the_short_prompt(gemma_model, flash_attn):
    """P = 6 (segment 0 holds only the prompt, every generated cell is in segment 1): this prompt leads to near ties
    (FA off, sequence 3 at step 13: top-2 gaps 0.066 / 0.072; FA on, sequence 1 at step 9: 0.31 / 0.094, where
    the unified stock cache also parts from the run alone): the tokens equal the unified stock cache's up to them."""
    prompt = _prompt(gemma_model)
    seg, seg_gaps, seg_bytes = _run(gemma_model, prompt, flash_attn, segmented=True)
    stock, stock_gaps, _ = _run(gemma_model, prompt, flash_attn)
    assert len({t[0] for t in seg}) == N_SEQ
    _check_partings(seg, seg_gaps, stock, stock_gaps)
    assert sum(a == b for a, b in zip(seg, stock)) >= N_SEQ - 1
    hp = read_inventory(gemma_model).hparams
    assert seg_bytes == predicted_bytes(hp, N_CTX, N_SEQ, True, len(prompt), N_TOKENS - 1)


def test_what_a_shared_segmented_cache_refuses(gemma_model):
    """No context shift, no state save or load (llama.cpp's state functions catch the cache's error and return 0:
    the size, the bytes written, the bytes read of the unified stock cache's state). Removing shared prompt cells
    works (metadata only): the last two prompt positions removed from every sequence and decoded again for sequence
    0 (in whatever cells llama.cpp finds free) give the first token they gave the first time."""
    prompt = _prompt(gemma_model)
    stock, seen = {}, {}

    def check_stock(ctx):
        stock["can_shift"] = bool(llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(ctx)))
        stock["state"] = (ctypes.c_uint8 * llama_cpp.llama_state_get_size(ctx))()
        stock["written"] = llama_cpp.llama_state_get_data(ctx, stock["state"], len(stock["state"]))

    def check(ctx):
        mem = llama_cpp.llama_get_memory(ctx)
        seen["can_shift"] = bool(llama_cpp.llama_memory_can_shift(mem))
        seen["state"] = llama_cpp.llama_state_get_size(ctx), llama_cpp.llama_state_seq_get_size(ctx, 1)
        seen["read"] = llama_cpp.llama_state_set_data(ctx, stock["state"], len(stock["state"]))
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_cpp.llama_get_model(ctx)))
        llama_cpp.llama_memory_seq_rm(mem, -1, len(prompt) - 2, -1)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 1) == len(prompt) - 3
        array = (llama_cpp.llama_token * 2)(*prompt[-2:])
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, 2)) == 0
        seen["logits"] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()

    _run(gemma_model, prompt, False, ctx_check=check_stock)
    assert stock["can_shift"] and stock["written"] == len(stock["state"]) > 0
    tokens, _, _ = _run(gemma_model, prompt, False, segmented=True, ctx_check=check)
    assert not seen["can_shift"]
    assert seen["state"] == (0, 0) and seen["read"] == 0
    assert int(np.argmax(seen["logits"])) == tokens[0][0]


def test_per_sequence_caches_as_predicted(gemma_model):
    """kv_unified off: n_ctx split into one stream per sequence, each sized like a one-sequence cache; seq_cp copies
    the prompt into every stream. OATO_SEGMENT_KV is not applied to several streams (llama.cpp logs why): the stock
    cache."""
    prompt = _prompt(gemma_model)
    _, _, n_bytes = completions(str(gemma_model), prompt, N_SEQ, 2, flash_attn=False, unified=False,
                                segment_cells=len(prompt), n_ctx=N_CTX, n_threads=THREADS)
    hp = read_inventory(gemma_model).hparams
    assert n_bytes == predicted_bytes(hp, N_CTX, N_SEQ, False, None, 1)


def test_parallel_sequences_that_fit_the_qwen_budget(qwen_header_model):
    """Qwen2-7B shape, 2.5 GiB of KV, completions of one 8k prompt, 128 tokens each: per-sequence caches hold 5
    (each stream 8,448 cells of 56 KiB); the shared segmented cache holds the prompt once and 128 cells per
    sequence, so it fits llama.cpp's maximum of 256 sequences (the unified stock cache too, if its n_ctx is sized
    by hand to the prompt plus the responses)."""
    hp = read_inventory(qwen_header_model).hparams
    budget = 5 * 2**29
    per_sequence = sequences_that_fit(hp, budget, 8192, 128, "per-sequence")
    shared = sequences_that_fit(hp, budget, 8192, 128, "unified-segmented")
    assert per_sequence == 5 and shared == LLAMA_MAX_SEQ
    assert predicted_bytes(hp, 6 * 8320, 6, False, None, 128) > budget >= predicted_bytes(hp, 5 * 8320, 5, False,
                                                                                          None, 128)
    # one prompt segment (8,192 cells and a spare) and 4 x 128 response cells (two chunks and a spare), 28 layers
    assert predicted_bytes(hp, 4 * 8320, 4, True, 8192, 128) == (8193 + 512 + 1) * 28 * 2 * 2 * 512
