"""The profile's mixture-of-experts measurements and the host's plain memory read rate, for profile.py.

For a model with experts (`profile run --model`), on the CPU and the GPU, through the graphs llama.cpp's
build_moe_ffn builds:
- MUL_MAT_ID of each expert tensor's type and shape (K, N, n_expert, n_used) at batch sizes 1..4096, its ids drawn as
  uniform routing draws them (each token picks n_used distinct experts), so that a batch touches
  graph.expected_touched experts, as a real router's batch does (benchmarks/results/*-moe-routing-*.json);
- the router's selection (MOE_ROUTE: SOFT_MAX, ARGSORT top-k, GET_ROWS of the weights, SUM_ROWS and DIV to
  normalize them) per batch size; the router's matrix is a MUL_MAT that profile.py times with the others;
- op offload's upload of only the used experts (EXPERT_UPLOAD): one copy per run of consecutive touched experts, as
  ggml_backend_sched copies them, for several touched counts.
For every profile: the host's plain memory read rate (a multi-threaded sum over a buffer far larger than any cache,
in the memory that host weights live in), the rate at which decode can read host weights at best.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import ggml
from .graph import expected_touched
from .schema import ModelInventory, OpTiming

log = logging.getLogger(__name__)

EXPERT_TOKENS_GPU = (1, 2, 4, 8, 32, 128, 512, 2048, 4096)
EXPERT_TOKENS_CPU = (1, 2, 4, 8, 32, 128, 512)   # larger CPU batches are extrapolated (op offload takes them)
ROUTE_TOKENS = (1, 32, 512, 2048)
UPLOAD_COUNTS = (1, 8, 32, 128)                 # touched experts (capped at n_expert)
# Distinct weight bytes a small batch's graph reads: enough to defeat caches, as profile.COPY_BYTES
READ_BYTES = 256 << 20
MAX_NODES = 16
HOST_READ_BYTES = 1 << 30


def expert_shapes(inv: ModelInventory) -> list[tuple[str, int, int, int, int, bool]]:
    """(type, K, N, n_expert, n_used, broadcast input) of each distinct expert tensor: gate and up read the layer
    input once per token (broadcast over the token's experts), down reads one row per selected expert."""
    hp = inv.hparams
    found = {(t.ggml_type, t.shape[0], t.shape[1], t.shape[2], hp.n_expert_used, "down" not in t.role)
             for t in inv.tensors if t.op == "MUL_MAT_ID" and len(t.shape) == 3}
    return sorted(found)


def uniform_ids(rng: np.random.Generator, n_expert: int, n_used: int, n_tokens: int,
                experts: np.ndarray | None = None) -> np.ndarray:
    """(n_tokens, n_used) int32: each token's n_used distinct experts, uniformly at random (from `experts`, all by
    default)."""
    pool = np.arange(n_expert) if experts is None else experts
    picks = np.argsort(rng.random((n_tokens, len(pool))), axis=1)[:, :n_used]
    return pool[picks].astype(np.int32)


def _time(graph: ggml.Graph, n_ops: int, budget_s: float) -> tuple[float, tuple[float, ...]]:
    samples = [s / n_ops for s in ggml.time_us(graph.compute, budget_s=budget_s)]
    return statistics.median(samples), tuple(round(s, 3) for s in samples)


def time_mul_mat_id(backend: ggml.Backend, shape: tuple[str, int, int, int, int, bool], tokens: tuple[int, ...],
                    budget_s: float, rng: np.random.Generator, host_buffer_type: int | None = None) -> list[OpTiming]:
    """MUL_MAT_ID of one expert tensor at each batch size. Two weight copies; a small batch (whose experts are a
    small share of the tensor) runs as several nodes over disjoint sets of experts, so that the graph reads
    READ_BYTES of distinct weights, not one cached expert again and again."""
    ggml_type, k, n, n_expert, n_used, broadcast = shape
    expert_bytes = ggml.row_bytes(ggml_type, k) * n
    weight_cache: dict[int, bytes] = {}
    results = []
    with ggml.graph_on(backend) as weights:
        copies = [weights.tensor(ggml_type, k, n, n_expert) for _ in range(2)]

        def fill_weights(t, kind, n_bytes):
            if n_bytes not in weight_cache:
                weight_cache[n_bytes] = ggml.random_bytes(kind, n_bytes, rng)
            return weight_cache[n_bytes]
        weights.allocate(fill_weights, host_buffer_type)
        for n_tokens in tokens:
            touched = expected_touched(n_expert, n_used, n_tokens)
            n_groups = max(1, min(MAX_NODES // 2, n_expert // max(1, round(2 * touched)),
                                  READ_BYTES // max(1, int(2 * touched * expert_bytes))))
            groups = np.array_split(rng.permutation(n_expert), n_groups)
            ids_bytes: dict[int, bytes] = {}
            with ggml.graph_on(backend) as g:
                n_ops = 0
                for w in copies:
                    for experts in groups:
                        ids = g.tensor("I32", n_used, n_tokens)
                        ids_bytes[ids] = uniform_ids(rng, n_expert, n_used, n_tokens, experts).tobytes()
                        x = g.tensor("F32", k, 1 if broadcast else n_used, n_tokens)
                        g.output(g.op("ggml_mul_mat_id", w, x, ids))
                        n_ops += 1
                g.allocate(lambda t, kind, n_bytes: ids_bytes.get(t) or ggml.random_bytes(kind, n_bytes, rng))
                t_us, samples = _time(g, n_ops, budget_s)
            # a group of E/n_groups experts is touched a little less than all E would be: a small batch reads
            # the touched experts' bytes, so scale to the count that uniform routing over all E touches
            scale = touched / expected_touched(n_expert // n_groups, n_used, n_tokens)
            t_us, samples = t_us * scale, tuple(round(s * scale, 3) for s in samples)
            results.append(OpTiming(backend.device, "MUL_MAT_ID", ggml_type, (k, n, n_expert, n_used), n_tokens,
                                    t_us, samples))
    return results


def time_route(backend: ggml.Backend, n_expert: int, n_used: int, tokens: tuple[int, ...], budget_s: float,
               rng: np.random.Generator) -> list[OpTiming]:
    """The router's selection after its matrix, per batch size: probabilities, top-k, the selected weights
    normalized (qwen3moe's and Mixtral's norm_w)."""
    results = []
    copies = 8
    for n_tokens in tokens:
        with ggml.graph_on(backend) as g:
            for _ in range(copies):
                probs = g.op("ggml_soft_max", g.tensor("F32", n_expert, n_tokens))
                selected = g.op("ggml_argsort_top_k", probs, n_used)
                weights = g.op("ggml_get_rows", g.op("ggml_reshape_3d", probs, 1, n_expert, n_tokens), selected)
                weights = g.op("ggml_reshape_2d", weights, n_used, n_tokens)
                g.output(g.op("ggml_div", weights, g.op("ggml_sum_rows", weights)))
            g.allocate(lambda t, kind, n_bytes: ggml.random_bytes(kind, n_bytes, rng))
            t_us, samples = _time(g, copies, budget_s)
        results.append(OpTiming(backend.device, "MOE_ROUTE", "F32", (n_expert, n_used), n_tokens, t_us, samples))
    return results


def time_expert_upload(gpu: ggml.Backend, shape: tuple[str, int, int, int, int, bool], budget_s: float,
                       rng: np.random.Generator) -> list[OpTiming]:
    """Op offload's upload of the touched experts of one host expert tensor (pinned) into a GPU copy: one copy per
    run of consecutive touched experts. n_tokens holds the number of touched experts."""
    g = ggml.lib()
    ggml_type, k, n, n_expert, _, _ = shape
    expert_bytes = ggml.row_bytes(ggml_type, k) * n
    host = g.ggml_backend_buft_alloc_buffer(g.ggml_backend_dev_host_buffer_type(gpu.dev), expert_bytes * n_expert)
    if not host:
        return []
    results = []
    try:
        base = g.ggml_backend_buffer_get_base(host)
        with ggml.graph_on(gpu) as device_side:
            tensor = device_side.tensor("I8", expert_bytes * n_expert)
            device_side.allocate(lambda *a: None)
            for count in sorted({min(c, n_expert) for c in UPLOAD_COUNTS}):
                used = np.zeros(n_expert + 1, bool)
                used[rng.choice(n_expert, count, replace=False)] = True
                runs, start = [], None
                for e in range(n_expert + 1):
                    if used[e] and start is None:
                        start = e
                    elif not used[e] and start is not None:
                        runs.append((start * expert_bytes, (e - start) * expert_bytes))
                        start = None

                def upload(runs=runs):
                    for offset, size in runs:
                        g.ggml_backend_tensor_set(tensor, base + offset, offset, size)
                samples = ggml.time_us(upload, budget_s=budget_s)
                results.append(OpTiming(gpu.device, "EXPERT_UPLOAD", ggml_type, (expert_bytes, n_expert), count,
                                        statistics.median(samples), tuple(round(s, 3) for s in samples)))
    finally:
        g.ggml_backend_buffer_free(host)
    return results


def host_read_bytes_per_s(gpu: ggml.Backend | None, n_threads: int, n_bytes: int = HOST_READ_BYTES,
                          reps: int = 7) -> float:
    """Bytes per second `n_threads` threads read from host memory (a float32 sum of their share of the buffer,
    numpy releasing the GIL): the GPU's pinned host memory when there is a GPU (where a plan's host weights live),
    else ordinary memory. The median of `reps` passes after a warm-up."""
    g = ggml.lib()
    buffer = g.ggml_backend_buft_alloc_buffer(g.ggml_backend_dev_host_buffer_type(gpu.dev), n_bytes) if gpu else None
    try:
        if buffer:
            data = np.ctypeslib.as_array((ctypes.c_float * (n_bytes // 4)).from_address(
                g.ggml_backend_buffer_get_base(buffer)))
        else:
            data = np.empty(n_bytes // 4, np.float32)
        data.fill(1.0)                     # touch every page
        chunks = np.array_split(data, n_threads)
        rates = []
        with ThreadPoolExecutor(n_threads) as pool:
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                list(pool.map(np.sum, chunks))
                rates.append(n_bytes / (time.perf_counter() - t0))
        del data, chunks
        return statistics.median(rates[1:])
    finally:
        if buffer:
            g.ggml_backend_buffer_free(buffer)


def measure_moe(inv: ModelInventory | None, cpu: ggml.Backend, gpu: ggml.Backend | None, budget_s: float,
                progress=None) -> list[OpTiming]:
    """Every mixture-of-experts timing above for `inv`'s expert tensors (none for a dense model or no model)."""
    if inv is None or not inv.hparams.n_expert:
        return []
    rng = np.random.default_rng(0)
    shapes = expert_shapes(inv)
    host = ggml.lib().ggml_backend_dev_host_buffer_type(gpu.dev) if gpu else None
    ops: list[OpTiming] = []
    for backend in [b for b in (gpu, cpu) if b is not None]:
        tokens = EXPERT_TOKENS_GPU if backend is gpu else EXPERT_TOKENS_CPU
        for i, shape in enumerate(shapes):
            if progress:
                progress(f"MUL_MAT_ID {shape[0]} {shape[1]}x{shape[2]}x{shape[3]} on {backend.device}", i, len(shapes))
            ops += time_mul_mat_id(backend, shape, tokens, budget_s, rng, host if backend is cpu else None)
        ops += time_route(backend, inv.hparams.n_expert, inv.hparams.n_expert_used,
                          tuple(t for t in ROUTE_TOKENS if backend is gpu or t <= 512), budget_s, rng)
    if gpu is not None:
        for shape in shapes:
            ops += time_expert_upload(gpu, shape, budget_s, rng)
    log.info("measured %d mixture-of-experts points", len(ops))
    return ops
