"""Decode calibration (part of the profile stage): the profile times isolated operators, but inside llama.cpp's
decode graph both sides run at another speed (GPU kernels faster than in isolation, CPU mat-vecs slower, and a
CPU<->GPU crossing dearer than measured back to back; likely, not shown: the CPU threads sleep during each GPU phase
and must be woken; the fitted values of a profile are in its JSON, e.g. profiles/h100-qwen2-7b.json). So
`oatoplan profile run --model M` decodes M for real in four placements (baselines.calibration_arms) and fits, by
non-negative least squares on relative error (scipy),

    measured decode time = k_gpu * GPU units + k_cpu * CPU units + n_crossings * crossing_us + fixed

    placement                                what it exercises
    all on the GPU                           k_gpu
    FFN weights of the first half on CPU     k_cpu on large matrices, 2 crossings per layer
    attention matrices of the first half     small matrices, 4 crossings per layer
    layer offload of the first half          k_cpu with CPU attention, one crossing

Without a GPU one placement (all on the CPU) gives k_cpu alone. The bench checks the fit on placements it never saw.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import nnls

from .baselines import calibration_arms
from .cost import DECODE_CLASSES, CostModel, decode_class, fixed_time_us, unit_time_us
from .graph import crossings, model_units
from .inventory import read_inventory
from .measure import run_bench
from .memory import Settings
from .plan import plan_for
from .schema import CalibrationArm, ModelInventory, Profile, Workload

log = logging.getLogger(__name__)

# Short prompt, enough decode steps for a stable mean; the KV depth is small, so attention is a minor term.
WORKLOAD = Workload(n_prompt=32, n_gen=64)
# Decode times of one placement spread widely between repetitions on a busy GPU machine (the calibration samples in
# a profile's JSON show it): never fewer than this many.
MIN_REPS = 5
SETTINGS = Settings(n_ubatch=512, op_offload=True, pinned=True, n_ctx=WORKLOAD.n_ctx, n_outputs_max=1)


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
    return dataclasses.replace(profile, decode_factors=factors, decode_crossing_us=crossing_us,
                               calibration=tuple(measured), calibration_model=identity)
