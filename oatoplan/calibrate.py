"""Decode calibration (part of the profile stage): the profile times isolated operators, but inside llama.cpp's
decode graph both sides run at another speed (GPU kernels faster than in isolation, CPU mat-vecs slower, and a
CPU<->GPU crossing dearer than measured back to back; likely, not shown: the CPU threads sleep during each GPU phase
and must be woken; the fitted values of a profile are in its JSON, e.g. oatoplan/profiles/h100-qwen2-7b.json). So
`oatoplan profile run --model M` decodes M for real in four placements (baselines.calibration_arms) and fits, by
non-negative least squares on relative error (scipy),

    measured decode time = k_gpu * GPU units + k_cpu * CPU units + n_crossings * crossing_us + fixed

    placement                                what it exercises
    all on the GPU                           k_gpu
    FFN weights of the first half on CPU     k_cpu on large matrices, 2 crossings per layer
    attention matrices of the first half     small matrices, 4 crossings per layer
    layer offload of the first half          k_cpu with CPU attention, one crossing

Without a GPU one placement (all on the CPU) gives k_cpu alone. The bench checks the fit on placements it never saw.

With a GPU the calibration also measures the GPU memory a process uses beyond llama.cpp's buffers (kernel code loaded
on first use, cuBLAS handles, the pool), in fresh processes, for the memory model's overhead term.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import nnls

from .baselines import all_on, calibration_arms
from .cost import DECODE_CLASSES, CostModel, decode_class, fixed_time_us, unit_time_us
from .graph import crossings, model_units
from .inventory import read_inventory
from .load import load
from .measure import gpu_used_bytes, measure_once, run_bench
from .memory import Settings, pool_bytes
from .plan import plan_for
from .schema import CalibrationArm, GpuOverheadSample, ModelInventory, Profile, Workload

log = logging.getLogger(__name__)

# Short prompt, enough decode steps for a stable mean; the KV depth is small, so attention is a minor term.
WORKLOAD = Workload(n_prompt=32, n_gen=64)
# Decode times of one placement spread widely between repetitions on a busy GPU machine (the calibration samples in
# a profile's JSON show it): never fewer than this many.
MIN_REPS = 5
SETTINGS = Settings(n_ubatch=512, op_offload=True, pinned=True, n_ctx=WORKLOAD.n_ctx, n_outputs_max=1)
# ubatches at which the GPU overhead is measured: the pool grows with the ubatch, the rest does not
OVERHEAD_UBATCHES = (512, 2048)


def decode_components(cost: CostModel, inv: ModelInventory, devices: dict[str, str], workload: Workload,
                      s: Settings) -> tuple[dict[str, float], int]:
    """Uncalibrated predicted decode time per token (us) of a placement by class, plus "fixed" (graph launch and
    input lookup), and its number of crossings. `cost` must be uncalibrated."""
    units = model_units(inv)
    parts = dict.fromkeys(DECODE_CLASSES, 0.0)
    for unit in units:
        parts[decode_class(unit, devices[unit.key])] += unit_time_us(cost, inv, unit, devices[unit.key], workload, s)[1]
    parts["fixed"] = fixed_time_us(cost, inv, workload, s, cost.gpu is not None)[1]
    return parts, crossings(devices[u.key] for u in units)


def fit(arms: list[CalibrationArm], gpu: bool) -> tuple[dict[str, float], float]:
    """(factors per class, decode crossing us) that best explain the measured decode times: non-negative least
    squares on relative error. Without a GPU: the CPU factor alone."""
    if not gpu:
        a = arms[0]
        factor = (statistics.median(a.decode_us_per_token) - a.components_us["fixed"]) / a.components_us["cpu"]
        return {"cpu": round(max(factor, 0.0), 4)}, 0.0
    matrix = np.array([[a.components_us["gpu"], a.components_us["cpu"], a.n_crossings] for a in arms])
    measured = np.array([statistics.median(a.decode_us_per_token) for a in arms])
    target = measured - np.array([a.components_us["fixed"] for a in arms])
    (k_gpu, k_cpu, crossing), _ = nnls(matrix / measured[:, None], target / measured)
    return {"gpu": round(float(k_gpu), 4), "cpu": round(float(k_cpu), 4)}, round(float(crossing), 2)


def calibrate(model: str | Path, profile: Profile, reps: int = 3,
              progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """`profile` with decode factors fitted to real decodes of `model` (loaded once per placement)."""
    inv = read_inventory(model)
    bare = dataclasses.replace(profile, decode_factors={}, decode_crossing_us=0.0, calibration=())
    cost = CostModel(bare)
    arms, components = [], {}
    for arm in calibration_arms(inv, cost.gpu, SETTINGS):
        plan = plan_for(inv, arm.placement, arm.settings, bare, cost.gpu)
        arms.append(dataclasses.replace(arm, plan=dataclasses.replace(plan, workload=WORKLOAD)))
        components[arm.name] = decode_components(cost, inv, arm.placement, WORKLOAD, arm.settings)
    result = run_bench(model, arms, WORKLOAD, max(reps, MIN_REPS), progress)
    measured = [CalibrationArm(arm.name, arm.flags, tuple(round(1e6 / t, 1) for t in arm.decode_tokens_per_s),
                               *components[arm.name]) for arm in result.arms]
    factors, crossing_us = fit(measured, cost.gpu is not None)
    log.info("decode factors %s, decode crossing %.1f us", factors, crossing_us)
    identity = f"{inv.identity.file_name} tensor table sha256:{inv.identity.tensor_table_sha256[:16]}"
    overhead, overhead_samples = measure_gpu_overhead(model, bare) if cost.gpu else (0, ())
    return dataclasses.replace(profile, decode_factors=factors, decode_crossing_us=crossing_us,
                               calibration=tuple(measured), calibration_model=identity,
                               gpu_overhead_bytes=overhead, gpu_overhead=overhead_samples)


def _overhead_in_fresh_process(model: str, profile: Profile, n_ubatch: int) -> tuple[int, int]:
    """(device memory in use after a load and a run less before the load, llama.cpp's GPU buffers), in this process:
    the model's weights all on the CPU (mmap), op offload at `n_ubatch`, one ubatch of prefill and 4 decode steps.
    Run through multiprocessing's spawn, so that nothing was loaded on the GPU before (kernel code, cuBLAS)."""
    inv = read_inventory(model)
    gpu = profile.gpu_device
    s = Settings(n_ubatch, op_offload=True, pinned=False, n_ctx=n_ubatch + 256, n_outputs_max=1)
    plan = plan_for(inv, all_on(inv, "CPU"), s, profile, gpu)
    before = gpu_used_bytes(gpu)
    llm = load(model, plan, verify=False)
    try:
        measure_once(llm, plan, Workload(n_prompt=n_ubatch, n_gen=4), np.random.default_rng(0))
        used = gpu_used_bytes(gpu) - before
        return used, sum(a.n_bytes for a in llm.oatoplan_memory.allocations if a.device == gpu)
    finally:
        llm.close()


def measure_gpu_overhead(model: str | Path, profile: Profile) -> tuple[int, tuple[GpuOverheadSample, ...]]:
    """The GPU memory a process uses beyond llama.cpp's buffers and memory.pool_bytes (the largest over
    OVERHEAD_UBATCHES, each in a fresh process), and the samples it comes from."""
    inv = read_inventory(model)
    samples = []
    spawn = multiprocessing.get_context("spawn")
    for n_ubatch in OVERHEAD_UBATCHES:
        with spawn.Pool(1) as child:
            used, buffers = child.apply(_overhead_in_fresh_process, (str(model), profile, n_ubatch))
        pool = pool_bytes(inv, Settings(n_ubatch, True, False, n_ubatch + 256))
        samples.append(GpuOverheadSample(n_ubatch, used - buffers, pool))
        log.info("GPU overhead at ubatch %d: %.1f MiB beyond buffers, pool %.1f MiB", n_ubatch,
                 (used - buffers) / 2**20, pool / 2**20)
    return max(0, max(x.beyond_buffers_bytes - x.pool_bytes for x in samples)), tuple(samples)
