"""Stage 3b: placements over several accelerators (more local GPUs, llama.cpp RPC devices) and the CPU.

llama.cpp splits the n_gpu_layers last layers (`output` counts as one) over its devices in their order by
`tensor_split` (`-ts`, layer counts here), each layer's KV cache and attention with it; tensor overrides (`-ot`) move
single weights to the CPU. For each settings candidate (ubatch) an integer program picks which layers each device
takes and which of a layer's weights stay on the CPU:

    minimise   sum_u sum_d (t[u,d] - t[u,CPU]) w[u,d]  +  sum_i sum_d c[d] z[i,d]
    subject to sum_d w[u,d] <= 1                             (a unit on one device, or on the CPU)
               w[u,d] <= w[attn l(u),d]                       (a layer's weights on its layer's device or the CPU)
               w[attn l,d_k] = split[l,k] - split[l,k+1]      (split[l,k]: layer l on one of d_k..d_K-1)
               split[l,k] <= split[l+1,k], split[l,k+1] <= split[l,k]   (n_gpu_layers, each device a range in order: -ts)
               z[i,d] >= |w[i,d] - w[i-1,d]|                 (activations cross d's link between units i-1, i)
               weights + KV + compute + pool + overhead on d <= usable_bytes(budget[d])      for every device d

split_search.py solves it split by split; split_cost.py prices placements. t[u,d] comes from the profile's timings
on each device, c[d] is one crossing of d's link (its fixed cost and the activations' bytes; between two accelerators
the activations go through the host, over both links); consecutive roles' crossings are summed over layers (solve.py's
spans). Weight streaming stays off (it stages into one GPU); op offload takes large batches of host weights to the
first local GPU only, as llama.cpp's scheduler does (an RPC backend takes no offloaded op).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import pulp

from .cost import CostModel, combine, ubatches, unit_time_us
from .errors import PlanError, PlanInfeasibleError
from .graph import CPU, NORM, model_units, role, role_info
from .memory import Settings, compute_stage_bytes, gpu_overhead_bytes, kv_layer_bytes, pool_bytes, usable_bytes
from .names import device_flag, is_rpc, rpc_endpoint, split_device
from .machine import target_build
from .plan import llama_cpp_flags, make_plan, plan_model, tensor_placement
from .solve import crossing_terms
from .split_cost import Link, decode_rescale, layer_counts, links, predict_split
from .split_search import best_split
from .schema import BaselinePrediction, ModelInventory, Plan, Prediction, Profile, Workload
from .units import BYTES_PER_MIB, format_bytes

log = logging.getLogger(__name__)

SPLIT_UBATCH_CANDIDATES = (512, 2048)


@dataclass(frozen=True)
class SplitSolution:
    devices: dict[str, str]        # unit key -> "CPU" or a device of the budgets
    settings: Settings
    tensor_split: tuple[int, ...]  # layers per device, in budget order (output included)
    prediction: Prediction
    device_bytes: dict[str, dict[str, int]]    # device -> VRAM by category
    solve_s: float


def _problem(cost: CostModel, inv: ModelInventory, budgets: dict[str, int], workload: Workload, s: Settings,
             device_links: list[Link], start: dict[str, str] | None = None):
    """The integer program of one settings candidate, written like PuLP's examples; `start` (a placement) is CBC's
    starting point. Returns the problem and w[i, d], unit i on device d (a variable or, for a layer's KV, an
    expression of the split variables)."""
    units, devices = model_units(inv), list(budgets)
    n, hp = len(units), inv.hparams
    # Data: each unit's objective time on each device (us), bytes on a device, the crossing costs
    t = {}
    for d in [CPU] + devices:
        for i, u in enumerate(units):
            p, dec = unit_time_us(cost, inv, u, d, workload, s)
            t[i, d] = combine(p, dec * decode_rescale(cost, d), workload)
    n_ub = len(ubatches(workload.n_prompt, s.n_ubatch))
    cross = {x.device: combine(n_ub * x.prefill_crossing_us, x.decode_crossing_us, workload) for x in device_links}
    size = [kv_layer_bytes(hp, u.layer, s.n_ctx, s.n_ubatch, s.type_k, s.type_v) if u.is_attention else u.n_bytes
            for u in units]
    output_stage, layer_stage = compute_stage_bytes(inv, s)
    first_gpu = next((x.device for x in device_links if x.local_gpu), None)
    offload = bool(first_gpu) and s.op_offload and s.n_ubatch >= 32
    overhead = gpu_overhead_bytes(cost.profile)
    attn_of = {u.layer: i for i, u in enumerate(units) if u.is_attention}
    attn = sorted(attn_of.values())
    mib = 1.0 / BYTES_PER_MIB

    prob = pulp.LpProblem("oatoplan_split", pulp.LpMinimize)
    # Variables: split[l,k] = 1 puts layer l (its KV) on one of devices[k:] (k = 0: on any device), so that layer l
    # is on devices[k] when split[l,k] - split[l,k+1] = 1; on[i,d] = 1 puts weight unit i on device d (none: the
    # CPU); z = crossings of d's link; used[d] = 1 when d holds anything; compute[d] MiB
    n_dev = len(devices)
    split = pulp.LpVariable.dicts("split", [(l, k) for l in sorted(attn_of) for k in range(n_dev)],
                                  cat=pulp.LpBinary)
    x = pulp.LpVariable.dicts("on", [(i, d) for i, u in enumerate(units) if not u.is_attention for d in devices],
                              cat=pulp.LpBinary)
    w = {}
    for i, u in enumerate(units):
        for k, d in enumerate(devices):
            w[i, d] = (split[u.layer, k] - (split[u.layer, k + 1] if k + 1 < n_dev else 0)) if u.is_attention \
                else x[i, d]
    pairs, spans = crossing_terms(units)
    pairs.append((n - 1, n))            # the logits back to the CPU
    z = pulp.LpVariable.dicts("cross", [(j, d) for j in range(len(pairs) + len(spans)) for d in devices], lowBound=0)
    used = pulp.LpVariable.dicts("used", devices, cat=pulp.LpBinary)
    compute = pulp.LpVariable.dicts("compute_mib", devices, lowBound=0)
    copy = pulp.LpVariable("copy_mib", lowBound=0)
    # the time no placement changes, as a variable fixed at 1 so that CBC's relative gap is relative to the time
    base = pulp.LpVariable("base", lowBound=1, upBound=1)

    # Objective: unit times where they run, and the crossings (us)
    prob += (pulp.lpSum((t[i, d] - t[i, CPU]) * w[i, d] for i in range(n) for d in devices)
             + pulp.lpSum(cross[d] * z[j, d] for j in range(len(pairs) + len(spans)) for d in devices)
             + sum(t[i, CPU] for i in range(n)) * base), "time_us"

    # n_gpu_layers and the split: each split[., k] is a suffix of the layers, the suffixes nested (devices in order)
    for a, b in zip(attn, attn[1:]):
        for k in range(n_dev):
            prob += split[units[a].layer, k] <= split[units[b].layer, k], f"split_suffix_{units[a].layer}_{k}"
    for l in attn_of:
        for k in range(n_dev - 1):
            prob += split[l, k + 1] <= split[l, k], f"split_nested_{l}_{k}"
    for i, u in enumerate(units):
        if u.layer is None:
            prob += pulp.lpSum(w[i, d] for d in devices) <= 1, f"one_device_{i}"
        elif not u.is_attention:
            for d in devices:
                prob += w[i, d] <= w[attn_of[u.layer], d], f"with_layer_{i}_{d}"
    # A norm runs where the unit after it does (its consumer in the layer): apart, it saves a few KiB of VRAM for a
    # crossing pair the model prices like the one it replaces, while the split it adds (a CPU norm before an RPC
    # device's layers) halved decode where it was measured (docs/results.md, several devices)
    for i, u in enumerate(units[:-1]):
        if role_info(role(u))[1] == NORM and units[i + 1].layer == u.layer:
            for d in devices:
                prob += w[i, d] == w[i + 1, d], f"norm_with_consumer_{i}_{d}"
    # Symmetry: within a device's range, each role's weights on the device are those of its last layers (as
    # n_gpu_layers does for whole layers): on[role l, d] <= on[role l+1, d] unless layer l+1 is on a later device
    by_role: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        if u.layer is not None and not u.is_attention:
            by_role.setdefault(role(u), []).append(i)
    for name, idx in by_role.items():
        for a, b in zip(idx, idx[1:]):
            for k, d in enumerate(devices):
                later = split[units[b].layer, k + 1] if k + 1 < n_dev else 0
                prob += w[a, d] <= w[b, d] + later, f"suffix_{name}_{a}_{d}"
    # Crossings in graph order, from the input lookup on the CPU to the logits on the CPU: |w[a,d] - w[b,d]| for
    # consecutive units; two roles adjacent in every layer have their layers on d at the end of d's range, so they
    # cross d's link |sum w[role a, d] - sum w[role b, d]| times (solve.py's spans)
    for d in devices:
        for j, (a, b) in enumerate(pairs):
            difference = (w[b, d] if b < n else 0) - (w[a, d] if a >= 0 else 0)
            prob += z[j, d] >= difference, f"cross_in_{j}_{d}"
            prob += z[j, d] >= -difference, f"cross_out_{j}_{d}"
        for j, (first, second) in enumerate(spans, start=len(pairs)):
            difference = pulp.lpSum(w[i, d] for i in second) - pulp.lpSum(w[i, d] for i in first)
            prob += z[j, d] >= difference, f"cross_in_{j}_{d}"
            prob += z[j, d] >= -difference, f"cross_out_{j}_{d}"
    # Memory on each device: its units, its compute buffer, the pool and overhead of a local GPU that holds anything
    out = next(i for i, u in enumerate(units) if u.is_output)
    for d, link in zip(devices, device_links):
        for i, u in enumerate(units):
            if u.is_attention or u.layer is None:
                prob += used[d] >= w[i, d], f"used_{i}_{d}"
        if offload and d == first_gpu:
            prob += used[d] == 1, f"op_offload_{d}"
            prob += compute[d] >= (layer_stage * mib) * used[d] + copy, f"compute_layer_{d}"
        else:
            prob += compute[d] >= (layer_stage * mib) * used[d], f"compute_layer_{d}"
        prob += compute[d] >= (output_stage * mib) * w[out, d], f"compute_output_{d}"
        fixed = pool_bytes(inv, s) + (overhead if link.local_gpu else 0)
        prob += (pulp.lpSum(size[i] * mib * w[i, d] for i in range(n)) + compute[d] + fixed * mib * used[d]
                 <= usable_bytes(budgets[d]) * mib), f"budget_{d}"
    if offload:
        for i, u in enumerate(units):
            if u.matrices and not u.is_output:
                prob += copy >= size[i] * mib * (1 - pulp.lpSum(w[i, d] for d in devices)), f"copy_{i}"
    if start:
        for k, d in enumerate(devices):
            for i, u in enumerate(units):
                if u.is_attention:
                    split[u.layer, k].setInitialValue(int(start[u.key] in devices[k:]))
                else:
                    x[i, d].setInitialValue(int(start[u.key] == d))
    return prob, w, split


def candidate_settings(workload: Workload, device_links: list[Link], profiled_gpu: str | None) -> list[Settings]:
    """ubatch candidates; op offload on where the first local GPU of the devices (where llama.cpp offloads to) is
    the profiled one (whose timings price it); one logit row per ubatch."""
    first_gpu = next((x.device for x in device_links if x.local_gpu), None)
    offload = first_gpu is not None and first_gpu == profiled_gpu
    largest = max(512, 1 << (max(workload.n_prompt, 1) - 1).bit_length())
    return [Settings(ub, offload, True, workload.n_ctx, workload.type_k, workload.type_v, n_outputs_max=1)
            for ub in SPLIT_UBATCH_CANDIDATES if ub <= largest]


def solve_split(inv: ModelInventory, cost: CostModel, budgets: dict[str, int], workload: Workload,
                baselines=None) -> SplitSolution:
    """The fastest placement over the budgets' devices (in their order) for `workload`: for each settings candidate,
    the layer counts searched from llama.cpp's best split (split_search.py; `baselines`: baseline_placements')."""
    started, devices, best = time.perf_counter(), list(budgets), None
    units = model_units(inv)
    baselines = baseline_placements(cost, inv, budgets, workload) if baselines is None else baselines
    starts = [b for b in baselines if b is not None]
    for s in candidate_settings(workload, links(cost, inv, devices, Settings(512, False, True, workload.n_ctx,
                                                                             workload.type_k, workload.type_v)),
                                cost.gpu):
        device_links = links(cost, inv, devices, s)
        start = _best_start(cost, inv, budgets, workload, s, device_links, starts)
        prob, w, split = _problem(cost, inv, budgets, workload, s, device_links)
        first = tuple(sum(1 for u in units if u.is_attention and start[u.key] == d) for d in devices) if start \
            else (0,) * len(devices)
        found = best_split(prob, w, split, units, devices, first, f"ubatch {s.n_ubatch}")
        if found is None:
            log.debug("ubatch %d: nothing fits", s.n_ubatch)
            continue
        counts, placement = found
        prediction, memory = predict_split(cost, inv, placement, workload, s, device_links)
        t = combine(prediction.prefill_s, prediction.decode_s_per_token, workload)
        log.info("ubatch %d: layers %s, predicted %.3f s", s.n_ubatch, counts, t)
        if best is None or t < best[0]:
            best = (t, placement, s, prediction, memory)
    if best is None:
        raise PlanInfeasibleError(f"nothing fits the budgets {', '.join(f'{d}={format_bytes(b)}' for d, b in budgets.items())}"
                                  f" with {inv.identity.file_name}: give the devices more memory")
    _, placement, s, prediction, memory = best
    return SplitSolution(placement, s, layer_counts(units, placement, devices), prediction, memory,
                         time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------
# The Plan, and llama.cpp's own ways to split a model over several devices

def _layer_placement(inv: ModelInventory, counts: tuple[float, ...], n_gpu_layers: int,
                     devices: list[str]) -> dict[str, str]:
    """Every unit where llama.cpp puts it for -ngl and -ts alone (each layer whole on its device)."""
    n_layer = inv.hparams.n_layer
    return {u.key: split_device(n_layer if u.layer is None else u.layer, n_layer, n_gpu_layers, tuple(devices),
                                counts) for u in model_units(inv)}


def _fits(memory: dict[str, dict[str, int]], budgets: dict[str, int]) -> bool:
    return all(sum(memory[d].values()) <= usable_bytes(b) for d, b in budgets.items())


def _largest_fitting(cost: CostModel, inv: ModelInventory, budgets: dict[str, int], workload: Workload,
                     s: Settings, counts_for) -> tuple[dict[str, str], tuple[float, ...], int] | None:
    """The most layers (n_gpu_layers) whose placement, with the split counts_for(n) gives, fits every budget."""
    devices, n_layer = list(budgets), inv.hparams.n_layer
    device_links = links(cost, inv, devices, s)
    for ngl in range(n_layer + 1, 0, -1):
        counts = counts_for(ngl)
        if counts is None:
            continue
        placement = _layer_placement(inv, counts, ngl, devices)
        _, memory = predict_split(cost, inv, placement, workload, s, device_links)
        if _fits(memory, budgets):
            return placement, counts, ngl
    return None


BASELINE_NAMES = ("llama.cpp layer split (-ts by memory)", "--fit-style fill")


def baseline_settings(workload: Workload, devices: list[str]) -> Settings:
    return Settings(512, any(not is_rpc(d) for d in devices), False, workload.n_ctx, workload.type_k, workload.type_v)


def baseline_placements(cost: CostModel, inv: ModelInventory, budgets: dict[str, int], workload: Workload):
    """llama.cpp's own splits at the budgets (BASELINE_NAMES): (placement, layer counts, n_gpu_layers) or None."""
    devices = list(budgets)
    s = baseline_settings(workload, devices)
    share = tuple(float(budgets[d]) for d in devices)
    proportional = _largest_fitting(cost, inv, budgets, workload, s, lambda ngl: share)

    def fill(ngl: int) -> tuple[float, ...] | None:
        # llama.cpp's split maps layer k of the ngl to the device whose cumulative share passes k/ngl: layer counts
        # that fill the last device first
        counts, left = [0] * len(devices), ngl
        for i in reversed(range(len(devices))):
            take = min(left, _layers_that_fit(cost, inv, budgets, workload, s, devices, i, ngl))
            counts[i], left = take, left - take
        return tuple(float(c) for c in counts) if left == 0 and sum(counts) else None

    return proportional, _largest_fitting(cost, inv, budgets, workload, s, fill)


def split_baselines(cost: CostModel, inv: ModelInventory, budgets: dict[str, int], workload: Workload,
                    baselines=None) -> list[BaselinePrediction]:
    """llama.cpp's own choices at the same per-device budgets, predicted: its default layer split (`-ts` in
    proportion to the devices' memory, here the budgets, as many layers as fit: -ngl), and a fill in `--fit`'s
    manner (from the last layer back, each device, last first, takes all the layers it holds). Both with mmap on and
    ubatch 512, as users run them. No `-sm row`: this llama.cpp's CUDA backend has no split buffer type (a load with
    it fails; `-sm tensor` replaced it) and RPC devices never had one."""
    devices, out = list(budgets), []
    s = baseline_settings(workload, devices)
    share = tuple(float(budgets[d]) for d in devices)
    baselines = baseline_placements(cost, inv, budgets, workload) if baselines is None else baselines
    for name, found in zip(BASELINE_NAMES, baselines):
        if found is None:
            out.append(BaselinePrediction(name, "does not fit", None))
            continue
        placement, counts, ngl = found
        prediction, _ = predict_split(cost, inv, placement, workload, s, links(cost, inv, devices, s))
        ts = ",".join(f"{c:g}" for c in (counts if name.startswith("--fit") else     # the budgets' ratios, in MiB
                                           [b // 2 ** 20 for b in share]))
        rpc = [rpc_endpoint(d) for d in devices if is_rpc(d)]
        flags = (f"--rpc {','.join(rpc)} " if rpc else "") + \
            f"-ngl {ngl} -dev {','.join(device_flag(d, tuple(rpc)) for d in devices)} -ts {ts} -ub 512"
        out.append(BaselinePrediction(name, flags, prediction))
    return out


def _best_start(cost: CostModel, inv: ModelInventory, budgets: dict[str, int], workload: Workload, s: Settings,
                device_links: list[Link], starts) -> dict[str, str] | None:
    """The fastest of llama.cpp's splits that fits the budgets under settings s: where CBC starts."""
    best = None
    for placement, _, _ in starts:
        prediction, memory = predict_split(cost, inv, placement, workload, s, device_links)
        t = combine(prediction.prefill_s, prediction.decode_s_per_token, workload)
        if _fits(memory, budgets) and (best is None or t < best[0]):
            best = (t, placement)
    return best[1] if best else None


def _layers_that_fit(cost: CostModel, inv: ModelInventory, budgets: dict[str, int], workload: Workload,
                     s: Settings, devices: list[str], i: int, ngl: int) -> int:
    """How many whole layers device i holds within its budget (its range's last; output on the last device)."""
    hp, d = inv.hparams, devices[i]
    layer_bytes = {}
    for u in model_units(inv):
        key = hp.n_layer if u.layer is None else u.layer
        layer_bytes[key] = layer_bytes.get(key, 0) + (
            kv_layer_bytes(hp, u.layer, s.n_ctx, s.n_ubatch, s.type_k, s.type_v) if u.is_attention else u.n_bytes)
    output_stage, layer_stage = compute_stage_bytes(inv, s)
    fixed = layer_stage + pool_bytes(inv, s) + (0 if is_rpc(d) else gpu_overhead_bytes(cost.profile))
    room, n = usable_bytes(budgets[d]) - fixed, 0
    if i == len(devices) - 1:
        room -= layer_bytes[hp.n_layer] + output_stage
        n = 1 if room >= 0 else 0
    for il in range(hp.n_layer - 1, -1, -1):
        if room - layer_bytes[il] < 0 or n >= ngl:
            break
        room, n = room - layer_bytes[il], n + 1
    return max(n, 0) if room >= 0 else 0


def plan_split(inv: ModelInventory, profile: Profile, budgets: dict[str, int], workload: Workload) -> Plan:
    """The Plan over the budgets' devices, with its prediction, llama.cpp's own splits predicted beside it."""
    cost = CostModel(profile)
    baselines = baseline_placements(cost, inv, budgets, workload)      # the solver's start, and the plan's rivals
    solution = solve_split(inv, cost, budgets, workload, baselines)
    memory = solution.device_bytes
    # a device the plan gives nothing is left out (llama.cpp would still start its backend, or need its server)
    s, devices = solution.settings, [d for d in budgets if sum(memory[d].values())]
    notes = (f"{len(budgets)} devices in this order ({', '.join(budgets)}): layers "
             f"{', '.join(f'{d} {c}' for d, c in zip(budgets, solution.tensor_split))} (output counts as one), "
             f"ubatch {s.n_ubatch}, solved in {solution.solve_s:.2f} s",
             *(f"{d}: {format_bytes(sum(memory[d].values()))} of {format_bytes(b)} "
               f"({', '.join(f'{k} {format_bytes(v)}' for k, v in memory[d].items() if v)})"
               for d, b in budgets.items()),
             "weight streaming is off with several devices (it stages into one GPU)",
             *(["RPC devices: their timings are the profile's, through the link it measured; decode on them is "
                "not calibrated"] if any(map(is_rpc, devices)) else []))
    plan = split_plan(inv, profile, solution.devices, s, devices, workload, solution.prediction, memory, budgets, notes)
    return dataclasses.replace(plan, baselines=tuple(split_baselines(cost, inv, budgets, workload, baselines)))


def split_plan(inv: ModelInventory, profile: Profile, placement: dict[str, str], s: Settings, devices: list[str],
               workload: Workload, prediction: Prediction, memory: dict[str, dict[str, int]],
               budgets: dict[str, int], notes: tuple[str, ...] = ()) -> Plan:
    """The loader Plan of a placement over `devices` (split order): their layers as tensor_split, the RPC ones'
    servers as --rpc, mmap off only where settings pin host weights for a local GPU; `budgets` as the plan's."""
    tensors, n_gpu_layers = tensor_placement(inv, placement)
    local = any(not is_rpc(d) for d in devices)
    plan = make_plan(inv, tensors, n_gpu_layers=n_gpu_layers, gpu_devices=tuple(devices),
                     tensor_split=layer_counts(model_units(inv), placement, devices) if devices else (),
                     rpc_servers=tuple(rpc_endpoint(d) for d in devices if is_rpc(d)), n_ctx=workload.n_ctx,
                     n_batch=s.n_ubatch, n_ubatch=s.n_ubatch, use_mmap=not (local and s.pinned),
                     op_offload=s.op_offload, n_outputs_max=s.n_outputs_max, flash_attn=True,
                     type_k=s.type_k, type_v=s.type_v, n_threads=profile.n_threads,
                     llama_cpp_build=target_build(profile), profile_id=profile.profile_id,
                     budget_bytes=sum(budgets.values()) or None, notes=notes,
                     compute_bytes={d: m["compute"] for d, m in memory.items()})
    plan = dataclasses.replace(plan, workload=workload, prediction=prediction, placement=dict(placement),
                               budgets_bytes=dict(budgets))
    return dataclasses.replace(plan, flags=llama_cpp_flags(plan))


def plan_budgets(inv: ModelInventory, profile: Profile, budgets: dict[str, int] | None, budget_bytes: int,
                 workload: Workload, write_lp=None) -> Plan:
    """`plan` as --vram asked for it: over several devices when `budgets` (per device) names more than the
    profile's GPU, else on that GPU alone at its budget (or `budget_bytes`)."""
    if budgets and list(budgets) != [profile.gpu_device]:
        if write_lp:
            raise PlanError("--write-lp: a plan over several devices writes no LP file yet; leave --write-lp out")
        return plan_split(inv, profile, budgets, workload)
    return plan_model(inv, profile, budgets[profile.gpu_device] if budgets else budget_bytes, workload, write_lp)
