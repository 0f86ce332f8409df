"""Stage 3: choose the placement. Entry point: `solve(inventory, cost, budget_bytes, workload)` -> Solution.

For each candidate of the few discrete settings (ubatch size, op offload), an integer program picks, jointly, which
units (a matrix with its bias/norm, or a layer's KV cache and attention) live on the GPU:

    minimise   sum_u t_cpu[u] (1 - x[u]) + t_gpu[u] x[u]  +  t_cross * (number of CPU<->GPU crossings)
    subject to z[i] >= |x[i-1] - x[i]|        for consecutive units in graph order (CPU<->GPU crossings)
               x[attn l] <= x[attn l+1]       (n_gpu_layers: the layers with KV on the GPU are the last ones)
               x[role l] <= x[role l+1]       (each role's GPU layers are the last ones: no symmetric solutions)
               weights + KV + compute + pool + overhead <= usable_bytes(budget)   (memory.py's terms and budget rule; compute
                                                          buffer: logits and activations for the ubatch, plus the
                                                          largest weight op offload copies in)

with t = prefill + n_gen x decode (or one of them, by the workload's objective). With weight streaming, host
weights upload on a second stream while the GPU computes: t holds the compute stream's prefill, and a variable
excess >= uploads - (compute stream's prefill) adds the time the uploads outlast it (ideal overlap; the prediction
simulates the slots, cost.stream_prefill_us). Each streamed host tensor, a norm as much as a matrix, also costs the
profile's stream_split_us on both streams, which replaces the crossings of a streaming ubatch (cost.prefill_crossings):
a small host tensor then costs a split and saves almost no VRAM. The best candidate wins. `greedy`
(best time saved per byte first) is CBC's starting point and one of the baselines (baselines.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pulp

from .cost import CostModel, combine, fixed_time_us, predict, split_priced, ubatches, unit_prefill_us, unit_time_us
from .errors import OatoError, PlanInfeasibleError, SolverError
from .files import Output, write_file
from .graph import CPU, Unit, crossings, model_units, role
from .memory import Settings, VramTerms, budget_for, gpu_overhead_bytes, usable_bytes, vram_terms
from .schema import ModelInventory, Prediction, Profile, Workload
from .segments import host_types_for, segment_cells_for, segments_available
from .units import BYTES_PER_MIB, format_bytes

log = logging.getLogger(__name__)

UBATCH_CANDIDATES = (512, 1024, 2048, 4096)
# Weight streaming: the patch that a build must have, and the staging slots the integer program assumes (the plan
# then tries others, streaming.refine; never fewer than 3, see there)
STREAM_PATCH = "weight-streaming"
STREAM_SLOTS = 3
# On the CPU, op offload does not take large batches elsewhere, so smaller ubatches are candidates too.
CPU_UBATCH_CANDIDATES = (128, 256) + UBATCH_CANDIDATES


@dataclass(frozen=True)
class Solution:
    devices: dict[str, str]        # unit key -> "CPU" or the GPU
    settings: Settings
    prediction: Prediction
    objective_us: float
    solve_s: float
    candidates: tuple[tuple[Settings, float], ...]   # every settings candidate and its optimum (us)


@dataclass
class _Instance:
    units: list[Unit]
    t_cpu: list[float]             # objective contribution of each unit on the CPU, us
    t_gpu: list[float]
    cross_us: float                # objective cost of one crossing
    fixed_us: float
    terms: VramTerms               # VRAM terms (bytes)
    size_mib: list[float]          # the terms' VRAM of each unit on the GPU, in the MiB the program works in
    # weight streaming: each unit's prefill on the compute stream (on the CPU, on the GPU) and its uploads on the copy
    # stream (on the CPU), us; the weight of prefill in the objective; all empty / 0 without streaming
    prefill_cpu: list[float] = field(default_factory=list)
    prefill_gpu: list[float] = field(default_factory=list)
    upload_cpu: list[float] = field(default_factory=list)
    fixed_prefill_us: float = 0.0
    prefill_weight: float = 0.0


def instance(cost: CostModel, inv: ModelInventory, workload: Workload, s: Settings) -> _Instance:
    """The numbers of one integer program."""
    units = model_units(inv)
    n_ub = len(ubatches(workload.n_prompt, s.n_ubatch))
    terms = vram_terms(inv, units, s, gpu_overhead_bytes(cost.profile))
    uploads = [sum(u for _, u in unit_prefill_us(cost, inv, unit, CPU, workload, s)) for unit in units] \
        if terms.stream_slots else [0.0] * len(units)
    times = {d: [unit_time_us(cost, inv, u, d, workload, s) for u in units] for d in (CPU, cost.gpu)}
    t_cpu = [combine(p - up, d, workload) for (p, d), up in zip(times[CPU], uploads)]
    t_gpu = [combine(p, d, workload) for p, d in times[cost.gpu]]
    # a split_priced ubatch crosses only from the input lookup to the GPU (its host units' splits are in their
    # times: cost.prefill_crossings); any other ubatch crosses wherever units alternate
    n_priced = sum(split_priced(cost, s, n) for n in ubatches(workload.n_prompt, s.n_ubatch))
    fixed = fixed_time_us(cost, inv, workload, s, True)
    fixed = (fixed[0] + n_priced * cost.crossing_us, fixed[1])
    inst = _Instance(units, t_cpu, t_gpu, combine((n_ub - n_priced) * cost.crossing_us, cost.decode_crossing_us,
                                                  workload),
                     combine(*fixed, workload), terms, [b / BYTES_PER_MIB for b in terms.unit_bytes])
    if terms.stream_slots:
        inst.prefill_cpu = [p - up for (p, _), up in zip(times[CPU], uploads)]
        inst.prefill_gpu = [p for p, _ in times[cost.gpu]]
        inst.upload_cpu = uploads
        inst.fixed_prefill_us = fixed[0]
        inst.prefill_weight = combine(1.0, 0.0, workload)
    return inst


def build_problem(inst: _Instance, budget_mib: float) -> tuple[pulp.LpProblem, dict]:
    """The integer program of one settings candidate, written like PuLP's examples."""
    prob = pulp.LpProblem("oatoplan_placement", pulp.LpMinimize)
    n = len(inst.units)
    terms, size_mib = inst.terms, inst.size_mib
    output_stage_mib = terms.output_stage_bytes / BYTES_PER_MIB
    layer_stage_mib = terms.layer_stage_bytes / BYTES_PER_MIB
    # Variables: x[i] = 1 puts unit i on the GPU; z[i] = 1 when units i-1 and i (or the CPU input and unit 0) sit on
    # different devices; compute and copy are VRAM (MiB) of the compute buffer and of its largest weight copy
    x = pulp.LpVariable.dicts("gpu", range(n), cat=pulp.LpBinary)
    pairs, spans = crossing_terms(inst.units)
    z = pulp.LpVariable.dicts("cross", range(len(pairs) + len(spans)), lowBound=0)
    compute = pulp.LpVariable("compute_mib", lowBound=0)
    copy = pulp.LpVariable("copy_mib", lowBound=0)
    # weight streaming: the staging slots (MiB), and the time the uploads outlast the compute stream (us)
    ring = pulp.LpVariable("stream_mib", lowBound=0)
    excess = pulp.LpVariable("upload_excess_us", lowBound=0)
    # the time no placement changes, as a variable fixed at 1 so that CBC's relative gap is relative to the time
    base = pulp.LpVariable("base", lowBound=1, upBound=1)

    # Objective: unit times on their devices, crossings, and the time no placement changes (us)
    prob += (pulp.lpSum((inst.t_gpu[i] - inst.t_cpu[i]) * x[i] for i in range(n))
             + inst.cross_us * pulp.lpSum(z.values()) + (inst.fixed_us + sum(inst.t_cpu)) * base
             + inst.prefill_weight * excess), "time_us"

    # Weight streaming: uploads of the host weights (x = 0) against the compute stream's prefill
    if inst.upload_cpu and inst.prefill_weight:
        prob += excess >= (pulp.lpSum(inst.upload_cpu[i] * (1 - x[i]) for i in range(n))
                           - pulp.lpSum(inst.prefill_cpu[i] * (1 - x[i]) + inst.prefill_gpu[i] * x[i] for i in range(n))
                           - inst.fixed_prefill_us), "upload_excess"

    # Crossings: |x[a] - x[b]| linearised for consecutive units a, b (a = -1: the token embedding lookup, on the
    # CPU). Two roles adjacent in every layer (attn_q then attn_k...) both have their GPU layers at the end, so over
    # all layers they cross |sum x[role a] - sum x[role b]| times: one term per role pair instead of one per layer
    for j, (a, b) in enumerate(pairs):
        before = x[a] if a >= 0 else 0
        prob += z[j] >= x[b] - before, f"cross_up_{j}"
        prob += z[j] >= before - x[b], f"cross_down_{j}"
    for j, (first, second) in enumerate(spans, start=len(pairs)):
        difference = pulp.lpSum(x[i] for i in first) - pulp.lpSum(x[i] for i in second)
        prob += z[j] >= difference, f"cross_up_{j}"
        prob += z[j] >= -difference, f"cross_down_{j}"

    # n_gpu_layers: KV cache and attention of layer l on the GPU only if layer l+1's is too
    attn = [i for i, u in enumerate(inst.units) if u.is_attention]
    for a, b in zip(attn, attn[1:]):
        prob += x[a] <= x[b], f"kv_suffix_{inst.units[a].layer}"

    # Symmetry: for each role, layers with the GPU copy are the last ones (as n_gpu_layers does for whole layers)
    by_role: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(inst.units):
        if u.layer is not None and not u.is_attention:
            by_role[role(u)].append(i)
    for name, idx in by_role.items():
        for a, b in zip(idx, idx[1:]):
            prob += x[a] <= x[b], f"suffix_{name}_{inst.units[a].layer}"

    # Compute buffer: the output stage (logits) where the output matmul runs on the GPU, the layer stage with the
    # largest host weight that op offload copies in
    out, copied = terms.output, terms.copied()
    largest_copy = max((size_mib[i] for i in copied), default=0.0)
    if terms.stream_slots:
        # every host weight uploads into a slot of the ring (the largest one's size), none into the compute buffer
        for i in copied:
            prob += ring >= terms.stream_slots * terms.slot_bytes[i] / BYTES_PER_MIB * (1 - x[i]), f"slot_{i}"
        copied, largest_copy = [], 0.0
    if terms.offload:
        prob += compute >= output_stage_mib + terms.copy_output * size_mib[out] * (1 - x[out]), "compute_output_stage"
        # (the copy terms only matter when the layer stage can outgrow the output stage; they are left out otherwise,
        # which keeps the relaxation tight)
        if layer_stage_mib + largest_copy > output_stage_mib:
            for i in copied:
                prob += copy >= size_mib[i] * (1 - x[i]), f"copy_{i}"
    else:
        prob += compute >= output_stage_mib * x[out], "compute_output_stage"
    prob += compute >= layer_stage_mib + copy, "compute_layer_stage"

    # VRAM: weights + KV + compute buffer + pool + the process's overhead within the budget
    prob += (pulp.lpSum(size_mib[i] * x[i] for i in range(n)) + compute + ring
             + (terms.pool_bytes + terms.overhead_bytes) / BYTES_PER_MIB <= budget_mib, "vram_budget")
    return prob, x


# CBC's proven gap: a placement within 0.2% of the optimum time is accepted. The cost model's own error is larger
# (the validate-* files in benchmarks/results/), and a tighter gap costs seconds on large models (solve times:
# benchmarks/results/2026-11-22-devbox-solve-speed.json).
GAP_REL = 2e-3


def crossing_terms(units: list[Unit]) -> tuple[list[tuple[int, int]], list[tuple[list[int], list[int]]]]:
    """Consecutive unit pairs in graph order: single pairs (a, b), and role pairs adjacent within every layer,
    as the unit lists of each role (`spans`)."""
    layers = {u.layer for u in units if u.layer is not None}
    by_roles: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    pairs = []
    for b, unit in enumerate(units):
        a = b - 1
        if a >= 0 and unit.layer is not None and units[a].layer == unit.layer:
            by_roles[(role(units[a]), role(unit))].append((a, b))
        else:
            pairs.append((a, b))
    spans = []
    for found in by_roles.values():
        if {units[b].layer for _, b in found} == layers:
            spans.append(([a for a, _ in found], [b for _, b in found]))
        else:
            pairs += found
    return pairs, spans


def _solver(relax: bool = False, gap: float = GAP_REL, warm: bool = False) -> pulp.LpSolver:
    # CBC, bundled with pulp 3.x; one thread and no time limit, so that the same inputs give the same plan
    return pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=gap, mip=not relax, warmStart=warm)


def lower_bound(problem: tuple[pulp.LpProblem, dict]) -> float | None:
    """The LP relaxation's optimum (us): no placement of this candidate can be faster. None if infeasible."""
    prob, _ = problem
    status = prob.solve(_solver(relax=True))
    return pulp.value(prob.objective) if pulp.LpStatus[status] == "Optimal" else None


def write_lp_file(prob: pulp.LpProblem, out: Output | Path) -> Path:
    """The program as an LP file through files.write_file (atomic, refuses inputs and other files): pulp writes it
    into a private temp directory first, since it writes to a path it is given without any check."""
    with tempfile.TemporaryDirectory(prefix="oatoplan-lp-") as private:
        prob.writeLP(os.path.join(private, "problem.lp"))
        text = Path(private, "problem.lp").read_bytes()
    return write_file(out, text, "lp")


def solve_instance(inst: _Instance, budget_mib: float, write_lp: Output | Path | None = None, gap: float = GAP_REL,
                   start: list[int] | None = None,
                   problem: tuple[pulp.LpProblem, dict] | None = None) -> tuple[list[int], float] | None:
    """Optimal x for one candidate (within `gap`), and its objective (us); None when nothing fits. `start`: a
    feasible placement CBC starts from (the greedy one); `problem`: the candidate's program, if already built."""
    prob, x = problem or build_problem(inst, budget_mib)
    if write_lp:
        write_lp_file(prob, write_lp)
    if start is not None:
        for i, value in enumerate(start):
            x[i].setInitialValue(value)
    status = prob.solve(_solver(gap=gap, warm=start is not None))
    if pulp.LpStatus[status] == "Infeasible":
        return None
    if pulp.LpStatus[status] != "Optimal":
        raise SolverError(f"CBC returned {pulp.LpStatus[status]} for the placement problem; run with --write-lp "
                          f"and --debug and report it")
    chosen = [int(round(x[i].value() or 0)) for i in range(len(inst.units))]
    return chosen, objective(inst, chosen)


def placement_for(inv: ModelInventory, cost: CostModel, budget_bytes: int, workload: Workload,
                  s: Settings) -> dict[str, str] | None:
    """The program's placement for one settings candidate (unit key -> "CPU" or the GPU); None when nothing fits."""
    inst = instance(cost, inv, workload, s)
    found = solve_instance(inst, usable_bytes(budget_bytes) / BYTES_PER_MIB)
    return {u.key: (cost.gpu if c else CPU) for u, c in zip(inst.units, found[0])} if found else None


def objective(inst: _Instance, chosen: list[int]) -> float:
    """The integer program's objective for a placement (the same terms, evaluated directly)."""
    t = inst.fixed_us + sum(inst.t_gpu[i] if c else inst.t_cpu[i] for i, c in enumerate(chosen))
    if inst.upload_cpu:
        prefill = inst.fixed_prefill_us + sum(inst.prefill_gpu[i] if c else inst.prefill_cpu[i]
                                              for i, c in enumerate(chosen))
        uploads = sum(inst.upload_cpu[i] for i, c in enumerate(chosen) if not c)
        t += inst.prefill_weight * max(uploads - prefill, 0.0)
    return t + inst.cross_us * crossings(chosen, start=0)


def vram_mib(inst: _Instance, chosen: list[int]) -> float:
    """VRAM of a placement (MiB) under the integer program's memory terms."""
    return sum(inst.terms.of(chosen).values()) / BYTES_PER_MIB


def ubatch_candidates(workload: Workload, candidates: tuple[int, ...] = UBATCH_CANDIDATES) -> list[int]:
    """The candidates a prompt can use: up to the power of two that holds it (at least 512)."""
    largest = max(512, 1 << (max(workload.n_prompt, 1) - 1).bit_length())
    return [ub for ub in candidates if ub <= largest]


def candidate_settings(workload: Workload, stream_slots: int = 0, segment_cells: int = 0,
                       host_types: tuple[str, str] | None = None) -> list[Settings]:
    """Every ubatch with op offload on (and, with `stream_slots`, weight streaming on as well) and off; with
    `segment_cells`, each of them with the segment KV cache as well (its host segment of `host_types`)."""
    # one logit row per ubatch: generation reads only the last prompt token's logits
    stock = [Settings(ub, offload, True, workload.n_ctx, workload.type_k, workload.type_v, n_outputs_max=1,
                      stream_slots=slots)
             for ub in ubatch_candidates(workload) for offload, slots in
             [(True, 0)] + ([(True, stream_slots)] if stream_slots else []) + [(False, 0)]]
    return stock + [dataclasses.replace(s, segment_cells=segment_cells, host_kv_types=host_types) for s in stock
                    if segment_cells]


def streaming_available(profile: Profile) -> bool:
    """Whether the build the profile measured has weight streaming (patches/0005)."""
    return STREAM_PATCH in profile.machine.llama_cpp_build


def smallest_gpu_mib(cost: CostModel, inv: ModelInventory, workload: Workload) -> float:
    """VRAM of the cheapest GPU use: op offload alone at the smallest ubatch, or one layer's KV without it."""
    best = float("inf")
    for s in candidate_settings(workload):
        inst = instance(cost, inv, workload, s)
        chosen = [0] * len(inst.units)
        if not inst.terms.offload:
            chosen[max(i for i, u in enumerate(inst.units) if u.is_attention)] = 1
        best = min(best, vram_mib(inst, chosen))
    return best


def solve(inv: ModelInventory, cost: CostModel, budget_bytes: int, workload: Workload,
          write_lp: Output | Path | None = None, segments: bool = True) -> Solution:
    """The fastest placement within `budget_bytes` of VRAM for `workload` (every candidate settings' ILP); with
    `segments`, the segment KV cache is a candidate where the build has it and the workload leaves its context
    partly unused. A segmented candidate wins only by more than CBC's gap: else the stock cache (no host segment to
    fall back on) is kept."""
    if not cost.gpu:
        raise OatoError(f"profile {cost.profile.profile_id} has no GPU; profile on the machine with the GPU "
                        f"(oatoplan profile run) to plan a GPU placement")
    started = time.perf_counter()
    budget_mib = usable_bytes(budget_bytes) / BYTES_PER_MIB
    # Candidates in the order of their LP bounds; a candidate whose bound is no better than the best placement
    # found so far cannot win and is not solved. Placements compare by their predicted time: the same as the program's
    # objective without streaming, and never below it with (the program prices ideal overlap), so a bound still
    # bounds what a candidate can reach
    bounded = []
    segment_cells = segment_cells_for(workload) if segments and segments_available(cost.profile, workload) else 0
    host_types = host_types_for(cost, inv.hparams, candidate_settings(workload)[0])
    for s in candidate_settings(workload, STREAM_SLOTS if streaming_available(cost.profile) else 0, segment_cells,
                                host_types):
        inst = instance(cost, inv, workload, s)
        problem = build_problem(inst, budget_mib)
        bound = lower_bound(problem)
        if bound is not None:
            bounded.append((bound, s.n_ubatch, not s.op_offload, -s.stream_slots, s, inst, problem))
    results = []
    for bound, _, _, _, s, inst, problem in sorted(bounded, key=lambda b: b[:4]):
        # (each cache kind against its own: the plan's note compares the best of both)
        rivals = [r[0] for r in results if bool(r[1].segment_cells) == bool(s.segment_cells)]
        if rivals and bound >= min(rivals) * (1 - GAP_REL):
            log.debug("ubatch %d op_offload %s: bound %.1f ms, skipped", s.n_ubatch, s.op_offload, bound / 1e3)
            continue
        start = _greedy_start(inst, budget_mib)
        found = solve_instance(inst, budget_mib, start=start if vram_mib(inst, start) <= budget_mib else None,
                               problem=problem)
        if found:
            devices = {u.key: (cost.gpu if c else CPU) for u, c in zip(inst.units, found[0])}
            p = predict(cost, inv, devices, workload, s)
            results.append((combine(p.prefill_s, p.decode_s_per_token, workload) * 1e6, s, inst, found[0], p))
            log.debug("ubatch %d op_offload %s stream slots %d: %.1f ms", s.n_ubatch, s.op_offload, s.stream_slots,
                      results[-1][0] / 1e3)
    if not results:
        need = budget_for(smallest_gpu_mib(cost, inv, workload) * BYTES_PER_MIB)
        raise PlanInfeasibleError(f"a VRAM budget of {format_bytes(budget_bytes)} holds no GPU placement of "
                                  f"{inv.identity.file_name}; the smallest needs {format_bytes(need)} (use --vram "
                                  f"{-(-int(need) // BYTES_PER_MIB)}MiB or more), or run it all on the CPU")
    def preference(r):      # the fastest; among equals the smaller ubatch, op offload on, more slots
        return r[0], r[1].n_ubatch, not r[1].op_offload, -r[1].stream_slots
    best_us, s, inst, chosen, prediction = min(results, key=preference)
    stock = [r for r in results if not r[1].segment_cells]
    if s.segment_cells and stock and min(r[0] for r in stock) <= best_us * (1 + GAP_REL):
        best_us, s, inst, chosen, prediction = min(stock, key=preference)
    if write_lp:
        write_lp_file(build_problem(inst, budget_mib)[0], write_lp)
    devices = {u.key: (cost.gpu if c else CPU) for u, c in zip(inst.units, chosen)}
    return Solution(devices, s, prediction, best_us, time.perf_counter() - started,
                    tuple((r[1], r[0]) for r in results))


@dataclass(frozen=True)
class CpuSolution:
    settings: Settings
    prediction: Prediction
    candidates: tuple[tuple[Settings, Prediction], ...]   # every ubatch candidate and its prediction
    unmeasured: tuple[int, ...]    # ubatch candidates left out: beyond the CPU batch sizes the profile timed


def solve_cpu(inv: ModelInventory, cost: CostModel, workload: Workload) -> CpuSolution:
    """The settings of a run all on the CPU: the ubatch with the shortest predicted prefill (ubatch changes nothing
    else; ties go to the larger one, which serves longer prompts), mmap on (nothing to pin for), op offload off, one
    logit row per ubatch. `cost` must model no GPU (cost.gpu None). Ubatches beyond the largest CPU batch the profile
    timed are left out: their time would be extrapolated, not measured."""
    if cost.gpu:
        raise ValueError("solve_cpu needs a cost model without a GPU (cost.cpu_cost_model)")
    timed = max((o.n_tokens for o in cost.profile.ops if o.device == CPU and o.op == "MUL_MAT"), default=512)
    wanted = ubatch_candidates(workload, CPU_UBATCH_CANDIDATES)
    settings = [Settings(ub, False, False, workload.n_ctx, workload.type_k, workload.type_v, n_outputs_max=1)
                for ub in wanted if ub <= max(timed, wanted[0])]
    all_cpu = {u.key: CPU for u in model_units(inv)}
    candidates = tuple((s, predict(cost, inv, all_cpu, workload, s)) for s in settings)
    best = min(candidates, key=lambda c: (c[1].prefill_s, -c[0].n_ubatch))
    return CpuSolution(best[0], best[1], candidates, tuple(ub for ub in wanted if ub > max(timed, wanted[0])))


def greedy(inv: ModelInventory, cost: CostModel, budget_bytes: int, workload: Workload, s: Settings) -> dict[str, str]:
    """Units by time saved per MiB, best first, while they fit the budget rule (KV layers from the last one back)."""
    inst = instance(cost, inv, workload, s)
    chosen = _greedy_start(inst, usable_bytes(budget_bytes) / BYTES_PER_MIB)
    return {u.key: (cost.gpu if c else CPU) for u, c in zip(inst.units, chosen)}


def _greedy_start(inst: _Instance, budget_mib: float) -> list[int]:
    chosen = [0] * len(inst.units)
    order = sorted(range(len(inst.units)),
                   key=lambda i: -(inst.t_cpu[i] - inst.t_gpu[i]) / max(inst.size_mib[i], 1e-3))
    attn = [i for i, u in enumerate(inst.units) if u.is_attention]
    changed = True
    while changed:
        changed = False
        for i in order:
            if chosen[i] or inst.t_cpu[i] <= inst.t_gpu[i]:
                continue
            if inst.units[i].is_attention and attn.index(i) + 1 < len(attn) and not chosen[attn[attn.index(i) + 1]]:
                continue
            chosen[i] = 1
            if vram_mib(inst, chosen) > budget_mib:
                chosen[i] = 0
            else:
                changed = True
    return chosen


def explain(inv: ModelInventory, cost: CostModel, solution: Solution, workload: Workload) -> list[str]:
    """Why each group of units is where it is: per role, which layers are on the GPU and the time each MiB there
    saves (the solver fills the budget with the largest savings per MiB, corrected for crossings)."""
    inst = instance(cost, inv, workload, solution.settings)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(inst.units):
        groups[role(u)].append(i)
    lines = []
    for name, idx in groups.items():
        on_gpu = [inst.units[i].layer for i in idx if solution.devices[inst.units[i].key] != CPU]
        saving = sum(inst.t_cpu[i] - inst.t_gpu[i] for i in idx) / max(sum(inst.size_mib[i] for i in idx), 1e-3)
        where = ("GPU" if len(on_gpu) == len(idx) else "CPU" if not on_gpu else
                 f"GPU for layers {_ranges([x for x in on_gpu if x is not None])}, CPU otherwise")
        what = "KV cache + attention" if name == "attn" else name
        lines.append(f"{what}: {where}; the GPU saves {saving / 1e3:.3f} ms of {workload.objective} time per MiB")
    return lines


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for x in sorted(layers):
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
