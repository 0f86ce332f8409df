"""ctypes bindings to the libggml that llama-cpp-python loaded: the device registry, and just enough of the graph API
to time single operators on a real backend (the profiler's microbenchmarks).

Everything goes through the very libggml that libllama links (its soname, libggml.so.0, opened with RTLD_NOLOAD), so
the devices, buffer types and kernels are the ones a loaded model uses. Not `llama_cpp._ggml.libggml`: that opens
`libggml.so`, which the wheel stores as a separate copy of the file (zip has no symlinks), with a device registry of
its own, so an RPC device registered there is invisible to llama.cpp.
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import BackendError
from .schema import CpuTrace

try:
    import llama_cpp     # loads libllama and, through its DT_NEEDED, libggml.so.0
    from llama_cpp._ggml import libggml as _stock_handle
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = _stock_handle = None


def _libllama_ggml() -> ctypes.CDLL | None:
    """libllama's own libggml; None without llama-cpp-python. A build whose libggml has another soname falls back to
    llama-cpp-python's handle."""
    if llama_cpp is None:
        return None
    try:
        return ctypes.CDLL("libggml.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return _stock_handle


libggml = _libllama_ggml()

p = ctypes.c_void_p
_i64, _f32, _sz = ctypes.c_int64, ctypes.c_float, ctypes.c_size_t


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", _sz), ("mem_buffer", p), ("no_alloc", ctypes.c_bool)]


_DECLARATIONS = [
    # device registry
    ("ggml_backend_dev_count", _sz, []),
    ("ggml_backend_dev_get", p, [_sz]),
    ("ggml_backend_dev_name", ctypes.c_char_p, [p]),
    ("ggml_backend_dev_description", ctypes.c_char_p, [p]),
    ("ggml_backend_dev_type", ctypes.c_int, [p]),
    ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(_sz), ctypes.POINTER(_sz)]),
    ("ggml_backend_dev_buffer_type", p, [p]),
    ("ggml_backend_dev_host_buffer_type", p, [p]),
    ("ggml_backend_dev_backend_reg", p, [p]),
    ("ggml_backend_reg_name", ctypes.c_char_p, [p]),
    ("ggml_backend_reg_by_name", p, [ctypes.c_char_p]),
    ("ggml_backend_reg_get_proc_address", p, [p, ctypes.c_char_p]),
    ("ggml_backend_reg_dev_count", _sz, [p]),
    ("ggml_backend_register", None, [p]),
    ("ggml_version", ctypes.c_char_p, []),
    ("ggml_commit", ctypes.c_char_p, []),
    # backends and buffers
    ("ggml_backend_dev_init", p, [p, ctypes.c_char_p]),
    ("ggml_backend_free", None, [p]),
    ("ggml_backend_synchronize", None, [p]),
    ("ggml_backend_graph_compute", ctypes.c_int, [p, p]),
    ("ggml_backend_graph_compute_async", ctypes.c_int, [p, p]),
    ("ggml_backend_tensor_set_async", None, [p, p, p, _sz, _sz]),
    ("ggml_backend_alloc_ctx_tensors", p, [p, p]),
    ("ggml_backend_alloc_ctx_tensors_from_buft", p, [p, p]),
    ("ggml_backend_buft_alloc_buffer", p, [p, _sz]),
    ("ggml_backend_buffer_get_base", p, [p]),
    ("ggml_backend_buffer_free", None, [p]),
    ("ggml_backend_tensor_set", None, [p, p, _sz, _sz]),
    ("ggml_backend_tensor_get", None, [p, p, _sz, _sz]),
    # contexts, tensors, ops, graphs
    ("ggml_init", p, [InitParams]),
    ("ggml_free", None, [p]),
    ("ggml_tensor_overhead", _sz, []),
    ("ggml_graph_overhead_custom", _sz, [_sz, ctypes.c_bool]),
    ("ggml_new_tensor_1d", p, [p, ctypes.c_int, _i64]),
    ("ggml_new_tensor_2d", p, [p, ctypes.c_int, _i64, _i64]),
    ("ggml_new_tensor_3d", p, [p, ctypes.c_int, _i64, _i64, _i64]),
    ("ggml_nbytes", _sz, [p]),
    ("ggml_mul_mat", p, [p, p, p]),
    ("ggml_add", p, [p, p, p]),
    ("ggml_mul", p, [p, p, p]),
    ("ggml_rms_norm", p, [p, p, _f32]),
    ("ggml_swiglu_split", p, [p, p, p]),
    ("ggml_geglu_split", p, [p, p, p]),
    ("ggml_get_rows", p, [p, p, p]),
    ("ggml_set_rows", p, [p, p, p, p]),
    ("ggml_rope_ext", p, [p, p, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [_f32] * 6),
    ("ggml_flash_attn_ext", p, [p, p, p, p, p, _f32, _f32, _f32]),
    # a mixture-of-experts FFN as llama.cpp's build_moe_ffn writes it (profile_moe.py)
    ("ggml_mul_mat_id", p, [p, p, p, p]),
    ("ggml_soft_max", p, [p, p]),
    ("ggml_argsort_top_k", p, [p, p, ctypes.c_int]),
    ("ggml_sum_rows", p, [p, p]),
    ("ggml_div", p, [p, p, p]),
    ("ggml_reshape_2d", p, [p, p, _i64, _i64]),
    ("ggml_reshape_3d", p, [p, p, _i64, _i64, _i64]),
    # attention as llama.cpp's build_attn_mha writes it (tests of the segment KV cache's attention)
    ("ggml_soft_max_ext", p, [p, p, p, _f32, _f32]),
    ("ggml_permute", p, [p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    ("ggml_cont", p, [p, p]),
    ("ggml_new_graph_custom", p, [p, _sz, ctypes.c_bool]),
    ("ggml_build_forward_expand", None, [p, p]),
]
_OPTIONAL = [("ggml_backend_cpu_set_n_threads", None, [p, ctypes.c_int])]   # in libggml-cpu


def lib() -> ctypes.CDLL:
    """libggml with oatoplan's declarations (set once)."""
    if not getattr(libggml, "_oatoplan_declared", False):
        for name, restype, argtypes in _DECLARATIONS + _OPTIONAL:
            try:
                fn = getattr(libggml, name)
            except AttributeError:
                if (name, restype, argtypes) in _OPTIONAL:
                    continue
                raise
            fn.restype, fn.argtypes = restype, argtypes
        libggml._oatoplan_declared = True
    return libggml


def _oato_cpu(name: str):
    """A function of oatoplan's fused CPU ops (native/ggml-cpu/oato-fused.h) in the libggml-cpu that libggml loaded,
    or None for a stock build."""
    lib()   # libggml loads libggml-cpu.so.0; take that very copy by its soname (the wheel also holds other copies)
    try:
        return getattr(ctypes.CDLL("libggml-cpu.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LAZY), name)
    except (OSError, AttributeError):
        return None


def _oato_base(name: str):
    """A function of oatoplan's scheduler patch (native/oato-stream.h) in the libggml-base that libggml loaded, or
    None for a build without it."""
    lib()
    try:
        return getattr(ctypes.CDLL("libggml-base.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LAZY), name)
    except (OSError, AttributeError):
        return None


def segment_attention():
    """oatoplan's exact attention over two KV segments (native/oato-attn.c, patches/0006): `oato_attn_segmented(ctx,
    q, k_a, v_a, mask_a, k_b, v_b, mask_b, mask_ab, sinks, scale, max_bias, logit_softcap, flash_attn)`, or None for
    a build without it."""
    fn = _oato_base("oato_attn_segmented")
    if fn is not None:
        fn.restype, fn.argtypes = p, [p] * 10 + [_f32] * 3 + [ctypes.c_bool]
    return fn


def flash_attn_lse():
    """`oato_flash_attn_ext_lse(ctx, q, k, v, mask, scale, max_bias, logit_softcap)` (patches/0006): FLASH_ATTN_EXT
    whose rows carry one more column, their log-sum-exp; None for a build without it."""
    fn = _oato_base("oato_flash_attn_ext_lse")
    if fn is not None:
        fn.restype, fn.argtypes = p, [p] * 5 + [_f32] * 3
    return fn


@contextmanager
def environment(**values) -> Iterator[None]:
    """OATO_* variables set (None: unset) while llama.cpp makes a context (it reads them then), restored after."""
    saved = {k: os.environ.pop(k, None) for k in values}
    os.environ.update({k: str(v) for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def memory_bytes(ctx: int) -> int | None:
    """Bytes of the KV buffers that llama context `ctx` holds now (oatoplan's segment KV cache grows them; patches/
    0007), or None for a build without the function."""
    try:
        fn = llama_cpp.llama_cpp._lib.oato_memory_bytes
    except AttributeError:
        return None
    fn.restype, fn.argtypes = _sz, [p]
    return int(fn(llama_cpp.llama_get_memory(ctx)))


def memory_breakdown(ctx: int, part: str = "context") -> dict[str, int] | None:
    """Bytes that llama context `ctx` holds now per buffer type name ("CPU", "CUDA0", "RPC0[host:port]"), of one part:
    "context" (the KV cache; a segment KV cache's segment in host memory is under "CPU", or the GPU's pinned
    "CUDA_Host" while prompt batches may copy it, patches/0012), "compute" (the
    scheduler's compute buffers) or "model" (weights); patches/0008. None for a build without the function."""
    try:
        fn = llama_cpp.llama_cpp._lib.oato_memory_breakdown
    except AttributeError:
        return None
    column = ("model", "context", "compute").index(part)
    fn.restype, fn.argtypes = _sz, [p, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(_sz), _sz]
    n = int(fn(ctx, None, None, 0))
    names, n_bytes = (ctypes.c_char_p * n)(), (_sz * (3 * n))()
    fn(ctx, names, n_bytes, n)
    return {names[i].decode(): int(n_bytes[3 * i + column]) for i in range(n) if n_bytes[3 * i + column]}


def stream_stats() -> tuple[int, int, int, int] | None:
    """Weight streaming since the last reset_stream_stats(): (weights streamed, bytes streamed, host weights of GPU
    splits copied the stock way while streaming was on, VRAM bytes of the staging rings allocated now), or None for a
    build without weight streaming."""
    return _counts(_oato_base("oato_sched_stream_stats"), 4)


def _counts(fn, n: int) -> tuple[int, ...] | None:
    """What an oatoplan counter function `void f(int64_t * out)` writes into n values (None without the function)."""
    if fn is None:
        return None
    counts = (_i64 * n)()
    fn.restype, fn.argtypes = None, [ctypes.POINTER(_i64)]
    fn(counts)
    return tuple(counts)


def reset_stream_stats() -> None:
    fn = _oato_base("oato_sched_stream_stats_reset")
    if fn is not None:
        fn.restype, fn.argtypes = None, []
        fn()


def fusion_counts() -> tuple[int, ...] | None:
    """Nodes run through each of oatoplan's fused CPU ops since load (gate+up+GLU, mat-vec+ADD, RMS_NORM+MUL+ADD),
    or None when the loaded libggml-cpu is not our patched one."""
    return _counts(_oato_cpu("oato_cpu_fusion_counts"), 3)


def _set_enabled(symbol: str, what: str, enabled: bool) -> None:
    fn = _oato_cpu(symbol)
    if fn is None:
        raise BackendError(f"this libggml-cpu has no oatoplan {what}; run `oatoplan build`")
    fn.restype, fn.argtypes = None, [ctypes.c_int]
    fn(int(enabled))


def set_fusion(enabled: bool) -> None:
    """Turn oatoplan's fused CPU ops on or off for the following graph computations."""
    _set_enabled("oato_cpu_fusion_set_enabled", "fused ops", enabled)


def set_matvec(enabled: bool) -> None:
    """Turn oatoplan's prefetching Q4_K/Q6_K dot products (native/ggml-cpu/oato-matvec.c) on or off for the
    following graph computations; off, ggml's own kernels run."""
    _set_enabled("oato_cpu_matvec_set_enabled", "prefetching dot products", enabled)


def matvec_enabled() -> bool | None:
    """Whether the prefetching dot products are on (OATO_CPU_MATVEC=ggml turns them off), None for a build
    without them."""
    fn = _oato_cpu("oato_cpu_matvec_enabled")
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return bool(fn())


def cpu_trace(reset: bool = False) -> CpuTrace | None:
    """Read (then optionally reset) the CPU op timing; None when the loaded libggml-cpu has none."""
    read, n_ops = _oato_cpu("oato_cpu_trace_read"), _oato_cpu("oato_cpu_trace_n_ops")
    if read is None or n_ops is None:
        return None
    n = n_ops()
    totals, arrays = (_i64 * 3)(), [(_i64 * n)() for _ in range(4)]
    read.restype, read.argtypes = None, [ctypes.POINTER(_i64)] * 5
    read(totals, *arrays)
    g = lib()
    g.ggml_op_name.restype, g.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    used = [i for i in range(n) if arrays[1][i]]
    ns, count, fused, weight = ({g.ggml_op_name(i).decode(): int(a[i]) for i in used} for a in arrays)
    if reset:
        _oato_cpu("oato_cpu_trace_reset")()
    return CpuTrace(int(totals[0]), int(totals[1]), int(totals[2]), ns, count, fused, weight)


def set_cpu_trace(enabled: bool) -> None:
    """Turn the CPU op timing on or off for the following graph computations."""
    _set_enabled("oato_cpu_trace_set_enabled", "op timing", enabled)


def device_handle(name: str) -> int:
    g = lib()
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_name(dev).decode() == name:
            return dev
    raise BackendError(f"device {name!r} is not in this llama.cpp build")


def type_id(name: str) -> int:
    return int(GGMLQuantizationType[name.upper()])


def block_elements(ggml_type: str) -> int:
    """Values in one block of `ggml_type` (1 for f32/f16/bf16, 32 for q8_0, 256 for the k-quants)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type.upper()]][0]


def row_bytes(ggml_type: str, n_elements: int) -> int:
    """Bytes of `n_elements` values of `ggml_type` (a whole number of blocks)."""
    block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type.upper()]]
    return n_elements // block_elements * block_bytes


def random_bytes(ggml_type: str, n_bytes: int, rng: np.random.Generator, block_scale: float = 2e-4) -> bytes:
    """`n_bytes` of valid `ggml_type` data: small finite floats, or random quantized blocks with small fp16 scales
    `block_scale` (random scale bytes could be inf/NaN, which no real weight is)."""
    qtype = GGMLQuantizationType[ggml_type.upper()]
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    n_elements = n_bytes // block_bytes * block_elements
    if qtype in (GGMLQuantizationType.I32, GGMLQuantizationType.I64):
        return bytes(n_bytes)          # row indices and positions: 0 is valid everywhere
    if qtype == GGMLQuantizationType.F32:
        return rng.standard_normal(n_elements, dtype=np.float32).tobytes()
    if qtype == GGMLQuantizationType.F16:
        return (rng.standard_normal(n_elements, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
    if qtype == GGMLQuantizationType.BF16:
        floats = (rng.standard_normal(n_elements, dtype=np.float32) * 0.02).view(np.uint32)
        return (floats >> 16).astype(np.uint16).tobytes()
    blocks = rng.integers(0, 256, size=(n_elements // block_elements, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(block_scale).tobytes(), np.uint8)
    if qtype.name == "Q6_K":   # int8 sub-block scales, kept small
        blocks[:, 192:208] = rng.integers(-24, 24, size=(len(blocks), 16)).astype(np.int8).view(np.uint8)
    for pos in SCALE_FIELDS.get(qtype.name, ()):
        blocks[:, pos:pos + 2] = scale
    if qtype.name in _CENTRED_MIN:
        _centre_k_quant(blocks, _CENTRED_MIN[qtype.name])
    return blocks.tobytes()


# K-quants with a sub-block minimum (y = d * sc * q - dmin * m): the quant midpoint (q in 0..15 or 0..31) as
# dmin / d. Random 6-bit scales and minimums would give every weight a positive mean, and a model made of such
# matrices adds the same vector to every token's hidden state, so its router sends every token to the same experts
# (benchmarks/results/*-moe-routing-*.json).
_CENTRED_MIN = {"Q4_K": 7.5, "Q5_K": 15.5}


def _centre_k_quant(blocks: np.ndarray, midpoint: float) -> None:
    """Make each sub-block's minimum equal its scale (m == sc in the 12 packed scale bytes at 4..15) and dmin =
    midpoint * d, so that y = d * sc * (q - midpoint): zero-mean weights, as a real quantized model's are."""
    blocks[:, 8:12] = blocks[:, 4:8]                                  # m[0..3] = sc[0..3], same high bits
    low = blocks[:, 12:16] & 0x0F
    blocks[:, 12:16] = low | (low << 4)                               # m[4..7] = sc[4..7]
    d = np.frombuffer(blocks[:, 0:2].tobytes(), np.float16)
    blocks[:, 2:4] = (d.astype(np.float32) * midpoint).astype(np.float16).view(np.uint8).reshape(-1, 2)


# Byte ranges of the fp16 scale fields in one block, per type.
SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


class Backend:
    """One initialised ggml backend (a device), for timing graphs on it."""

    def __init__(self, device: str, n_threads: int | None = None, dev: int | None = None):
        """`dev`: the ggml_backend_dev_t where `device` is not ggml's own name (machine.device_handle: RPC devices)."""
        g = lib()
        self.device = device
        self.dev = dev or device_handle(device)
        self.handle = g.ggml_backend_dev_init(self.dev, None)
        if not self.handle:
            raise BackendError(f"ggml could not initialise device {device}")
        if n_threads and device == "CPU" and hasattr(g, "ggml_backend_cpu_set_n_threads"):
            g.ggml_backend_cpu_set_n_threads(self.handle, n_threads)

    def close(self) -> None:
        if self.handle:
            lib().ggml_backend_free(self.handle)
            self.handle = None

    def memory(self) -> tuple[int, int]:
        free, total = _sz(0), _sz(0)
        lib().ggml_backend_dev_memory(self.dev, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value


class Graph:
    """A ggml context whose tensors live in one backend buffer, and a graph over them.
    Build: g.tensor(...) or g.array(values, type) / g.op("ggml_mul_mat", a, b) / g.output(t); then g.allocate(fill)
    (or g.allocate() for arrays) and g.compute()."""

    def __init__(self, backend: Backend, max_tensors: int = 4096):
        g = lib()
        self.backend = backend
        size = max_tensors * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(max_tensors, False)
        self.ctx = g.ggml_init(InitParams(size, None, True))
        self.graph = g.ggml_new_graph_custom(self.ctx, max_tensors, False)
        self.inputs: list[tuple[int, str]] = []
        self.data: dict[int, bytes] = {}   # input bytes `allocate` sets (`array`)
        self.buffer = None

    def tensor(self, ggml_type: str, *shape: int) -> int:
        g = lib()
        maker = {1: g.ggml_new_tensor_1d, 2: g.ggml_new_tensor_2d, 3: g.ggml_new_tensor_3d}[len(shape)]
        t = maker(self.ctx, type_id(ggml_type), *shape)
        self.inputs.append((t, ggml_type))
        return t

    def array(self, values: np.ndarray, ggml_type: str) -> int:
        """An input tensor of `values`' shape (ggml's order: reversed) whose bytes (already of `ggml_type`) `allocate`
        sets."""
        t = self.tensor(ggml_type, *reversed(values.shape))
        self.data[t] = np.ascontiguousarray(values).tobytes()
        return t

    def op(self, name: str, *args) -> int:
        return getattr(lib(), name)(self.ctx, *args)

    def output(self, t: int) -> None:
        lib().ggml_build_forward_expand(self.graph, t)

    def allocate(self, fill=None, buffer_type: int | None = None) -> None:
        """Allocate every tensor on the backend (or in `buffer_type`, e.g. a GPU's pinned host memory);
        `fill(tensor, ggml_type, n_bytes)` gives inputs' bytes or None (then those of `array`, if any)."""
        g = lib()
        self.buffer = (g.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx, buffer_type) if buffer_type else
                       g.ggml_backend_alloc_ctx_tensors(self.ctx, self.backend.handle))
        if not self.buffer:
            raise BackendError(f"out of memory on {self.backend.device} allocating a profiling graph")
        for t, ggml_type in self.inputs:
            n_bytes = g.ggml_nbytes(t)
            data = fill(t, ggml_type, n_bytes) if fill else None
            data = self.data.get(t) if data is None else data
            if data is not None:
                g.ggml_backend_tensor_set(t, data, 0, n_bytes)

    def compute(self) -> None:
        status = lib().ggml_backend_graph_compute(self.backend.handle, self.graph)
        if status != 0:
            raise BackendError(f"ggml graph compute failed on {self.backend.device} (status {status})")

    def read(self, t: int) -> np.ndarray:
        """An f32 tensor's values (flattened)."""
        out = np.empty(lib().ggml_nbytes(t) // 4, np.float32)
        lib().ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        return out

    def close(self) -> None:
        g = lib()
        if self.buffer:
            g.ggml_backend_buffer_free(self.buffer)
            self.buffer = None
        if self.ctx:
            g.ggml_free(self.ctx)
            self.ctx = None


@contextmanager
def graph_on(backend: Backend, max_tensors: int = 4096) -> Iterator[Graph]:
    graph = Graph(backend, max_tensors)
    try:
        yield graph
    finally:
        graph.close()


def time_us(fn, min_samples: int = 3, max_samples: int = 9, budget_s: float = 1.0, warmup: int = 1) -> list[float]:
    """Wall time of fn() in microseconds: `warmup` untimed calls, then samples until `max_samples` or `budget_s`
    (at least `min_samples`)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_samples or (len(samples) < max_samples and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples
