"""Profile more accelerators than the profile's GPU: other local GPUs and llama.cpp RPC devices (an rpc-server's
device 0 on this or another host), for plans over several devices (split.py).

Each device is timed the way profile.py times its GPU, through the same ggml backends llama.cpp will use: MUL_MAT at
the model's shapes, attention, the element-wise ops and a graph launch. For an RPC device each timed graph ends in a
round trip (the client does not wait for the server otherwise), shared by the graph's copies of the op, so its op
times carry a share of the link's latency beside the crossing's own (the loopback check in docs/results.md measured
what the model then predicts). Its link: one
crossing as a decode graph pays it (profile._time_crossing: a split there and one on the CPU, activations both ways),
and host<->device copies of a small and a large buffer for the rate activations cross at.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import Callable, Sequence

import numpy as np

from . import ggml
from .errors import BackendError, ProfileError
from .machine import device_handle
from .names import is_rpc
from .profile import (ATTN_TOKENS_CPU, ATTN_TOKENS_GPU, COPY_BYTES, CPU_MAX_ATTN_WORK, DECODE_TOKENS, KV_LENGTHS,
                      PREFILL_TOKENS_CPU, PREFILL_TOKENS_GPU, _fill, _time_attention, _time_crossing,
                      _time_elementwise, _time_launch, _time_matmuls, _Timer, model_shapes)
from .schema import DeviceLink, ModelInventory, OpTiming, Profile

log = logging.getLogger(__name__)

LINK_SMALL_BYTES = 16 << 10          # one token's activations of a large model, rounded up
LINK_BIG_BYTES = 16 << 20            # a 2048-token ubatch of a 2048-wide model's activations


class _RoundTripTimer(_Timer):
    """For an RPC device: ggml's RPC client returns from a graph compute once the graph is sent, and the server runs
    commands in order, so each sample ends with a 4-byte read of one of the graph's tensors (a round trip)."""

    def time(self, graph: ggml.Graph, copies: int) -> tuple[float, tuple[float, ...]]:
        g, probe, out = ggml.lib(), graph.inputs[0][0], np.empty(1, np.float32)

        def run() -> None:
            graph.compute()
            g.ggml_backend_tensor_get(probe, out.ctypes.data, 0, 4)
        samples = [t / copies for t in ggml.time_us(run, budget_s=self.budget_s)]
        return statistics.median(samples), tuple(round(t, 3) for t in samples)


def _time_launch_round_trip(backend: ggml.Backend, timer: _Timer, fill) -> float:
    """A graph of one tiny op, sent, run and answered (what one split on an RPC device costs beyond its ops)."""
    with ggml.graph_on(backend) as g:
        g.output(g.op("ggml_add", g.tensor("F32", 16), g.tensor("F32", 16)))
        g.allocate(fill)
        return timer.time(g, 1)[0]


def _time_link(backend: ggml.Backend, timer: _Timer) -> tuple[float, float]:
    """(host -> device, device -> host) bytes per second: the slope between a small and a large synchronous copy
    from pageable memory (what llama.cpp's scheduler copies activations from)."""
    g = ggml.lib()
    staging = np.ones(LINK_BIG_BYTES, np.uint8)
    rates = []
    with ggml.graph_on(backend) as device_side:
        tensor = device_side.tensor("I8", LINK_BIG_BYTES)
        device_side.allocate(lambda *a: None)
        for fn in (g.ggml_backend_tensor_set, g.ggml_backend_tensor_get):
            t = {n: statistics.median(ggml.time_us(lambda: fn(tensor, staging.ctypes.data, 0, n),
                                                   budget_s=timer.budget_s))
                 for n in (LINK_SMALL_BYTES, LINK_BIG_BYTES)}
            slope_us = max(t[LINK_BIG_BYTES] - t[LINK_SMALL_BYTES], 1e-3)
            rates.append((LINK_BIG_BYTES - LINK_SMALL_BYTES) / (slope_us * 1e-6))
    return rates[0], rates[1]


def _time_device(backend: ggml.Backend, cpu: ggml.Backend, inventory: ModelInventory | None, timer: _Timer,
                 fill, progress, cpu_ops: list[OpTiming], copy_bytes: int) -> tuple[list[OpTiming], DeviceLink]:
    shapes = model_shapes(inventory)
    rpc = is_rpc(backend.device)
    timer = _RoundTripTimer(timer.budget_s) if rpc else timer
    # a remote device may be a CPU: time it on the CPU's token grid (larger batches are extrapolated)
    tokens = DECODE_TOKENS + (PREFILL_TOKENS_CPU if rpc else PREFILL_TOKENS_GPU)
    attn_tokens = ATTN_TOKENS_CPU if rpc else ATTN_TOKENS_GPU
    steps = [("matmul", m) for m in shapes.matrices] + \
        [("attention", (n, kv)) for n in attn_tokens for kv in KV_LENGTHS
         if not rpc or n * kv <= CPU_MAX_ATTN_WORK or n == 1] + [("elementwise", None), ("link", None)]
    ops: list[OpTiming] = []
    for i, (kind, what) in enumerate(steps):
        if progress:
            progress(f"{kind} on {backend.device}", i, len(steps))
        if kind == "matmul":
            ops += _time_matmuls(backend, *what, tokens, timer, fill, copy_bytes=copy_bytes)
        elif kind == "attention":
            ops.append(_time_attention(backend, shapes, what[0], what[1], timer, fill))
        elif kind == "elementwise":
            ops += _time_elementwise(backend, shapes, timer, fill)
            launch_us = (_time_launch_round_trip if rpc else _time_launch)(backend, timer, fill)
        else:
            crossing = _time_crossing(backend, cpu, shapes, timer, fill)
            h2d, d2h = _time_link(backend, timer)
    free, total = backend.memory()
    description = ggml.lib().ggml_backend_dev_description(backend.dev).decode()
    log.info("%s (%s): launch %.1f us, crossing %.1f us, %.2f / %.2f GB/s to / from it, %.1f GiB free",
             backend.device, description, launch_us, crossing, h2d / 1e9, d2h / 1e9, free / 2**30)
    # a crossing into this device also launches a graph there: the split's launch belongs to the crossing
    link = DeviceLink(backend.device, description, total, round(crossing + launch_us, 3),
                      round(crossing + launch_us, 3), round(h2d), round(d2h), _decode_class(ops, cpu_ops))
    return ops, link


def _decode_class(ops: list[OpTiming], cpu_ops: list[OpTiming]) -> str:
    """"cpu" when the device streams weights in one-token mat-vecs at less than twice the local CPU's rate (a CPU
    behind RPC), else "gpu"."""
    def rate(timings) -> float:       # of the largest weight (smaller ones may sit in a cache)
        one = [(ggml.row_bytes(o.ggml_type, o.shape[0]) * o.shape[1], o.t_us) for o in timings
               if o.op == "MUL_MAT" and o.n_tokens == 1]
        n_bytes, t_us = max(one, default=(0, 1.0))
        return n_bytes / t_us
    mine, cpu = rate(ops), rate(cpu_ops)
    return "cpu" if mine and cpu and mine < 2 * cpu else "gpu"


def check_devices(devices: Sequence[str], gpu_device: str | None, known: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is measured, a device the profile already has or that is given twice."""
    for name in devices:
        if name in {gpu_device, "CPU", *known} or list(devices).count(name) > 1:
            raise ProfileError(f"--device {name}: the profile already has it (or it is given twice); leave it out")


def measure_devices(profile: Profile, inventory: ModelInventory | None, devices: Sequence[str],
                    budget_s: float = 0.25, progress: Callable[[str, int, int], None] | None = None,
                    copy_bytes: int = COPY_BYTES) -> Profile:
    """`profile` with `devices` (e.g. "CUDA1", "RPC[192.168.1.20:50052]": RPC devices registered first, see
    rpc.register_rpc_servers) timed and added: their ops under their names, their links in `devices`.
    `copy_bytes`: weight bytes per timed graph of small matrices (profile.COPY_BYTES defeats caches; tests use less)."""
    check_devices(devices, profile.gpu_device, tuple(d.device for d in profile.devices))
    timer, fill = _Timer(budget_s), _fill(np.random.default_rng(1))
    cpu = ggml.Backend("CPU", profile.n_threads)
    ops: list[OpTiming] = []
    links: list[DeviceLink] = []
    try:
        for name in devices:
            backend = ggml.Backend(name, dev=device_handle(name))
            try:
                more, link = _time_device(backend, cpu, inventory, timer, fill, progress,
                                          [o for o in profile.ops if o.device == "CPU"], copy_bytes)
            finally:
                backend.close()
            ops += more
            links.append(link)
    except BackendError as exc:
        raise ProfileError(f"profiling {', '.join(devices)} stopped: {exc}; nothing written") from None
    finally:
        cpu.close()
    notes = profile.notes + tuple(f"{link.device} ({link.description}): profiled through llama.cpp's "
                                  f"{'RPC backend' if is_rpc(link.device) else 'backend'}; its decode is not "
                                  f"calibrated" for link in links)
    return dataclasses.replace(profile, ops=profile.ops + tuple(ops), devices=profile.devices + tuple(links),
                               notes=notes)
