"""Stage 6: measure a plan against llama.cpp's own choices at the same VRAM budget (`bench`), or the cost model
against three placements it never saw (`validate`). Entry points return a BenchResult; measure.py times, report.py
prints.

Beside the rivals, `bench` measures reference arms (BenchArm.reference, never a rival): the plan with weight
streaming off, when the plan streams (what streaming bought), the best plan with llama.cpp's own KV cache, when the
plan uses the segment KV cache (what the segments bought), and every unit on the GPU, held to the GPU's free memory
instead of the budget (what the budget costs).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from .baselines import Arm, all_on, baseline_arms, validation_arms
from .cost import CostModel, decode_bound_tokens_per_s, predict
from .errors import BackendError
from .graph import model_units
from .inventory import read_inventory
from .machine import gpu_devices
from .measure import run_bench
from .memory import fits, gpu_memory, gpu_overhead_bytes
from .plan import llama_cpp_flags, plan_for, plan_model, plan_settings
from .schema import BenchResult, ModelInventory, Plan, Profile, Workload
from .units import format_bytes

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
PLAN_ARM = "oatoplan plan"
STREAM_OFF_ARM = "oatoplan plan, streaming off"
ALL_GPU_ARM = "all GPU (reference)"
SEGMENTS_OFF_ARM = "oatoplan plan, segments off"


def _planned(inv: ModelInventory, arm: Arm, profile: Profile, cost: CostModel, workload: Workload) -> Arm:
    """`arm` with the loader Plan of its placement and the cost model's prediction."""
    plan = dataclasses.replace(plan_for(inv, arm.placement, arm.settings, profile, cost.gpu), workload=workload)
    return dataclasses.replace(arm, plan=plan, prediction=predict(cost, inv, arm.placement, workload, arm.settings))


def arm_plans(inv: ModelInventory, plan: Plan, profile: Profile, reference: bool = True,
              gpu_free_bytes: int = 0) -> list[Arm]:
    """The plan and the baselines at its budget, as arms with the Plans the loader applies and their predictions;
    with `reference`, then the reference arms: the plan with streaming off (when it streams) and all on the GPU (when
    that fits `gpu_free_bytes`, the GPU's free memory now)."""
    cost = CostModel(profile)
    workload = plan.workload or Workload()
    arms = [Arm(PLAN_ARM, dict(plan.placement), plan_settings(plan), plan.flags, plan, plan.prediction)]
    gpu_baselines = baseline_arms(inv, cost.gpu, plan.budget_bytes or 0, workload, gpu_overhead_bytes(profile)) \
        if plan.gpu_devices else []     # a CPU-only plan has no VRAM budget to hold GPU baselines to
    for arm in gpu_baselines:
        if arm.placement is None:
            log.warning("baseline %r does not fit the budget; left out", arm.name)
            continue
        arms.append(_planned(inv, arm, profile, cost, workload))
    return arms + (reference_arms(inv, plan, profile, gpu_free_bytes) if reference and plan.gpu_devices else [])


def reference_arms(inv: ModelInventory, plan: Plan, profile: Profile, gpu_free_bytes: int) -> list[Arm]:
    """The plan with weight streaming off (only when it streams), and every unit on the GPU with the plan's settings
    and streaming off, when its predicted VRAM fits `gpu_free_bytes` (the budget rule applied to the free memory)."""
    cost = CostModel(profile)
    workload = plan.workload or Workload()
    off = dataclasses.replace(plan_settings(plan), stream_slots=0)
    arms = []
    if plan.stream_slots > 0:
        # without streaming the compute buffer holds the largest host weight's copy again
        compute = gpu_memory(inv, model_units(inv), plan.placement, off, gpu_overhead_bytes(profile))["compute"]
        memory = dataclasses.replace(plan.memory, stream_bytes={}, compute_bytes={cost.gpu: compute}) \
            if plan.memory else None
        prediction = predict(cost, inv, plan.placement, workload, off)
        unstreamed = dataclasses.replace(plan, stream_slots=0, stream_slot_bytes=0, memory=memory,
                                         prediction=prediction)
        unstreamed = dataclasses.replace(unstreamed, flags=llama_cpp_flags(unstreamed))
        arms.append(Arm(STREAM_OFF_ARM, dict(plan.placement), off, unstreamed.flags, unstreamed, prediction,
                        reference=True))
    if plan.kv_segments and plan.budget_bytes:
        # the best placement with llama.cpp's own cache for the same n_ctx: what the segments bought
        stock = plan_model(inv, profile, plan.budget_bytes, workload, segments=False)
        arms.append(Arm(SEGMENTS_OFF_ARM, dict(stock.placement), plan_settings(stock), stock.flags, stock,
                        stock.prediction, reference=True))
    everything = all_on(inv, cost.gpu)
    if not fits(inv, model_units(inv), everything, off, gpu_free_bytes, gpu_overhead_bytes(profile)):
        log.warning("reference %r left out: every unit on %s does not fit its free memory (%s)", ALL_GPU_ARM,
                    cost.gpu, format_bytes(gpu_free_bytes))
        return arms
    return arms + [_planned(inv, Arm(ALL_GPU_ARM, everything, off, reference=True), profile, cost, workload)]


def require_gpu(profile: Profile, command: str) -> None:
    """bench and validate measure GPU placements: refuse, before any work, a CPU-only profile or a build without
    the profile's GPU."""
    if not profile.gpu_device:
        raise BackendError(f"{command} measures GPU placements, but profile {profile.profile_id} has no GPU: run it "
                           f"on a machine with a GPU and a CUDA build (oatoplan build --cuda), with a profile "
                           f"measured there (oatoplan profile run)")
    have = sorted(d.name for d in gpu_devices())
    if profile.gpu_device not in have:
        raise BackendError(f"{command} needs {profile.gpu_device} (profile {profile.profile_id}), but this "
                           f"llama-cpp-python has {', '.join(have) or 'no GPU: a CPU-only build'}; run it where "
                           f"that GPU is, with a CUDA build (oatoplan build --cuda), or pass a profile of this "
                           f"machine's GPU")


def bench(model: str | Path, profile: Profile, budget_bytes: int, workload: Workload, reps: int = 3,
          progress: Progress | None = None, command: str = "", reference: bool = True) -> BenchResult:
    """Plan `model` for `workload` within `budget_bytes`, then measure the plan, every baseline that fits and (with
    `reference`) the reference arms."""
    require_gpu(profile, "bench")
    if budget_bytes <= 0:
        raise BackendError("bench compares GPU placements at a VRAM budget, and --vram gave none (0, or nothing free "
                           "for auto): give a size, e.g. --vram 6GiB")
    inv = read_inventory(model)
    free = next((d.free_bytes for d in gpu_devices() if d.name == profile.gpu_device), 0)
    arms = arm_plans(inv, plan_model(inv, profile, budget_bytes, workload), profile, reference, free)
    return dataclasses.replace(run_bench(model, arms, workload, reps, progress), command=command)


def validate(model: str | Path, profile: Profile, workload: Workload, reps: int = 3,
             progress: Progress | None = None) -> BenchResult:
    """Predict and measure baselines.validation_arms with `profile`."""
    require_gpu(profile, "profile validate")
    inv = read_inventory(model)
    cost = CostModel(profile)
    arms = [_planned(inv, arm, profile, cost, workload) for arm in validation_arms(inv, cost.gpu, workload)]
    return run_bench(model, arms, workload, reps, progress)


def decode_bounds(inv: ModelInventory, profile: Profile, result: BenchResult) -> dict[str, float]:
    """Each arm's decode bound (tokens/s) under `profile`: host bytes at the CPU's streaming rate + GPU time."""
    cost = CostModel(profile)
    return {a.name: decode_bound_tokens_per_s(cost, inv, a.plan.placement) for a in result.arms if a.plan.placement}
