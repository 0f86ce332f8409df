"""Differential tests of the segment KV cache's attention (patches/0006, native/oato-attn.c): attention over a
prompt segment a and a response segment b equals llama.cpp's attention over their concatenation, with flash
attention off (near bit-exact: only the two partial KQV sums are added in another order) and on (within flash
attention's own distance from the attention without it). Head sizes, GQA ratios, empty segments, one query and a
causal batch of queries, on the CPU backend. And the log-sum-exp nodes alone on each CPU path (vec, split-KV, tiled)
with a logit softcap, ALiBi and attention sinks, against float64 (`_lse_node`, shared with the CUDA tests)."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from oatoplan import ggml
from oatoplan.ggml import Backend, graph_on, lib

pytestmark = pytest.mark.skipif(ggml.segment_attention() is None, reason="libggml-base without oatoplan's segment "
                                "attention (patches/0006); run `oatoplan build --cpu`")

N_HEAD_KV = 2
# flash attention off, max |diff| from the concatenated graph (outputs ~0.3-0.8): for one query only the f32 sums
# run in another order; for a batch, ggml's CPU mul_mat picks its kernel by shape, so a segment's KQ and the whole
# cache's differ in the last f32 bit, which can move a probability by one f16 step when KQV converts it (the stock
# graph itself is ~1e-3 from float64). Measured values: docs/notes/2026-12-02-segment-kv-design.md.
TOL_OFF = {1: 1e-6, 7: 3e-4}
# (n_kv of segment a, n_kv of segment b): empty segments on either side, a short prompt, a long one, and one long
# enough (>= 512 cells) that a single query's flash attention takes the CPU's split-KV path (patches/0011)
SEGMENTS = [(0, 40), (40, 0), (37, 91), (300, 5), (600, 40)]


# (logit softcap, ALiBi max_bias, attention sinks) for the log-sum-exp nodes: each alone, and all three
LSE_OPTIONS = [(5.0, 0.0, False), (0.0, 8.0, False), (0.0, 0.0, True), (5.0, 8.0, True)]


@pytest.fixture(scope="module")
def cpu():
    backend = Backend("CPU", n_threads=2)
    yield backend
    backend.close()


def _mask(n_kv: int, n_q: int) -> np.ndarray:
    """Causal mask (n_q, n_kv): the queries are the last n_q positions of the concatenated sequence."""
    seen = np.arange(n_kv)[None, :] <= (n_kv - n_q + np.arange(n_q))[:, None]
    return np.where(seen, 0.0, -np.inf).astype(np.float32)


def _reference(q, k, v, mask, scale):
    """Attention in float64 with GQA as ggml broadcasts it (query head h reads KV head h // ratio): (n_q, n_head, DV)."""
    ratio = q.shape[0] // k.shape[0]
    kk, vv = np.repeat(k.astype(np.float64), ratio, 0), np.repeat(v.astype(np.float64), ratio, 0)
    s = np.einsum("hqd,hkd->hqk", q.astype(np.float64), kk) * scale + mask[None]
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,hkd->qhd", p / p.sum(-1, keepdims=True), vv)


def _alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """ggml's ALiBi slope of each head (ggml-cpu/ops.cpp), all 1 without ALiBi."""
    if max_bias == 0:
        return np.ones(n_head)
    n_log2 = 2 ** math.floor(math.log2(n_head))
    m0, m1 = 2 ** (-max_bias / n_log2), 2 ** (-(max_bias / 2) / n_log2)
    return np.array([m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1) for h in range(n_head)])


def _lse_node(backend, head_dim, n_head, n_kv, n_q, k_type="F16", masked_rows=(), seed=0, softcap=0.0,
              max_bias=0.0, sinks=False):
    """(stock FLASH_ATTN_EXT output (n_q, n_head, DV), the log-sum-exp node's (n_q, n_head, DV + 1), float64
    log-sum-exp (n_q, n_head), whether the device supports the node) for one random causal case; `masked_rows`:
    queries whose mask hides every key. With ALiBi the mask holds minus the distance to each seen key (as llama.cpp
    fills it for ALiBi models), each head's slope times it added to the scores; with sinks, one random logit per head
    joins every row's softmax."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(head_dim)
    q = rng.standard_normal((n_head, n_q, head_dim), dtype=np.float32)
    k = rng.standard_normal((N_HEAD_KV, n_kv, head_dim), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((N_HEAD_KV, n_kv, head_dim), dtype=np.float32).astype(np.float16)
    sink = (2 * rng.standard_normal(n_head)).astype(np.float32)
    if k_type == "Q8_0":   # K and V both Q8_0 (CUDA's default build pairs same-type K and V); the reference reads K's values
        qtype = GGMLQuantizationType.Q8_0
        k_q, v_q = quantize(k.astype(np.float32), qtype), quantize(v.astype(np.float32), qtype)
        k = dequantize(k_q, qtype).reshape(k.shape)
    mask = _mask(n_kv, n_q)
    if max_bias:
        distance = (n_kv - n_q + np.arange(n_q))[:, None] - np.arange(n_kv)[None, :]
        mask = np.where(np.isfinite(mask), -distance.astype(np.float32), mask)
    mask[list(masked_rows)] = -np.inf
    g = lib()
    g.ggml_backend_dev_supports_op.restype = ctypes.c_bool
    g.ggml_backend_dev_supports_op.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    g.ggml_flash_attn_ext_add_sinks.restype = None
    g.ggml_flash_attn_ext_add_sinks.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    with graph_on(backend) as gr:
        tq, tm = gr.array(q, "F32"), gr.array(mask.astype(np.float16), "F16")
        if k_type == "F16":
            tk, tv = gr.array(k, "F16"), gr.array(v, "F16")
        elif k_type == "Q8_0":
            tk, tv = gr.tensor("Q8_0", head_dim, n_kv, N_HEAD_KV), gr.tensor("Q8_0", head_dim, n_kv, N_HEAD_KV)
            gr.data[tk], gr.data[tv] = k_q.tobytes(), v_q.tobytes()
        else:   # the values do not matter: only supports_op is asked
            tk, tv = gr.tensor(k_type, head_dim, n_kv, N_HEAD_KV), gr.tensor(k_type, head_dim, n_kv, N_HEAD_KV)
        stock = g.ggml_flash_attn_ext(gr.ctx, tq, tk, tv, tm, scale, max_bias, softcap)
        node = ggml.flash_attn_lse()(gr.ctx, tq, tk, tv, tm, scale, max_bias, softcap)
        if sinks:
            ts = gr.array(sink, "F32")
            g.ggml_flash_attn_ext_add_sinks(stock, ts)
            g.ggml_flash_attn_ext_add_sinks(node, ts)
        supported = g.ggml_backend_dev_supports_op(backend.dev, node)
        if k_type not in ("F16", "Q8_0"):
            return None, None, None, supported
        gr.output(stock)
        gr.output(node)
        gr.allocate()
        gr.compute()
        got_stock = gr.read(stock).reshape(n_q, n_head, head_dim)
        got = gr.read(node).reshape(n_q, n_head, head_dim + 1)
    ratio = n_head // N_HEAD_KV
    s = np.einsum("hqd,hkd->qhk", q.astype(np.float64), np.repeat(k.astype(np.float64), ratio, 0)) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = s + _alibi_slopes(n_head, max_bias)[None, :, None] * mask[:, None, :]
    if sinks:
        s = np.concatenate([s, np.broadcast_to(sink.astype(np.float64)[None, :, None], (n_q, n_head, 1))], -1)
    top = s.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        lse = (top + np.log(np.exp(s - top).sum(-1, keepdims=True)))[..., 0]
    if not sinks:
        lse[list(masked_rows)] = -np.inf
    return got_stock, got, lse, supported


def run_attention(backend, head_dim, n_head, n_a, n_b, n_q, seed=0):
    """Stock attention over [a | b] (flash attention off and on) and oato_attn_segmented (off and on), all
    (n_q, n_head, DV), with the float64 reference."""
    rng = np.random.default_rng(seed)
    n_kv, scale = n_a + n_b, 1.0 / math.sqrt(head_dim)
    q = rng.standard_normal((n_head, n_q, head_dim), dtype=np.float32)
    k = rng.standard_normal((N_HEAD_KV, n_kv, head_dim), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((N_HEAD_KV, n_kv, head_dim), dtype=np.float32).astype(np.float16)
    mask = _mask(n_kv, n_q)
    g = lib()
    seg = ggml.segment_attention()
    with graph_on(backend) as gr:
        tensor = gr.array

        def segment(lo, hi):
            """(k, v, v transposed, f32 mask, f16 mask) of positions lo:hi, or Nones for an empty segment."""
            if lo == hi:
                return None, None, None, None, None
            return (tensor(k[:, lo:hi], "F16"), tensor(v[:, lo:hi], "F16"),
                    tensor(v[:, lo:hi].transpose(0, 2, 1), "F16"), tensor(mask[:, lo:hi], "F32"),
                    tensor(mask[:, lo:hi].astype(np.float16), "F16"))

        tq = tensor(q, "F32")
        tk, tv, tvt, tm32, tm16 = segment(0, n_kv)
        ka, va, vta, ma32, ma16 = segment(0, n_a)
        kb, vb, vtb, mb32, mb16 = segment(n_a, n_kv)
        # llama.cpp's build_attn_mha over the whole cache
        kq = g.ggml_soft_max_ext(gr.ctx, g.ggml_mul_mat(gr.ctx, tk, tq), tm32, scale, 0.0)
        outs = {"stock_off": g.ggml_cont(gr.ctx, g.ggml_permute(gr.ctx, g.ggml_mul_mat(gr.ctx, tvt, kq), 0, 2, 1, 3)),
                "stock_on": g.ggml_flash_attn_ext(gr.ctx, tq, tk, tv, tm16, scale, 0.0, 0.0),
                "seg_off": g.ggml_cont(gr.ctx, seg(gr.ctx, tq, ka, vta, ma32, kb, vtb, mb32, None, None,
                                                   scale, 0.0, 0.0, False)),
                "seg_on": g.ggml_cont(gr.ctx, seg(gr.ctx, tq, ka, va, ma16, kb, vb, mb16, None, None,
                                                  scale, 0.0, 0.0, True))}
        for t in outs.values():
            gr.output(t)
        gr.allocate()
        gr.compute()
        got = {name: gr.read(t).reshape(n_q, n_head, head_dim) for name, t in outs.items()}
    got["exact"] = _reference(q, k, v, mask, scale)
    return got


def attention_cases(test):
    """The grid of both backends' differential tests: head sizes, GQA ratios, SEGMENTS, one query and a batch."""
    for mark in (pytest.mark.parametrize("n_q", [1, 7]), pytest.mark.parametrize("n_a,n_b", SEGMENTS),
                 pytest.mark.parametrize("gqa", [1, 4, 8]), pytest.mark.parametrize("head_dim", [64, 128, 256])):
        test = mark(test)
    return test


@pytest.mark.parametrize("n_a,n_b", [(300, 100), (100, 300), (0, 200)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_batch_of_queries(cpu, head_dim, n_a, n_b):
    """64 queries (a prompt batch): the CPU's flash attention takes its tiled path (GGML_FA_TILE_Q = 64), the
    log-sum-exp nodes too (patches/0011), and the segmented result stays as close to attention as stock's."""
    got = run_attention(cpu, head_dim, N_HEAD_KV * 4, n_a, n_b, 64)
    fa_own = np.abs(got["stock_on"] - got["stock_off"]).max()
    on = np.abs(got["seg_on"] - got["stock_off"]).max()
    assert np.abs(got["stock_off"] - got["exact"]).max() < 5e-3
    assert on <= 1.25 * fa_own + 1e-6, f"flash attention on: segmented {on:.3g} from attention, stock FA {fa_own:.3g}"


@attention_cases
def test_segmented_equals_concatenated(cpu, head_dim, gqa, n_a, n_b, n_q):
    got = run_attention(cpu, head_dim, N_HEAD_KV * gqa, n_a, n_b, n_q)
    stock_off, stock_on = got["stock_off"], got["stock_on"]
    # the stock graphs compute attention at all (f16 K/V and probabilities: ~1e-3 from float64)
    assert np.abs(stock_off - got["exact"]).max() < 5e-3
    off = np.abs(got["seg_off"] - stock_off).max()
    assert off <= TOL_OFF[n_q], f"flash attention off: segmented differs from concatenated by {off:.3g}"
    # flash attention on: as close to attention without it as stock flash attention is (its f16 accumulator)
    fa_own = np.abs(stock_on - stock_off).max()
    on = np.abs(got["seg_on"] - stock_off).max()
    assert on <= 1.25 * fa_own + 1e-6, f"flash attention on: segmented {on:.3g} from attention, stock FA {fa_own:.3g}"
    if n_a == 0 or n_b == 0:   # one segment: the stock nodes themselves
        np.testing.assert_array_equal(got["seg_off"], stock_off)
        np.testing.assert_array_equal(got["seg_on"], stock_on)



@pytest.mark.parametrize("softcap,max_bias,sinks", LSE_OPTIONS)
@pytest.mark.parametrize("n_q,n_kv", [(1, 40), (1, 1024), (64, 300)])   # the vec, split-KV and tiled paths (0011)
def test_lse_node_with_softcap_alibi_and_sinks(cpu, n_q, n_kv, softcap, max_bias, sinks):
    """The CPU's log-sum-exp nodes on each path, with a logit softcap, ALiBi or attention sinks: the first DV columns
    are the stock node's output, column DV the rows' log-sum-exp (float64, the sink's logit counted in it)."""
    stock, got, lse, _ = _lse_node(cpu, 128, N_HEAD_KV * 4, n_kv, n_q, softcap=softcap, max_bias=max_bias,
                                   sinks=sinks)
    np.testing.assert_array_equal(got[..., :128], stock)
    err = np.abs(got[..., 128] - lse).max()
    assert err < 1e-3, f"log-sum-exp {err:.3g} from float64"
