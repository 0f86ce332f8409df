"""Decode calibration (part of the profile stage): the profile times isolated operators, but inside llama.cpp's
decode graph the CPU side runs at another speed (thread-pool wake-ups after every GPU phase, a barrier after every
node, caches; on the H100 machine 12-22% slower for placements with many host matrices, on the 2-core machine
faster). `oatoplan profile --model M` therefore decodes M for real in a few placements and fits one factor per
class of decode work (cost.DECODE_CLASSES) so that predicted and measured decode agree on those placements; the
bench checks the fit on placements it never saw.

    placement                                classes it exercises
    all on the GPU                           gpu
    FFN of the first half of layers on CPU   gpu, cpu_ffn
    attention weights of the first half      gpu, cpu_attn_weights
    layer offload of the first half          gpu, cpu_ffn, cpu_attn_weights, cpu_attention

Four placements, four unknowns: a non-negative least-squares fit (scipy). Without a GPU one placement (all on the
CPU) gives one factor shared by the CPU classes.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import nnls

from .cost import CPU, DECODE_CLASSES, CostModel, Settings, decode_class, fixed_time_us, model_units, unit_time_us
from .inventory import read_inventory
from .schema import CalibrationArm, ModelInventory, Profile, Workload

log = logging.getLogger(__name__)

# Short prompt, enough decode steps for a stable mean; the KV depth is small, so attention is a minor term.
WORKLOAD = Workload(n_prompt=32, n_gen=64)
SETTINGS = Settings(n_ubatch=512, op_offload=True, pinned=True, n_ctx=WORKLOAD.n_ctx, n_outputs_max=1)


def decode_components(cost: CostModel, inv: ModelInventory, devices: dict[str, str], workload: Workload,
                      s: Settings) -> dict[str, float]:
    """Uncalibrated predicted decode time per token (us) of a placement, split by class, plus "fixed" (launch,
    input lookup, crossings), which calibration does not scale. `cost` must be uncalibrated."""
    units = model_units(inv)
    parts = dict.fromkeys(DECODE_CLASSES, 0.0)
    for unit in units:
        parts[decode_class(unit, devices[unit.key])] += unit_time_us(cost, inv, unit, devices[unit.key], workload, s)[1]
    chain = [CPU] + [devices[u.key] for u in units]
    crossings = sum(1 for a, b in zip(chain, chain[1:]) if a != b)
    parts["fixed"] = fixed_time_us(cost, inv, workload, s, cost.gpu is not None)[1] + crossings * cost.crossing_us
    return parts


def placements(inv: ModelInventory, gpu: str | None) -> list[tuple[str, dict[str, str]]]:
    units = model_units(inv)
    if gpu is None:
        return [("all on CPU", {u.key: CPU for u in units})]
    half = inv.hparams.n_layer // 2

    def cpu_where(test) -> dict[str, str]:
        return {u.key: CPU if u.layer is not None and u.layer < half and test(u) else gpu for u in units}
    return [
        ("all on GPU", {u.key: gpu for u in units}),
        (f"FFN of layers 0-{half - 1} on CPU", cpu_where(lambda u: decode_class(u, CPU) == "cpu_ffn")),
        (f"attention weights of layers 0-{half - 1} on CPU",
         cpu_where(lambda u: decode_class(u, CPU) == "cpu_attn_weights")),
        (f"layers 0-{half - 1} on CPU (layer offload)", cpu_where(lambda u: True)),
    ]


def fit(arms: list[CalibrationArm], gpu: bool) -> dict[str, float]:
    """Factors per class that best explain the measured decode times (non-negative least squares on relative
    error); classes no arm exercises keep 1."""
    used = [c for c in DECODE_CLASSES if any(a.components_us[c] > 0 for a in arms)]
    if not gpu:   # one equation: one factor for every CPU class
        a = arms[0]
        cpu_us = sum(a.components_us[c] for c in used)
        factor = (statistics.median(a.decode_us_per_token) - a.components_us["fixed"]) / cpu_us
        return {c: round(max(factor, 0.0), 4) for c in used}
    matrix = np.array([[a.components_us[c] for c in used] for a in arms])
    target = np.array([statistics.median(a.decode_us_per_token) - a.components_us["fixed"] for a in arms])
    scale = 1.0 / np.array([statistics.median(a.decode_us_per_token) for a in arms])   # relative error
    factors, _ = nnls(matrix * scale[:, None], target * scale)
    return {c: round(float(f), 4) for c, f in zip(used, factors)}


def calibrate(model: str | Path, profile: Profile, reps: int = 3,
              progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """`profile` with decode factors fitted to real decodes of `model` (loaded once per placement)."""
    from .bench import plan_for, run_bench
    from .plan import llama_cpp_flags
    inv = read_inventory(model)
    bare = dataclasses.replace(profile, decode_factors={}, calibration=())
    cost = CostModel(bare)
    arms, components = [], {}
    for name, devices in placements(inv, cost.gpu):
        plan = plan_for(inv, devices, SETTINGS, bare, cost.gpu) if cost.gpu else _cpu_plan(inv, bare)
        arms.append((name, dataclasses.replace(plan, workload=WORKLOAD), None))
        components[name] = decode_components(cost, inv, devices, WORKLOAD, SETTINGS)
    result = run_bench(model, arms, WORKLOAD, reps, progress)
    measured = [CalibrationArm(arm.name, arm.flags or llama_cpp_flags(arm.plan),
                               tuple(round(1e6 / t, 1) for t in arm.decode_tokens_per_s), components[arm.name])
                for arm in result.arms]
    factors = fit(measured, cost.gpu is not None)
    log.info("decode factors %s", factors)
    identity = f"{inv.identity.file_name} tensor table sha256:{inv.identity.tensor_table_sha256[:16]}"
    return dataclasses.replace(profile, decode_factors=factors, calibration=tuple(measured),
                               calibration_model=identity)


def _cpu_plan(inv: ModelInventory, profile: Profile):
    from .plan import cpu_only_plan
    return cpu_only_plan(inv, n_ctx=SETTINGS.n_ctx, n_batch=SETTINGS.n_ubatch, n_ubatch=SETTINGS.n_ubatch,
                         n_threads=profile.n_threads, llama_cpp_build=profile.machine.llama_cpp_build,
                         profile_id=profile.profile_id, n_outputs_max=1)
