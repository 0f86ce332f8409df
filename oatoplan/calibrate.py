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

With a GPU build that has weight streaming (patches/0005) it measures the fixed cost of one streamed upload
(cost.CostModel.stream_split_us): one ubatch of prefill with the model on the GPU but for the norms of the first 0,
half and all but the last block in pinned host memory. Each norm weight is a streamed upload of a few KiB and a
scheduler split of its own, so the time per upload is that fixed cost alone; the build counts the uploads
(oato_sched_stream_stats), and a least-squares line through (uploads per ubatch, median prefill) gives it.
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

from .baselines import Arm, all_on, calibration_arms
from .cost import DECODE_CLASSES, CostModel, decode_class, fixed_time_us, ubatches, unit_time_us
from .errors import OatoError
from .graph import CPU, NORM, crossings, model_units, role, role_info
from .inventory import read_inventory
from .load import load
from .measure import gpu_used_bytes, measure_once, run_bench
from .memory import Settings, pool_bytes, stream_slot_bytes
from .plan import llama_cpp_flags, plan_for
from .schema import (CalibrationArm, GpuOverheadSample, ModelInventory, Plan, Profile, StreamSplitCalibration,
                     StreamSplitSample, Workload)
from .solve import STREAM_SLOTS, streaming_available

log = logging.getLogger(__name__)

# Short prompt, enough decode steps for a stable mean; the KV depth is small, so attention is a minor term.
WORKLOAD = Workload(n_prompt=32, n_gen=64)
# Decode times of one placement spread widely between repetitions on a busy GPU machine (the calibration samples in
# a profile's JSON show it): never fewer than this many.
MIN_REPS = 5
SETTINGS = Settings(n_ubatch=512, op_offload=True, pinned=True, n_ctx=WORKLOAD.n_ctx, n_outputs_max=1)
# ubatches at which the GPU overhead is measured: the pool grows with the ubatch, the rest does not
OVERHEAD_UBATCHES = (512, 2048)
# The streamed-upload cost: one ubatch of prefill per repetition (a few decode steps, unused), interleaved
# repetitions of the placements, and the shares of blocks whose norms are in host memory
STREAM_SPLIT_WORKLOAD = Workload(n_prompt=512, n_gen=4)
STREAM_SPLIT_SETTINGS = Settings(n_ubatch=512, op_offload=True, pinned=True, n_ctx=STREAM_SPLIT_WORKLOAD.n_ctx,
                                 n_outputs_max=1, stream_slots=STREAM_SLOTS)
STREAM_SPLIT_SHARES = (0.0, 0.5, 1.0)
STREAM_SPLIT_MIN_REPS = 10


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
    stream_split = measure_stream_split(model, bare, reps, progress) if cost.gpu else None
    return dataclasses.replace(profile, decode_factors=factors, decode_crossing_us=crossing_us,
                               calibration=tuple(measured), calibration_model=identity,
                               gpu_overhead_bytes=overhead, gpu_overhead=overhead_samples, stream_split=stream_split)


def stream_split_arms(inv: ModelInventory, gpu: str) -> list[Arm]:
    """The placements of the streamed-upload measurement: all on the GPU but the norms of the first k blocks, k at
    each of STREAM_SPLIT_SHARES of all blocks but the last (whose FFN half runs on the output rows only, too few
    tokens for op offload)."""
    arms = []
    for share in STREAM_SPLIT_SHARES:
        k = round(share * (inv.hparams.n_layer - 1))
        placement = {u.key: CPU if u.layer is not None and u.layer < k and role_info(role(u))[1] == NORM else gpu
                     for u in model_units(inv)}
        arms.append(Arm(f"norms of blocks 0-{k - 1} in host memory" if k else "all on GPU", placement,
                        STREAM_SPLIT_SETTINGS))
    return arms


def fit_stream_split(samples: list[StreamSplitSample] | tuple[StreamSplitSample, ...]) -> float:
    """The fixed cost of one streamed upload (us): the slope of the least-squares line through (uploads per ubatch,
    median prefill per ubatch) of the samples, at least 0. Raises ValueError with fewer than two upload counts."""
    if len({x.n_uploads for x in samples}) < 2:
        raise ValueError("the streamed-upload fit needs samples at two or more upload counts")
    uploads = np.array([x.n_uploads for x in samples])
    prefill = np.array([statistics.median(x.prefill_us) for x in samples])
    slope, _ = np.polyfit(uploads, prefill, 1)
    return round(max(float(slope), 0.0), 2)


def _stream_split_plan(inv: ModelInventory, arm: Arm, profile: Profile) -> Plan:
    """The arm's loader Plan with staging slots that hold its host norms: the memory model sizes slots by the host
    matrices op offload copies, and these placements have none."""
    plan = plan_for(inv, arm.placement, arm.settings, profile, profile.gpu_device)
    host = [stream_slot_bytes(inv, u) for u in model_units(inv) if arm.placement[u.key] == CPU]
    if host and not plan.stream_slots:
        slots, slot_bytes = arm.settings.stream_slots, max(host)
        memory = dataclasses.replace(plan.memory, stream_bytes={profile.gpu_device: slots * slot_bytes})
        plan = dataclasses.replace(plan, stream_slots=slots, stream_slot_bytes=slot_bytes, memory=memory)
        plan = dataclasses.replace(plan, flags=llama_cpp_flags(plan))
    return dataclasses.replace(plan, workload=STREAM_SPLIT_WORKLOAD)


def measure_stream_split(model: str | Path, profile: Profile, reps: int = 3,
                         progress: Callable[[str, int, int], None] | None = None) -> StreamSplitCalibration | None:
    """The fixed cost of one streamed upload on this machine and build, and its samples (stream_split_arms, one
    ubatch of prefill each). None, logged, where it cannot be measured: no GPU in the profile, a build without
    weight streaming, or a run that streamed nothing (OATO_STREAM=0) or failed."""
    if not profile.gpu_device or not streaming_available(profile):
        log.info("streamed-upload cost not measured: the build has no weight streaming on a GPU")
        return None
    inv = read_inventory(model)
    arms = [dataclasses.replace(arm, plan=_stream_split_plan(inv, arm, profile))
            for arm in stream_split_arms(inv, profile.gpu_device)]
    try:
        result = run_bench(model, arms, STREAM_SPLIT_WORKLOAD, max(reps, STREAM_SPLIT_MIN_REPS), progress)
    except OatoError as exc:
        log.warning("streamed-upload cost not measured: %s", exc)
        return None
    n_ubatches = result.reps * len(ubatches(STREAM_SPLIT_WORKLOAD.n_prompt, STREAM_SPLIT_SETTINGS.n_ubatch))
    samples = tuple(StreamSplitSample(arm.name, round(arm.stream_stats[0] / n_ubatches, 2) if arm.stream_stats else 0.0,
                                      STREAM_SPLIT_SETTINGS.n_ubatch,
                                      tuple(round(1e6 * STREAM_SPLIT_WORKLOAD.n_prompt / t, 1)
                                            for t in arm.prefill_tokens_per_s))
                    for arm in result.arms)
    if len({x.n_uploads for x in samples}) < 2:
        log.warning("streamed-upload cost not measured: the host norms did not stream (OATO_STREAM=0?)")
        return None
    split_us = fit_stream_split(samples)
    log.info("streamed upload: %.1f us each (%s)", split_us,
             ", ".join(f"{x.n_uploads:g} uploads {statistics.median(x.prefill_us):.0f} us" for x in samples))
    return StreamSplitCalibration(split_us, samples)


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
