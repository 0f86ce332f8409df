"""Stage 6 over several devices: `bench` when --vram names several accelerators (local GPUs, llama.cpp RPC devices).

In one run_bench call (interleaved when the arms fit together) it measures the plan (split.plan_split) against
llama.cpp's own splits at the same per-device budgets (split.baseline_placements: `-ts` by memory and a `--fit`-style
fill, each predicted with split_cost.predict_split and loaded with the flags split.split_baselines gives it), and, as a
reference (no rival), every unit on the first local GPU of the budgets when that fits its free memory. Every arm
records what llama.cpp allocated on each device; `over_budget` names the devices where that passed the budget.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .baselines import Arm, all_on
from .bench import ALL_GPU_ARM, PLAN_ARM, Progress, bench
from .cost import CostModel
from .errors import BackendError
from .inventory import read_inventory
from .machine import gpu_devices
from .measure import run_bench
from .memory import usable_bytes
from .names import is_rpc, rpc_endpoint
from .plan import plan_settings
from .rpc import register_rpc_servers
from .schema import BenchArm, BenchResult, ModelInventory, Plan, Profile, Workload
from .split import baseline_placements, baseline_settings, plan_split, split_baselines, split_plan
from .split_cost import links, predict_split
from .units import format_bytes

log = logging.getLogger(__name__)


def require_devices(profile: Profile, budgets: dict[str, int], inv: ModelInventory) -> None:
    """Refuse, before anything loads, a budget on a device the profile has not measured (one line with the command
    that measures it) or a local GPU this llama-cpp-python lacks; then register the RPC servers of the budgets (a
    dead one is an RpcError)."""
    devices = list(budgets)
    links(CostModel(profile), inv, devices, baseline_settings(Workload(), devices))     # ProfileError if unmeasured
    have = {d.name for d in gpu_devices()}
    missing = [d for d in devices if not is_rpc(d) and d not in have]
    if missing:
        raise BackendError(f"--vram names {', '.join(missing)}, but this llama-cpp-python has "
                           f"{', '.join(sorted(have)) or 'no GPU: a CPU-only build'}; bench where that GPU is, with "
                           f"a CUDA build (oatoplan build --cuda)")
    register_rpc_servers([rpc_endpoint(d) for d in devices if is_rpc(d)])


def split_arms(inv: ModelInventory, plan: Plan, profile: Profile, budgets: dict[str, int], reference: bool = True,
               gpu_free_bytes: int = 0) -> list[Arm]:
    """The plan, then llama.cpp's splits at its budgets as arms with loader Plans (all the budgets' devices, in their
    order) and predictions; with `reference`, every unit on the first local GPU when it fits `gpu_free_bytes`."""
    cost, workload, devices = CostModel(profile), plan.workload or Workload(), list(budgets)
    arms = [Arm(PLAN_ARM, dict(plan.placement), plan_settings(plan), plan.flags, plan, plan.prediction)]
    s = baseline_settings(workload, devices)
    placements = baseline_placements(cost, inv, budgets, workload)
    for found, named in zip(placements, split_baselines(cost, inv, budgets, workload, placements)):
        if found is None:
            log.warning("baseline %r does not fit the budgets; left out", named.name)
            continue
        prediction, memory = predict_split(cost, inv, found[0], workload, s, links(cost, inv, devices, s))
        loaded = split_plan(inv, profile, found[0], s, devices, workload, prediction, memory, budgets)
        arms.append(Arm(named.name, found[0], s, named.flags, loaded, prediction))
    gpu = next((d for d in devices if not is_rpc(d)), None)
    everything = _all_on_gpu(inv, plan, profile, gpu, gpu_free_bytes) if reference and gpu else None
    return arms + [everything] * (everything is not None)


def _all_on_gpu(inv: ModelInventory, plan: Plan, profile: Profile, gpu: str, free_bytes: int) -> Arm | None:
    cost, workload = CostModel(profile), plan.workload or Workload()
    s = dataclasses.replace(plan_settings(plan), stream_slots=0)
    placement = all_on(inv, gpu)
    prediction, memory = predict_split(cost, inv, placement, workload, s, links(cost, inv, [gpu], s))
    if sum(memory[gpu].values()) > usable_bytes(free_bytes):
        log.warning("reference %r left out: every unit on %s does not fit its free memory (%s)", ALL_GPU_ARM, gpu,
                    format_bytes(free_bytes))
        return None
    loaded = split_plan(inv, profile, placement, s, [gpu], workload, prediction, memory, {})
    return Arm(ALL_GPU_ARM, placement, s, loaded.flags, loaded, prediction, reference=True)


def bench_split(model: str | Path, profile: Profile, budgets: dict[str, int], workload: Workload, reps: int = 3,
                progress: Progress | None = None, command: str = "", reference: bool = True) -> BenchResult:
    """Plan `model` over the budgets' devices for `workload`, then measure the plan, llama.cpp's splits that fit and
    (with `reference`) all on the first local GPU, side by side."""
    inv = read_inventory(model)
    require_devices(profile, budgets, inv)
    plan = plan_split(inv, profile, budgets, workload)
    gpu = next((d for d in budgets if not is_rpc(d)), None)
    free = next((d.free_bytes for d in gpu_devices() if d.name == gpu), 0)
    arms = split_arms(inv, plan, profile, budgets, reference, free)
    return dataclasses.replace(run_bench(model, arms, workload, reps, progress), command=command)


def bench_budgets(model: str | Path, profile: Profile, budgets: dict[str, int] | None, budget_bytes: int,
                  workload: Workload, reps: int = 3, progress: Progress | None = None, command: str = "",
                  reference: bool = True) -> BenchResult:
    """`bench` as --vram asked for it: over several devices when `budgets` (per device) names more than the
    profile's GPU, else on that GPU alone at its budget (or `budget_bytes`)."""
    if budgets and list(budgets) != [profile.gpu_device]:
        return bench_split(model, profile, budgets, workload, reps, progress, command, reference)
    return bench(model, profile, budgets[profile.gpu_device] if budgets else budget_bytes, workload, reps, progress,
                 command=command, reference=reference)


def over_budget(arm: BenchArm) -> list[str]:
    """The devices where llama.cpp allocated more than the arm's budget on them (its plan's budgets_bytes)."""
    return [d for d, b in arm.plan.budgets_bytes.items() if arm.allocated_bytes.get(d, 0) > b]
