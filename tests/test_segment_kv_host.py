"""The segment KV cache's placement (patches/0008, OATO_SEGMENT_KV_HOST=1): segment 1's K/V in host memory while its
layer runs on another device, with every node that reads it pinned to the CPU backend. A loopback rpc-server (CPU
backend) stands in for the GPU: all of Gemma 3 270M's layers on it, segment 0 with them, segment 1 here.

- Greedy tokens (the suite's prompt, P=16 so that generation runs in segment 1) equal the unsegmented cache's on the
  same device with flash attention off. With it on, they equal stage 1's segmented cache on the same device (both
  segments on the server): there the segmented and stock flash attention part at step 9 with or without the host
  segment (segment 0's partial accumulates V in f32, stock in f16, and the first logits already differ by ~0.015).
- The nodes that read segment 1 (SET_ROWS, KQ and KQV mul_mats, FLASH_ATTN_EXT) run on the CPU backend: their
  outputs are in the CPU's compute buffer, not the server's; those that read segment 0 run on the server. Without the pinning the scheduler runs them on the
  server and copies the segment there every token; this test then fails (checked by building 0008 without the
  ggml_backend_sched_set_tensor_backend calls).
- Segment 1's bytes are in a CPU buffer, segment 0's (and the SWA cache's) on the server (oato_memory_breakdown).
- The server's compute buffer does not grow from load to a chat past P that grows segment 1; the CPU's may."""

from __future__ import annotations

import ctypes
import re

import llama_cpp
import numpy as np
import pytest

from oatoplan import ggml, rpc
from oatoplan.inventory import kv_bytes_per_token, read_inventory
from oatoplan.machine import loaded_series
from oatoplan.memory import segment_kv_cells
from oatoplan.testing import PROMPT
from test_segment_kv import CONTINUATION, N_CTX, N_TOKENS

pytestmark = pytest.mark.skipif("segment-kv-placement" not in (loaded_series() or ""),
                                reason="llama.cpp build without oatoplan's segment KV placement (patches/0008); run "
                                       "`oatoplan build --cpu`")

SEGMENT_CELLS = 16
GLOBAL_LAYERS = (5, 11, 17)     # Gemma 3 270M's layers of global attention: the segmented cache's


class _Tensor(ctypes.Structure):
    """The head of ggml.h's struct ggml_tensor, up to its name (what the eval callback needs)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


@pytest.fixture(scope="module")
def server(rpc_endpoints):
    """The ggml device of the first loopback rpc-server, registered in this process."""
    rpc.register_rpc_servers(rpc_endpoints[:1])
    g = ggml.lib()
    g.ggml_backend_reg_dev_get.restype, g.ggml_backend_reg_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_void_p,
                                                                                                   ctypes.c_size_t]
    return g.ggml_backend_reg_dev_get(rpc._registered[rpc_endpoints[0]], 0)


def _decode(ctx, tokens: list[int]) -> None:
    batch = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(batch, len(tokens))) == 0


def _run(model, device, flash_attn: bool, segment_cells: int | None, host: int | None, prompt: str = PROMPT,
         n_ctx: int = N_CTX, n_tokens: int = N_TOKENS, forced: list[int] | None = None,
         offload_cells: int | None = None) -> dict:
    """Every layer on `device`; the prompt as one batch, then n_tokens greedy tokens one at a time (`forced`: those
    tokens decoded instead, the argmax still recorded at each step). Returns the tokens, the buffer (CPU or the
    server's) of every node that reads segment 1 by op name (in the whole run, and in the prompt's batch), and the
    context's KV and compute bytes per buffer type after the prompt and at the end."""
    g = ggml.lib()
    g.ggml_backend_buffer_name.restype, g.ggml_backend_buffer_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_op_name.restype, g.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    readers: dict[str, set[str]] = {}
    prompt_readers: dict[str, set[str]] = {}
    in_prompt = [True]

    def note(t, ask, _):
        node = _Tensor.from_address(t)
        if ask and node.buffer:
            # sources that are (views or the scheduler's copies of) a global layer's segment: 0 or 1
            segs = {1 if m[2] else 0 for s in node.src if s
                    for m in [re.search(rb"cache_[kv]_l(\d+)(_seg1)?(?![\d_])", _Tensor.from_address(s).name)]
                    if m and int(m[1]) in GLOBAL_LAYERS}
            for seg in segs:
                key = g.ggml_op_name(node.op).decode() + ("" if seg else "@0")
                for into in (readers, prompt_readers) if in_prompt[0] else (readers,):
                    into.setdefault(key, set()).add(g.ggml_backend_buffer_name(node.buffer).decode())
        return False

    callback = llama_cpp.ggml_backend_sched_eval_callback(note)
    devices = (ctypes.c_void_p * 2)(device, None)
    mparams = llama_cpp.llama_model_default_params()
    mparams.devices, mparams.n_gpu_layers = ctypes.cast(devices, ctypes.c_void_p), 99
    lmodel = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_threads, cparams.n_threads_batch = n_ctx, 2, 2
    cparams.flash_attn_type = 1 if flash_attn else 0
    cparams.n_outputs_max = 1     # the last token's logits only: then the compute buffers are mostly attention's
    cparams.cb_eval = callback
    with ggml.environment(OATO_SEGMENT_KV=segment_cells, OATO_SEGMENT_KV_HOST=host,
                          OATO_SEGMENT_KV_OFFLOAD=offload_cells):
        ctx = llama_cpp.llama_init_from_model(lmodel, cparams)
    try:
        vocab = llama_cpp.llama_model_get_vocab(lmodel)
        text = prompt.encode()
        ids = (llama_cpp.llama_token * (len(text) + 2))()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), ids, len(ids), True, False)
        load_compute = ggml.memory_breakdown(ctx, "compute")
        _decode(ctx, list(ids[:n]))
        in_prompt[0] = False
        first = {"kv": ggml.memory_breakdown(ctx), "compute": ggml.memory_breakdown(ctx, "compute")}
        tokens, n_vocab = [], llama_cpp.llama_vocab_n_tokens(vocab)
        for i in range(n_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            tokens.append(int(logits.argmax()))
            _decode(ctx, [forced[i]] if forced else tokens[-1:])
        return {"tokens": tokens, "readers": readers, "prompt_readers": prompt_readers, "n_prompt": n, "load_compute": load_compute, "first": first,
                "kv": ggml.memory_breakdown(ctx), "compute": ggml.memory_breakdown(ctx, "compute")}
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(lmodel)


@pytest.fixture(scope="module", params=[False, True], ids=["fa-off", "fa-on"])
def runs(request, gemma_model, server):
    """(flash_attn, the unsegmented run, stage 1's segmented run, the run with segment 1 on the host, the run with
    segment 0 on the host)."""
    flash_attn = request.param
    return flash_attn, *(_run(gemma_model, server, flash_attn, cells, host)
                         for cells, host in ((None, None), (SEGMENT_CELLS, None), (SEGMENT_CELLS, 1),
                                             (SEGMENT_CELLS, 0)))


def test_host_segment_greedy_equals_the_same_devices(runs):
    flash_attn, stock, on_device, on_host, _ = runs
    assert len(on_host["tokens"]) == N_TOKENS and on_host["n_prompt"] < SEGMENT_CELLS
    assert on_host["tokens"] == on_device["tokens"]
    if not flash_attn:
        assert on_host["tokens"] == stock["tokens"]


def test_nodes_that_read_a_host_segment_run_on_the_cpu(runs):
    flash_attn, _, on_device, on_host, _ = runs
    attention = "FLASH_ATTN_EXT" if flash_attn else "MUL_MAT"
    host = {op: buffers for op, buffers in on_host["readers"].items() if not op.endswith("@0")}
    assert {"SET_ROWS", attention} <= host.keys()
    assert all(buffers == {"CPU"} for buffers in host.values()), on_host["readers"]
    # and segment 0's on the server, with its layer
    assert on_host["readers"][attention + "@0"] == on_host["readers"]["SET_ROWS@0"] != {"CPU"}
    # the same nodes, segment 1 with its layer: on the server (what the scheduler does with a KV buffer)
    assert on_device["readers"][attention] == on_device["readers"]["SET_ROWS"] != {"CPU"}


def test_host_segment_bytes_are_in_host_memory(runs, gemma_model):
    """After the prompt: segment 1 (240 cells up to the first multiple of 256, and its spare) of the three global
    layers in a CPU buffer; segment 0 and the SWA cache on the server, together what the memory model predicts."""
    _, stock, on_device, on_host, _ = runs
    hp = read_inventory(gemma_model).hparams
    row = {il: kv_bytes_per_token(hp, il, "f16", "f16") for il in range(hp.n_layer)}
    kv = on_host["first"]["kv"]
    assert kv["CPU"] == sum((256 - SEGMENT_CELLS + 1) * row[il] for il in GLOBAL_LAYERS)
    defaults = llama_cpp.llama_context_default_params()
    predicted = sum(segment_kv_cells(hp, il, N_CTX, defaults.n_ubatch, SEGMENT_CELLS, on_host["n_prompt"],
                                     swa_full=defaults.swa_full) * row[il] for il in range(hp.n_layer))
    assert sum(kv.values()) == predicted
    assert set(kv) == set(on_device["first"]["kv"]) | {"CPU"} and "CPU" not in on_device["first"]["kv"]
    assert set(stock["first"]["kv"]) == set(on_device["first"]["kv"])


def test_segment_0_on_the_host(runs):
    """OATO_SEGMENT_KV_HOST=0: the mirror image: segment 0's nodes on the CPU, segment 1's on the server."""
    flash_attn, _, on_device, _, prompt_on_host = runs
    attention = "FLASH_ATTN_EXT" if flash_attn else "MUL_MAT"
    assert prompt_on_host["tokens"] == on_device["tokens"]
    readers = prompt_on_host["readers"]
    assert readers["SET_ROWS@0"] == readers[attention + "@0"] == {"CPU"}
    assert readers["SET_ROWS"] == readers[attention] != {"CPU"}
    assert "CPU" in prompt_on_host["first"]["kv"]


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_device_compute_buffer_does_not_grow_past_p(gemma_model, server, flash_attn):
    """n_ctx 2048, P 256 (a multiple of 256, as plans choose it): a 281-token prompt overflows P, and generating past
    512 cells grows segment 1 by a chunk. The server's compute buffer stays what the load reserved, and is smaller
    than with segment 1 on the server (stage 1; whose buffer does not grow at these lengths on this model either: the
    512-token batch's graph dominates it)."""
    prompt = (PROMPT + CONTINUATION) * 20
    on_host = _run(gemma_model, server, flash_attn, 256, 1, prompt, 2048, 240)
    device = next(name for name in on_host["load_compute"] if name.startswith("RPC"))
    assert on_host["n_prompt"] + 240 > 512 and on_host["kv"]["CPU"] > on_host["first"]["kv"]["CPU"]
    assert on_host["compute"][device] == on_host["first"]["compute"][device] == on_host["load_compute"][device]
    on_device = _run(gemma_model, server, flash_attn, 256, None, prompt, 2048, 240)
    assert on_host["compute"][device] < on_device["load_compute"][device] <= on_device["compute"][device]


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_a_large_batch_attends_to_a_host_segment_on_the_device(gemma_model, server, flash_attn):
    """OATO_SEGMENT_KV_OFFLOAD (0012): a prompt batch of 32 tokens or more past P attends to segment 1 on the server,
    the scheduler copying its K/V views there, while segment 1 holds at most that many cells (the view's: n_kv is
    padded to 256, so 240 here); one token at a time it stays on the CPU, and so does a batch over a segment past
    the bound. The tokens are those of the run with segment 1 pinned to the CPU (the server is a CPU backend)."""
    if "segment-kv-offload" not in (loaded_series() or ""):
        pytest.skip("llama.cpp build without patches/0012; run `oatoplan build --cpu`")
    prompt = (PROMPT + CONTINUATION) * 4
    pinned = _run(gemma_model, server, flash_attn, SEGMENT_CELLS, 1, prompt, n_tokens=8)
    offloaded = _run(gemma_model, server, flash_attn, SEGMENT_CELLS, 1, prompt, n_tokens=8, offload_cells=240)
    too_small = _run(gemma_model, server, flash_attn, SEGMENT_CELLS, 1, prompt, n_tokens=8, offload_cells=239)
    attention = "FLASH_ATTN_EXT" if flash_attn else "MUL_MAT"
    assert offloaded["n_prompt"] >= SEGMENT_CELLS + 32
    server_name = next(iter(pinned["prompt_readers"][attention + "@0"]))
    assert server_name != "CPU"
    assert offloaded["prompt_readers"][attention] == {server_name}
    assert offloaded["prompt_readers"]["SET_ROWS"] == {"CPU"}   # written where it lives
    assert offloaded["readers"][attention] == {server_name, "CPU"}   # the single tokens after it: on the CPU
    assert pinned["readers"][attention] == too_small["readers"][attention] == {"CPU"}
    assert offloaded["tokens"] == pinned["tokens"]
