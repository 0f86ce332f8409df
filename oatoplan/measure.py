"""The one timing harness: `measure_once` (one repetition of a workload on a loaded model) and `run_bench` (every arm,
several repetitions) -> BenchResult. The bench, calibration and benchmarks/ scripts all measure through it.

Like llama-bench: prefill is one timed pass over n_prompt random tokens (in n_batch chunks), decode is n_gen timed
single-token steps after it; logits only for the last token; the KV cache is cleared between repetitions. Every arm
is loaded once; when they fit together in VRAM the repetitions are interleaved (A B A B ...), so that a drift in the
machine (clocks, page cache) hits every arm alike. With oatoplan's weight streaming in the build, each arm records what
its timed repetitions streamed (the counters are process-wide: read around each repetition, so interleaving is fine).
"""

from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import ggml
from .baselines import Arm
from .inventory import read_inventory
from .load import load
from .machine import devices, machine_identity
from .plan import llama_cpp_flags
from .schema import SCHEMA_VERSION, BenchArm, BenchResult, Plan, Prediction, Workload

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

# When all arms' VRAM is below this share of the GPU's free memory they are loaded together and interleaved.
TOGETHER_SHARE = 0.9


@dataclass
class _Loaded:
    arm: BenchArm
    llm: object
    vram_bytes: int
    ring_bytes: int                # VRAM of the staging rings this arm's context allocated (stream_stats()[3])


def decode(llm, tokens: list[int]) -> None:
    """One llama_decode of `tokens` (at the end of the cache), waited for."""
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    rc = llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(array, len(tokens)))
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    llama_cpp.llama_synchronize(llm._ctx.ctx)


def measure_once(llm, plan: Plan, workload: Workload, rng: np.random.Generator) -> tuple[float, float]:
    """(prefill seconds for n_prompt tokens, decode seconds for n_gen tokens) of one repetition."""
    n_vocab = llm.n_vocab()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    for start in range(0, workload.n_depth, plan.n_batch):          # context already in the cache, untimed
        decode(llm, rng.integers(0, n_vocab, min(plan.n_batch, workload.n_depth - start)).tolist())
    prompt = rng.integers(0, n_vocab, workload.n_prompt).tolist()
    t0 = time.perf_counter()
    for start in range(0, len(prompt), plan.n_batch):
        decode(llm, prompt[start:start + plan.n_batch])
    prefill_s = time.perf_counter() - t0
    token = int(rng.integers(0, n_vocab))
    t0 = time.perf_counter()
    for _ in range(workload.n_gen):
        decode(llm, [token])
    return prefill_s, time.perf_counter() - t0


def stats(values: tuple[float, ...]) -> tuple[float, float]:
    """(mean, sample standard deviation) of repetitions; (0, 0) for none."""
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_bench(model: str | Path, arms: list[Arm], workload: Workload, reps: int = 3,
              progress: Callable[[str, int, int], None] | None = None) -> BenchResult:
    """Measure every arm's plan `reps` times (after one warm-up), interleaved when all arms fit in VRAM together."""
    inv = read_inventory(model)
    gpu = next((a.plan.gpu_devices[0] for a in arms if a.plan.gpu_devices), None)
    free = next((d.free_bytes for d in devices() if d.name == gpu), 0) if gpu else 0
    together = sum((a.plan.budget_bytes or _predicted_vram(a.prediction)) for a in arms) < TOGETHER_SHARE * free
    rng = np.random.default_rng(0)
    samples: dict[str, list[tuple[float, float]]] = {a.name: [] for a in arms}
    streamed: dict[str, list[int]] = {a.name: [0, 0, 0] for a in arms}     # counts [0:3] of stream_stats
    loaded: dict[str, _Loaded] = {}
    done, total = 0, len(arms) * (reps + 1)

    def open_arm(arm: Arm) -> _Loaded:
        before, rings_before = (gpu_used_bytes(gpu) if gpu else 0), _stream_stats()[3]
        llm = load(model, arm.plan)
        measure_once(llm, arm.plan, replace(workload, n_gen=min(workload.n_gen, 8)), rng)     # warm-up
        vram = (gpu_used_bytes(gpu) - before) if gpu else 0
        allocated: dict[str, int] = {}
        for a in llm.oatoplan_memory.allocations:
            allocated[a.device] = allocated.get(a.device, 0) + a.n_bytes
        # the flags a user would type for a named baseline (--n-cpu-moe N), else the loader plan's own
        measured = BenchArm(arm.name, arm.flags or arm.plan.flags or llama_cpp_flags(arm.plan), arm.plan,
                            arm.prediction, vram, (), (), allocated, arm.reference)
        return _Loaded(measured, llm, vram, _stream_stats()[3] - rings_before)

    def step(name: str) -> None:
        nonlocal done
        item = loaded[name]
        counts_before = _stream_stats()
        samples[name].append(measure_once(item.llm, item.arm.plan, workload, rng))
        streamed[name] = [count + after - was for count, after, was
                          in zip(streamed[name], _stream_stats(), counts_before)]
        done += 1
        if progress:
            progress(name, done, total)

    if together:
        for arm in arms:
            loaded[arm.name] = open_arm(arm)
            done += 1
        for _ in range(reps):
            for arm in arms:
                step(arm.name)
    else:
        for arm in arms:
            loaded[arm.name] = open_arm(arm)
            done += 1
            for _ in range(reps):
                step(arm.name)
            loaded[arm.name].llm.close()
    results = []
    for arm in arms:
        item = loaded[arm.name]
        prefill = tuple(round(workload.n_prompt / p, 3) for p, _ in samples[arm.name])
        decode_rates = tuple(round(workload.n_gen / d, 3) for _, d in samples[arm.name]) if workload.n_gen else ()
        stream = (*streamed[arm.name], item.ring_bytes) if ggml.stream_stats() is not None else ()
        results.append(replace(item.arm, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode_rates,
                               stream_stats=stream))
        if together:
            item.llm.close()
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return BenchResult(SCHEMA_VERSION, created, machine_identity(gpu), inv.identity, workload,
                       arms[0].plan.budget_bytes, reps, "interleaved" if together else "sequential", tuple(results))


def _stream_stats() -> tuple[int, ...]:
    """ggml.stream_stats(), zeros on a build without weight streaming."""
    return ggml.stream_stats() or (0, 0, 0, 0)


def gpu_used_bytes(device: str) -> int:
    d = next(d for d in devices() if d.name == device)
    return d.total_bytes - d.free_bytes


def _predicted_vram(prediction: Prediction | None) -> int:
    return sum(prediction.gpu_bytes.values()) if prediction else 0
