"""The two-segment KV cache (patches/0007, OATO_SEGMENT_KV=P): cells [0, P) of the non-SWA cache in one buffer, the
rest in another, attention merged exactly (patches/0006). On Gemma 3 270M, CPU, flash attention off and on, with the
prompt straddling the two segments and with generated tokens crossing into the second: the first segmented layer's
attention output equals the unsegmented cache's (its inputs are identical: the layers before it use the SWA cache,
which stays unsegmented), and the greedy tokens are the same for 64 tokens. The variable off, or P out of range,
leaves the stock cache."""

from __future__ import annotations

import ctypes
import itertools

import llama_cpp
import numpy as np
import pytest

from oatoplan import ggml
from oatoplan.inventory import kv_bytes_per_token, read_inventory
from oatoplan.machine import loaded_series
from oatoplan.memory import segment_kv_cells
from oatoplan.testing import PROMPT

pytestmark = pytest.mark.skipif("segment-kv-cache" not in (loaded_series() or ""),
                                reason="llama.cpp build without oatoplan's segment KV cache (patches/0007); run "
                                       "`oatoplan build --cpu`")

N_CTX = 256
N_TOKENS = 64
# Gemma 3's first global-attention layer (every 6th layer is global; the others use the SWA cache)
FIRST_GLOBAL = 5
# max |diff| / max |out| of that layer's attention output against the unsegmented cache's. Flash attention off: the
# same f32 arithmetic in another order. On: each segment's node rounds its f16 accumulator on its own, then the merge.
REL_TOL = {False: 1e-5, True: 1e-2}
CONTINUATION = " red, yellow and blue. Mixing them gives"


def _attention_outputs(model, flash_attn: bool, segment_cells: int | None, n_ctx: int = N_CTX,
                       repeat: int = 1, types1: str | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Every layer's attention output (kqv_out-N) at the last token of (PROMPT + CONTINUATION) * repeat, decoded
    alone after the rest as one batch, and the bytes of the KV buffers then; `types1`: segment 1's K,V types."""
    g = ggml.lib()
    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_nelements.restype, g.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    outputs = {}

    def capture(t, ask, _):
        name = g.ggml_get_name(t).decode()
        if ask or not name.startswith("kqv_out-"):
            return name.startswith("kqv_out-")
        out = np.empty(g.ggml_nelements(t), np.float32)
        g.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        outputs[name] = out
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(capture)
    llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=2, verbose=False, vocab_only=True)
    tokens = llm.tokenize(((PROMPT + CONTINUATION) * repeat).encode())
    llm.close()
    with ggml.environment(OATO_SEGMENT_KV=segment_cells, OATO_SEGMENT_KV_TYPES1=types1):
        mparams = llama_cpp.llama_model_default_params()
        lmodel = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_threads, cparams.n_threads_batch = n_ctx, 2, 2
        cparams.flash_attn_type = 1 if flash_attn else 0
        cparams.cb_eval = callback
        ctx = llama_cpp.llama_init_from_model(lmodel, cparams)
    try:
        for part in (tokens[:-1], tokens[-1:]):
            outputs.clear()
            batch = (llama_cpp.llama_token * len(part))(*part)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(batch, len(part))) == 0
        n_bytes = ggml.memory_bytes(ctx)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(lmodel)
    return outputs, n_bytes


def _assert_close(segmented, stock, flash_attn):
    assert stock.keys() == segmented.keys() and len(stock) == 18
    for il in range(FIRST_GLOBAL):      # SWA layers: the unsegmented cache, bit for bit
        np.testing.assert_array_equal(segmented[f"kqv_out-{il}"], stock[f"kqv_out-{il}"])
    name = f"kqv_out-{FIRST_GLOBAL}"
    rel = np.abs(segmented[name] - stock[name]).max() / np.abs(stock[name]).max()
    assert rel <= REL_TOL[flash_attn], f"{name}: segmented differs from the unsegmented cache by {rel:.3g} (relative)"


def _greedy(model, flash_attn: bool, segment_cells: int | None) -> tuple[list[int], bool]:
    """Greedy tokens after PROMPT, and whether the cache can shift (a segmented cache cannot)."""
    with ggml.environment(OATO_SEGMENT_KV=segment_cells):
        llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=2, seed=0, flash_attn=flash_attn, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    assert len(prompt) > 4          # segment 0 of 4 cells ends inside the prompt
    tokens = list(itertools.islice(llm.generate(prompt, temp=0.0), N_TOKENS))
    can_shift = llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(llm._ctx.ctx))
    llm.close()
    return tokens, bool(can_shift)


@pytest.fixture(scope="module", params=[False, True], ids=["fa-off", "fa-on"])
def stock(request, gemma_model):
    tokens, can_shift = _greedy(gemma_model, request.param, None)
    assert len(tokens) == N_TOKENS and can_shift
    return request.param, tokens


@pytest.mark.parametrize("segment_cells", [4, 10])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_segmented_attention_equals_stock(gemma_model, flash_attn, segment_cells):
    """Decoding token 15 of 15: P=4, the batch before it straddled the segments; P=10, it fills segment 0 and
    spills into 1."""
    stock, _ = _attention_outputs(gemma_model, flash_attn, None)
    segmented, _ = _attention_outputs(gemma_model, flash_attn, segment_cells)
    _assert_close(segmented, stock, flash_attn)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_response_segment_grows_in_chunks(gemma_model, flash_attn):
    """n_ctx 2048, P=16: segment 1 starts with the 240 cells up to the first multiple of 256 and grows by chunks of
    256 when a ubatch needs more (here the 281-token prompt batch, before its graph is built), keeping its cells."""
    stock, stock_bytes = _attention_outputs(gemma_model, flash_attn, None, 2048, 20)
    short, short_bytes = _attention_outputs(gemma_model, flash_attn, 16, 2048, 1)
    grown, grown_bytes = _attention_outputs(gemma_model, flash_attn, 16, 2048, 20)
    _assert_close(grown, stock, flash_attn)
    # the global layers' part: stock reserves 2048 cells; segmented 16 + 240, then 16 + 496 (and 2 spares)
    assert short_bytes < grown_bytes < stock_bytes


@pytest.mark.parametrize("segment_cells", [4, 16])
def test_segmented_greedy_equals_stock(gemma_model, stock, segment_cells):
    """P=4: the prompt straddles the segments; P=16: the prompt is in segment 0 and generation crosses into 1."""
    flash_attn, expected = stock
    tokens, can_shift = _greedy(gemma_model, flash_attn, segment_cells)
    assert not can_shift            # segmented: context shift refused, so the segments really exist
    assert tokens == expected


def test_out_of_range_leaves_the_stock_cache(gemma_model, stock):
    flash_attn, expected = stock
    assert _greedy(gemma_model, flash_attn, N_CTX) == (expected, True)


@pytest.mark.parametrize("segment_cells, repeat", [(None, 20), (16, 1), (16, 20), (300, 20)])
def test_memory_model_predicts_the_segmented_cache(gemma_model, segment_cells, repeat):
    """memory.segment_kv_cells times each layer's row bytes is what the context holds after the prompt: stock, a
    response segment not grown yet, grown past its first chunk, and a prompt segment the prompt does not fill."""
    inv = read_inventory(gemma_model)
    hp, defaults = inv.hparams, llama_cpp.llama_context_default_params()
    _, measured = _attention_outputs(gemma_model, False, segment_cells, 2048, repeat)
    llm = llama_cpp.Llama(str(gemma_model), n_ctx=N_CTX, n_threads=2, verbose=False, vocab_only=True)
    n_used = len(llm.tokenize(((PROMPT + CONTINUATION) * repeat).encode()))
    llm.close()
    predicted = sum(segment_kv_cells(hp, il, 2048, defaults.n_ubatch, segment_cells or 0, n_used,
                                     swa_full=defaults.swa_full) * kv_bytes_per_token(hp, il, "f16", "f16")
                    for il in range(hp.n_layer))
    assert measured == predicted, (measured, predicted, n_used)


@pytest.mark.skipif("segment-kv-types" not in (loaded_series() or ""), reason="patches/0010 not in this build")
@pytest.mark.parametrize("flash_attn, types1, stored", [(True, "q8_0,q8_0", ("q8_0", "q8_0")),
                                                        (False, "q8_0,f16", ("q8_0", "f16")),
                                                        (False, "q8_0,q8_0", ("f16", "f16")),
                                                        (True, "q8_0,bogus", ("f16", "f16"))],
                         ids=["fa-on-q8_0", "fa-off-k-only", "fa-off-quantized-v-refused", "bad-name-ignored"])
def test_response_segment_types(gemma_model, flash_attn, types1, stored):
    """OATO_SEGMENT_KV_TYPES1 (patches/0010), P=16, n_ctx 2048, a 281-token chat: segment 1 stores K and V in its own
    types while segment 0 and the SWA cache keep f16 (the context's KV bytes, to the byte); a quantized V without
    flash attention, or a name that is not a KV cache type, leaves f16. The first global layer's attention stays
    within q8_0's rounding of the f16 cache's."""
    hp = read_inventory(gemma_model).hparams
    defaults = llama_cpp.llama_context_default_params()
    stock, _ = _attention_outputs(gemma_model, flash_attn, None, 2048, 20)
    f16, f16_bytes = _attention_outputs(gemma_model, flash_attn, 16, 2048, 20)
    typed, typed_bytes = _attention_outputs(gemma_model, flash_attn, 16, 2048, 20, types1)
    llm = llama_cpp.Llama(str(gemma_model), n_ctx=N_CTX, n_threads=2, verbose=False, vocab_only=True)
    n_used = len(llm.tokenize(((PROMPT + CONTINUATION) * 20).encode()))
    llm.close()

    def tensor_bytes(ggml_type: str, n_cells: int, il: int, head_dim: int) -> int:   # in a CPU buffer: 32-aligned
        return -(-n_cells * ggml.row_bytes(ggml_type.upper(), hp.n_head_kv[il] * head_dim) // 32) * 32

    # segment 1: its cells and its spare (segment 0 holds P = 16 and a spare)
    n_seg1 = {il: segment_kv_cells(hp, il, 2048, defaults.n_ubatch, 16, n_used, swa_full=defaults.swa_full) - 17
              for il in range(hp.n_layer) if il not in hp.swa_layers}
    saved = sum(tensor_bytes("f16", n, il, dim) - tensor_bytes(t, n, il, dim) for il, n in n_seg1.items()
                for t, dim in zip(stored, (hp.head_dim_k, hp.head_dim_v)))
    assert f16_bytes - typed_bytes == saved
    if stored == ("f16", "f16"):
        assert typed_bytes == f16_bytes
        for name in typed:
            np.testing.assert_array_equal(typed[name], f16[name])
    else:
        assert saved > 0
        name = f"kqv_out-{FIRST_GLOBAL}"
        rel = np.abs(typed[name] - stock[name]).max() / np.abs(stock[name]).max()
        assert rel <= 5e-2, f"{name}: {rel:.3g} from the f16 cache (relative)"
