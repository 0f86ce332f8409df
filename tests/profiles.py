"""A synthetic Profile for tests: roofline times (bandwidth and flops per device) at the profiler's grid, so that the
planner can be tested without a GPU. Shipped profiles in oatoplan/profiles/ are measured; this one is only for tests."""

from __future__ import annotations

from oatoplan import profile as profiler
from oatoplan.artifacts import read_json
from oatoplan.ggml import row_bytes
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.schema import SCHEMA_VERSION, MachineIdentity, OpTiming, Profile, TransferTiming

# device: (memory bytes/s, flop/s, per-op overhead us)
ROOFLINE = {"CPU": (60e9, 1.0e12, 2.0), "CUDA0": (2.5e12, 300e12, 4.0)}


def _t(device: str, n_bytes: float, flops: float) -> float:
    bandwidth, flop_rate, overhead = ROOFLINE[device]
    return overhead + max(n_bytes / bandwidth, flops / flop_rate) * 1e6


def synthetic_profile(gpu: bool = True, pcie_bytes_per_s: float = 50e9, crossing_us: float = 30.0,
                      streaming: bool = False) -> Profile:
    """`streaming`: the profiled build has weight streaming (patches/0005), so plans may use it."""
    devices = ["CPU", "CUDA0"] if gpu else ["CPU"]
    ops = []
    shapes = profiler.model_shapes(None)
    for device in devices:
        for ggml_type, k, n in shapes.matrices + (("Q6_K", 3584, 152064), ("Q8_0", 640, 262144)):
            weight = row_bytes(ggml_type, k) * n
            for tokens in profiler.DECODE_TOKENS + profiler.PREFILL_TOKENS_GPU:
                ops.append(OpTiming(device, "MUL_MAT", ggml_type, (k, n), tokens,
                                    _t(device, weight + 4 * tokens * (k + n), 2 * k * n * tokens), ()))
        for tokens in (1, 512, 2048):
            for kv in profiler.KV_LENGTHS:
                kv_bytes = 2 * 2 * kv * 8 * 128
                ops.append(OpTiming(device, "FLASH_ATTN_EXT", "F16", (128, 32, 8, kv), tokens,
                                    _t(device, kv_bytes, 4 * tokens * kv * 32 * 128), ()))
        for op in ("RMS_NORM", "MUL", "ADD", "GLU", "ROPE", "SET_ROWS", "GET_ROWS"):
            for tokens in profiler.ELEMENTWISE_TOKENS:
                ops.append(OpTiming(device, op, "F32", (4096,), tokens, _t(device, 12 * 4096 * tokens, 0), ()))
    transfers = []
    if gpu:
        for memory, rate in (("pinned", pcie_bytes_per_s), ("pageable", pcie_bytes_per_s / 3.5)):
            for direction in ("h2d", "d2h"):
                for n_bytes in (16 << 10, 256 << 20):
                    transfers.append(TransferTiming(direction, memory, n_bytes, 10 + n_bytes / rate * 1e6, ()))
    build = "llama-cpp-python 0.3.36, oatoplan patches 0:0005-ggml-oato-weight-streaming" if streaming else ""
    machine = MachineIdentity("test CPU", 16, 128 << 30, "test GPU" if gpu else "", 80 << 30 if gpu else 0, "", "",
                              build)
    return Profile(SCHEMA_VERSION, "synthetic-test", "2026-11-22T00:00:00+00:00", machine, 16,
                   "CUDA0" if gpu else "", tuple(ops), tuple(transfers),
                   {d: 8.0 for d in devices}, crossing_us if gpu else 0.0, 60e9, 0)


def shipped_cpu_profile() -> Profile:
    """The CPU profile oatoplan ships (measured on a 2-core machine): what `plan` finds on a machine without a GPU."""
    return read_json(Profile, SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json")
