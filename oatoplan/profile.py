"""Stage 2: measure what operators and transfers cost on this machine, through the real ggml backends that will run
the plan. Entry point: `measure_profile(...)` -> Profile.

Every operator is timed in a graph of several independent copies (distinct weights), so the per-op time excludes the
graph launch (measured on its own as `launch_us`) and reads weights from memory, as a real decode does, not from a
cache warmed by the previous repetition. Each point: one warm-up, then samples until a time budget; the median is kept
with its samples.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import ggml, profile_moe
from .artifacts import read_json
from .cost import ATTN_QUANTIZED_TYPE
from .errors import ArtifactError, BackendError, ProfileError
from .machine import default_threads, gpu_devices, machine_identity
from .paths import profile_dirs, user_profile_dir
from .schema import SCHEMA_VERSION, ModelInventory, OpTiming, Profile, TransferTiming

log = logging.getLogger(__name__)

# Weight types found in common GGUF quantizations.
WEIGHT_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "F16", "BF16")
# Shape grid when no model is given: a 7-8B model's attention and FFN matrices, (K, N).
DEFAULT_SHAPES = ((4096, 4096), (4096, 14336))
DECODE_TOKENS = (1, 2, 4, 8)
PREFILL_TOKENS_GPU = (32, 128, 512, 2048, 4096)
PREFILL_TOKENS_CPU = (32, 128, 512)          # larger CPU batches are extrapolated (op offload takes them to the GPU)
KV_LENGTHS = (256, 1024, 4096, 16384, 32768)
ATTN_TOKENS_GPU = (1, 512, 2048)
ATTN_TOKENS_CPU = (1, 512)
CPU_MAX_ATTN_WORK = 512 * 4096               # n_tokens x n_kv beyond this is extrapolated on the CPU
ELEMENTWISE_TOKENS = (1, 32, 512, 2048)
# Independent copies per graph: enough weight bytes to defeat caches (an H100's L2 is 50 MB; server LLCs ~100 MB),
# but few enough that per-node overhead (a thread barrier each) does not dominate a small matrix's time. Too few
# copies leave small matrices partly in cache, too many charge them the barriers; both were tried:
# benchmarks/results/2026-11-22-h100-validate-qwen2-7b-pp512-1024copies.json and the README beside it.
COPY_BYTES = 256 << 20
MAX_COPIES = 16
# One-token attention nodes are timed the same way, over enough copies of K/V to defeat caches (a real decode reads
# every layer's cache), at least 8 and up to 64: their nodes are long enough that the barriers do not count. With 8
# copies whatever the length, the H200 machine's Xeon timed long caches short
# (benchmarks/results/2026-12-02-h200-attn-copies-series-5a28efe5.json).
ATTN_MIN_COPIES, ATTN_MAX_COPIES = 8, 64
TRANSFER_BIG_BYTES = 256 << 20
TRANSFER_SMALL_BYTES = 16 << 10              # one token's activations of a large model, rounded up


@dataclass(frozen=True)
class ModelShapes:
    """What the profiler times: weight matrices (type, K, N), attention head layout, element-wise widths."""
    matrices: tuple[tuple[str, int, int], ...]
    head_dim: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_ff: int
    embd_type: str


def model_shapes(inv: ModelInventory | None) -> ModelShapes:
    grid = tuple((t, k, n) for t in WEIGHT_TYPES for k, n in DEFAULT_SHAPES)
    if inv is None:
        return ModelShapes(grid, 128, 32, 8, 4096, 14336, "Q4_K")
    hp = inv.hparams
    own = {(t.ggml_type, t.shape[0], t.shape[1]) for t in inv.tensors
           if t.op == "MUL_MAT" and len(t.shape) == 2 and t.ggml_type in _SUPPORTED}
    out = inv.output_matrix()
    own.add((out.ggml_type, out.shape[0], out.shape[1]))
    matrices = tuple(sorted(own)) + tuple((t, k, n) for t, k, n in grid if k == 4096 and n == 4096)
    return ModelShapes(matrices, hp.head_dim_k, hp.n_head, max(hp.n_head_kv) or hp.n_head, hp.n_embd, hp.n_ff,
                       inv.tensor("token_embd.weight").ggml_type)


_SUPPORTED = set(WEIGHT_TYPES) | {"Q4_1", "Q5_1", "Q2_K", "Q3_K", "F32"}


def _copies(weight_bytes: int, n_tokens: int, copy_bytes: int = COPY_BYTES) -> int:
    if n_tokens >= 32:
        return 2
    return max(2, min(MAX_COPIES, math.ceil(copy_bytes / max(weight_bytes, 1))))


class _Timer:
    def __init__(self, budget_s: float):
        self.budget_s = budget_s

    def time(self, graph: ggml.Graph, copies: int) -> tuple[float, tuple[float, ...]]:
        samples = [s / copies for s in ggml.time_us(graph.compute, budget_s=self.budget_s)]
        return statistics.median(samples), tuple(round(s, 3) for s in samples)


def _fill(rng: np.random.Generator):
    cache: dict[tuple[str, int], bytes] = {}

    def fill(tensor, ggml_type: str, n_bytes: int) -> bytes:
        key = (ggml_type, n_bytes)      # the same bytes for every copy: contents do not change the time
        if key not in cache:
            cache[key] = ggml.random_bytes(ggml_type, n_bytes, rng)
        return cache[key]
    return fill


def _time_matmuls(backend: ggml.Backend, ggml_type: str, k: int, n: int, tokens: tuple[int, ...], timer: _Timer,
                  fill, host_buffer_type: int | None = None, copy_bytes: int = COPY_BYTES) -> list[OpTiming]:
    """MUL_MAT of a (k, n) weight at each token count. On the CPU with a GPU present, the weights sit where a
    plan puts host weights: the GPU's pinned host buffer type (page-locked memory streams slower than the
    huge-page-backed buffers the CPU backend allocates for itself)."""
    weight_bytes = ggml.row_bytes(ggml_type, k) * n
    results = []
    with ggml.graph_on(backend) as weights:
        copies = [weights.tensor(ggml_type, k, n) for _ in range(_copies(weight_bytes, 1, copy_bytes))]
        weights.allocate(fill, host_buffer_type)
        for n_tokens in tokens:
            used = copies[:_copies(weight_bytes, n_tokens, copy_bytes)]
            with ggml.graph_on(backend) as g:
                for w in used:
                    g.output(g.op("ggml_mul_mat", w, g.tensor("F32", k, n_tokens)))
                g.allocate(fill)
                t_us, samples = timer.time(g, len(used))
            results.append(OpTiming(backend.device, "MUL_MAT", ggml_type, (k, n), n_tokens, t_us, samples))
    return results


def attention_copies(s: ModelShapes, n_tokens: int, n_kv: int, kv_type: str = "F16") -> int:
    """Copies of an attention node per timed graph: for one token, enough K and V bytes (of `kv_type`) for COPY_BYTES
    (ATTN_MIN_COPIES..ATTN_MAX_COPIES); a batch's node is long and reads its K/V many times: one."""
    if n_tokens != 1:
        return 1
    kv_bytes = 2 * ggml.row_bytes(kv_type, s.head_dim) * n_kv * s.n_head_kv
    return max(ATTN_MIN_COPIES, min(ATTN_MAX_COPIES, math.ceil(COPY_BYTES / kv_bytes)))


def _time_attention(backend: ggml.Backend, s: ModelShapes, n_tokens: int, n_kv: int, timer: _Timer,
                    fill, kv_type: str = "F16") -> OpTiming:
    copies = attention_copies(s, n_tokens, n_kv, kv_type)
    with ggml.graph_on(backend) as g:
        for _ in range(copies):
            q = g.tensor("F32", s.head_dim, n_tokens, s.n_head)
            k = g.tensor(kv_type, s.head_dim, n_kv, s.n_head_kv)
            v = g.tensor(kv_type, s.head_dim, n_kv, s.n_head_kv)
            g.output(g.op("ggml_flash_attn_ext", q, k, v, None, 1.0 / math.sqrt(s.head_dim), 0.0, 0.0))
        g.allocate(fill)
        t_us, samples = timer.time(g, copies)
    return OpTiming(backend.device, "FLASH_ATTN_EXT", kv_type, (s.head_dim, s.n_head, s.n_head_kv, n_kv), n_tokens,
                    t_us, samples)


def _elementwise_ops(s: ModelShapes):
    """(op name, type, elements per token, builder(graph, n_tokens) -> output tensor)."""
    n_kv_embd = s.head_dim * s.n_head_kv

    def rms_norm(g, n):
        return g.op("ggml_rms_norm", g.tensor("F32", s.n_embd, n), ctypes.c_float(1e-6))

    def mul(g, n):
        return g.op("ggml_mul", g.tensor("F32", s.n_embd, n), g.tensor("F32", s.n_embd))

    def add(g, n):
        return g.op("ggml_add", g.tensor("F32", s.n_embd, n), g.tensor("F32", s.n_embd, n))

    def glu(g, n):
        return g.op("ggml_swiglu_split", g.tensor("F32", s.n_ff, n), g.tensor("F32", s.n_ff, n))

    def rope(g, n):     # NEOX mode (2), as Qwen2/Gemma use
        return g.op("ggml_rope_ext", g.tensor("F32", s.head_dim, s.n_head, n), g.tensor("I32", n), None,
                    s.head_dim, 2, 0, 10000.0, 1.0, 0.0, 1.0, 32.0, 1.0)

    def set_rows(g, n):  # the KV write: n tokens' K rows into an f16 cache of 4096 cells
        return g.op("ggml_set_rows", g.tensor("F16", n_kv_embd, 4096), g.tensor("F32", n_kv_embd, n),
                    g.tensor("I64", n))

    def get_rows(g, n):  # the input embedding lookup, from a 32k-row table
        return g.op("ggml_get_rows", g.tensor(s.embd_type, s.n_embd, 32768), g.tensor("I32", n))

    return [("RMS_NORM", "F32", s.n_embd, rms_norm), ("MUL", "F32", s.n_embd, mul), ("ADD", "F32", s.n_embd, add),
            ("GLU", "F32", s.n_ff, glu), ("ROPE", "F32", s.head_dim * s.n_head, rope),
            ("SET_ROWS", "F16", n_kv_embd, set_rows), ("GET_ROWS", s.embd_type, s.n_embd, get_rows)]


def _time_elementwise(backend: ggml.Backend, s: ModelShapes, timer: _Timer, fill) -> list[OpTiming]:
    results = []
    for op, ggml_type, width, build in _elementwise_ops(s):
        for n_tokens in ELEMENTWISE_TOKENS:
            copies = 8
            with ggml.graph_on(backend) as g:
                for _ in range(copies):
                    g.output(build(g, n_tokens))
                g.allocate(fill)
                t_us, samples = timer.time(g, copies)
            results.append(OpTiming(backend.device, op, ggml_type, (width,), n_tokens, t_us, samples))
    return results


def _time_launch(backend: ggml.Backend, timer: _Timer, fill) -> float:
    with ggml.graph_on(backend) as g:
        g.output(g.op("ggml_add", g.tensor("F32", 16), g.tensor("F32", 16)))
        g.allocate(fill)
        return statistics.median(ggml.time_us(g.compute, min_samples=50, max_samples=500, budget_s=timer.budget_s))


def _time_transfers(backend: ggml.Backend, timer: _Timer) -> list[TransferTiming]:
    """Host<->device copies of a big and a small buffer, from pinned (the device's host buffer type) and pageable
    (numpy) memory, through ggml_backend_tensor_set/get (synchronous)."""
    g = ggml.lib()
    results = []
    host_buffer = g.ggml_backend_buft_alloc_buffer(g.ggml_backend_dev_host_buffer_type(backend.dev),
                                                   TRANSFER_BIG_BYTES)
    if not host_buffer:
        raise ProfileError(f"could not allocate {TRANSFER_BIG_BYTES >> 20} MiB of pinned host memory")
    try:
        pinned = g.ggml_backend_buffer_get_base(host_buffer)
        pageable = np.ones(TRANSFER_BIG_BYTES, np.uint8)
        with ggml.graph_on(backend) as device_side:
            tensor = device_side.tensor("I8", TRANSFER_BIG_BYTES)
            device_side.allocate(lambda *a: None)
            for n_bytes in (TRANSFER_BIG_BYTES, TRANSFER_SMALL_BYTES):
                for memory, pointer in (("pinned", pinned), ("pageable", pageable.ctypes.data)):
                    for direction, fn in (("h2d", g.ggml_backend_tensor_set), ("d2h", g.ggml_backend_tensor_get)):
                        samples = ggml.time_us(lambda: fn(tensor, pointer, 0, n_bytes), budget_s=timer.budget_s)
                        results.append(TransferTiming(direction, memory, n_bytes, statistics.median(samples),
                                                      tuple(round(s, 3) for s in samples)))
    finally:
        g.ggml_backend_buffer_free(host_buffer)
    return results


def _time_busy_uploads(gpu: ggml.Backend, s: ModelShapes, timer: _Timer, fill) -> list[TransferTiming]:
    """Host-to-device copies from pinned memory while the GPU computes, as weight streaming does them: a second
    backend on the device (its own stream) copies while the first runs the model's largest matmul at 512 tokens,
    queued back to back for twice the copy's idle time; the copy's time is from its issue to that backend's
    synchronize ("pinned-busy")."""
    g = ggml.lib()
    k, n, ggml_type = _largest(s)
    copier = g.ggml_backend_dev_init(gpu.dev, None)
    host_buffer = g.ggml_backend_buft_alloc_buffer(g.ggml_backend_dev_host_buffer_type(gpu.dev), TRANSFER_BIG_BYTES)
    results = []
    try:
        if not copier or not host_buffer:
            raise ProfileError("could not set up a second stream and pinned memory to time copies under load")
        pinned = g.ggml_backend_buffer_get_base(host_buffer)
        with ggml.graph_on(gpu) as device_side, ggml.graph_on(gpu) as work:
            tensor = device_side.tensor("I8", TRANSFER_BIG_BYTES)
            device_side.allocate(lambda *a: None)
            work.output(work.op("ggml_mul_mat", work.tensor(ggml_type, k, n), work.tensor("F32", k, 512)))
            work.allocate(fill)
            idle_us = statistics.median(ggml.time_us(
                lambda: g.ggml_backend_tensor_set(tensor, pinned, 0, TRANSFER_BIG_BYTES), budget_s=timer.budget_s))
            repeats = max(2, math.ceil(2 * idle_us / statistics.median(ggml.time_us(work.compute,
                                                                                 budget_s=timer.budget_s))))
            for n_bytes in (TRANSFER_BIG_BYTES, TRANSFER_BIG_BYTES // 4):
                def busy() -> float:
                    for _ in range(repeats):
                        g.ggml_backend_graph_compute_async(gpu.handle, work.graph)
                    t0 = time.perf_counter()
                    g.ggml_backend_tensor_set_async(copier, tensor, pinned, 0, n_bytes)
                    g.ggml_backend_synchronize(copier)
                    t_us = (time.perf_counter() - t0) * 1e6
                    g.ggml_backend_synchronize(gpu.handle)
                    return t_us
                busy()
                samples = [busy() for _ in range(7)]
                results.append(TransferTiming("h2d", "pinned-busy", n_bytes, statistics.median(samples),
                                              tuple(round(t, 3) for t in samples)))
    finally:
        if host_buffer:
            g.ggml_backend_buffer_free(host_buffer)
        if copier:
            g.ggml_backend_free(copier)
    return results


def _largest(s: ModelShapes) -> tuple[int, int, str]:
    """(k, n, type) of the model's largest matrix."""
    ggml_type, k, n = max(s.matrices, key=lambda m: m[1] * m[2])
    return k, n, ggml_type


def _time_crossing(gpu: ggml.Backend, cpu: ggml.Backend, s: ModelShapes, timer: _Timer, fill) -> float:
    """One CPU<->GPU crossing as a decode graph pays it: a GPU split, its activation copied to the host, a CPU
    split (its threadpool woken after idling through the GPU work), the result copied back. Each split is one
    mat-vec; the crossing is half of (round trip - both splits timed alone, back to back)."""
    g = ggml.lib()
    width = -(-s.n_embd // 256) * 256     # whole Q4_K blocks (CUDA's mat-vec asserts it; n_embd 640 is not)
    with ggml.graph_on(gpu) as on_gpu, ggml.graph_on(cpu) as on_cpu:
        gpu_in = on_gpu.tensor("F32", width, 1)
        gpu_out = on_gpu.op("ggml_mul_mat", on_gpu.tensor("Q4_K", width, width), gpu_in)
        on_gpu.output(gpu_out)
        cpu_in = on_cpu.tensor("F32", width, 1)
        cpu_out = on_cpu.op("ggml_mul_mat", on_cpu.tensor("Q4_K", width, width), cpu_in)
        on_cpu.output(cpu_out)
        on_gpu.allocate(fill)
        on_cpu.allocate(fill, g.ggml_backend_dev_host_buffer_type(gpu.dev))
        staging = np.zeros(width, np.float32)
        n_bytes = staging.nbytes

        def round_trip() -> None:
            on_gpu.compute()
            g.ggml_backend_tensor_get(gpu_out, staging.ctypes.data, 0, n_bytes)
            g.ggml_backend_tensor_set(cpu_in, staging.ctypes.data, 0, n_bytes)
            on_cpu.compute()
            g.ggml_backend_tensor_get(cpu_out, staging.ctypes.data, 0, n_bytes)
            g.ggml_backend_tensor_set(gpu_in, staging.ctypes.data, 0, n_bytes)

        alone = statistics.median(ggml.time_us(on_gpu.compute, budget_s=timer.budget_s)) + \
            statistics.median(ggml.time_us(on_cpu.compute, budget_s=timer.budget_s))
        both = statistics.median(ggml.time_us(round_trip, min_samples=20, max_samples=200, budget_s=timer.budget_s))
    return max(both - alone, 0.0) / 2


def measure_profile(inventory: ModelInventory | None = None, *, gpu_device: str | None = None,
                    n_threads: int | None = None, budget_s: float = 0.25,
                    progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """Profile the CPU and (if `gpu_device`, e.g. "CUDA0") one GPU for `inventory`'s shapes (or a 7-8B grid).
    `progress(task, done, total)` is called as work advances. A failure mid-way raises ProfileError naming what was
    measured so far."""
    started = time.perf_counter()
    shapes = model_shapes(inventory)
    n_threads = n_threads or default_threads()
    timer, fill = _Timer(budget_s), _fill(np.random.default_rng(0))
    cpu = ggml.Backend("CPU", n_threads)
    gpu = ggml.Backend(gpu_device) if gpu_device else None
    backends = [b for b in (gpu, cpu) if b is not None]
    steps = []
    for b in backends:
        prefill = PREFILL_TOKENS_GPU if b is gpu else PREFILL_TOKENS_CPU
        steps += [("matmul", b, m, DECODE_TOKENS + prefill) for m in shapes.matrices]
        attn_tokens = ATTN_TOKENS_GPU if b is gpu else ATTN_TOKENS_CPU
        steps += [("attention", b, (n, kv, "F16"), None) for n in attn_tokens for kv in KV_LENGTHS
                  if b is gpu or n * kv <= CPU_MAX_ATTN_WORK or n == 1]
        steps += [("attention", b, (1, kv, ATTN_QUANTIZED_TYPE), None) for kv in KV_LENGTHS
                  if shapes.head_dim % ggml.block_elements(ATTN_QUANTIZED_TYPE) == 0]   # else no valid row
        steps.append(("elementwise", b, None, None))
    ops: list[OpTiming] = []
    launch: dict[str, float] = {}
    transfers: list[TransferTiming] = []
    gpu_reserved, crossing = 0, 0.0
    try:
        if gpu is not None:
            free, total = gpu.memory()
            gpu_reserved = total - free
        for i, (kind, backend, what, tokens) in enumerate(steps):
            if progress:
                progress(f"{kind} on {backend.device}", i, len(steps))
            if kind == "matmul":
                host = ggml.lib().ggml_backend_dev_host_buffer_type(gpu.dev) if gpu and backend is cpu else None
                ops += _time_matmuls(backend, *what, tokens, timer, fill, host)
            elif kind == "attention":
                ops.append(_time_attention(backend, shapes, what[0], what[1], timer, fill, what[2]))
            else:
                ops += _time_elementwise(backend, shapes, timer, fill)
                launch[backend.device] = _time_launch(backend, timer, fill)
        if gpu is not None:
            if progress:
                progress("transfers", len(steps), len(steps) + 1)
            transfers = _time_transfers(gpu, timer) + _time_busy_uploads(gpu, shapes, timer, fill)
            crossing = _time_crossing(gpu, cpu, shapes, timer, fill)
        ops += profile_moe.measure_moe(inventory, cpu, gpu, budget_s, progress)
        host_read = profile_moe.host_read_bytes_per_s(gpu, n_threads)
    except (BackendError, ProfileError) as exc:
        raise ProfileError(f"profiling stopped: {exc}; measured {len(ops)} operator points and "
                           f"{len(transfers)} transfers before that, nothing written") from None
    finally:
        for b in backends:
            b.close()
    streaming = [o for o in ops if o.device == "CPU" and o.op == "MUL_MAT" and o.n_tokens == 1]
    biggest = max(streaming, key=lambda o: o.shape[0] * o.shape[1] * ggml.row_bytes(o.ggml_type, 1))
    cpu_read = ggml.row_bytes(biggest.ggml_type, biggest.shape[0]) * biggest.shape[1] / (biggest.t_us * 1e-6)
    machine = machine_identity(gpu_device)
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    name = re.sub(r"[^a-z0-9]+", "-", (machine.gpu_name or "cpu").lower()).strip("-")
    digest = hashlib.sha256(f"{machine}{created}".encode()).hexdigest()[:8]
    notes = () if gpu is not None else ("no GPU: only the CPU side was profiled",)
    return Profile(SCHEMA_VERSION, f"{name}-{n_threads}t-{created[:10]}-{digest}", created, machine, n_threads,
                   gpu_device or "", tuple(ops), tuple(transfers), launch, round(crossing, 3), round(cpu_read),
                   gpu_reserved, round(time.perf_counter() - started, 1), notes, host_read_bytes_per_s=round(host_read))


def find_profile(path: Path | None = None) -> Profile:
    """`path`, or a profile measured with this machine's GPU (or, with no GPU, a CPU-only one): the newest in the
    user's profile directory (paths.user_profile_dir), else the newest shipped with oatoplan. A file there that is
    not a readable profile is skipped with a warning."""
    if path:
        return read_json(Profile, path)
    names = {d.description for d in gpu_devices()}
    readable: dict[Path, list[Profile]] = {}
    for directory in profile_dirs():
        readable[directory] = []
        for candidate in sorted(directory.glob("*.json")):
            try:
                readable[directory].append(read_json(Profile, candidate))
            except ArtifactError as exc:
                log.warning("skipping %s", exc)
        for found in sorted(readable[directory], key=lambda p: p.created_utc, reverse=True):
            if found.machine.gpu_name in names or (not names and not found.machine.gpu_name):
                return found
    # a GPU machine with no profile of its GPU: a CPU-only profile measured here (profile run --cpu) still plans the CPU
    measured_here = [p for p in readable.get(user_profile_dir(), []) if not p.machine.gpu_name]
    if names and measured_here:
        found = max(measured_here, key=lambda p: p.created_utc)
        log.warning("no profile of %s: using the CPU-only profile %s", ", ".join(sorted(names)), found.profile_id)
        return found
    machine = ", ".join(sorted(names)) or "no GPU"
    raise ProfileError(f"no profile for this machine ({machine}) in {user_profile_dir()} or among oatoplan's shipped "
                       f"profiles; run 'oatoplan profile run' or pass --profile FILE")

