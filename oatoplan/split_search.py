"""Stage 3b's search over layer splits: the several-device program (split.py) solved split by split.

The program's relaxation shares a layer between devices, which leaves CBC a large tree when it branches on the split.
With the layer counts per device fixed, the relaxation is within a few percent and solves in milliseconds, and the
integer program is K one-device programs (coupled by op offload's copy only). So a pattern search over layer counts
runs on relaxations (from llama.cpp's best split, steps n_layer/8 ... 1); the integer program is then solved at the
splits whose relaxation beats the best placement found, best bound first, at most SPLIT_MAX_SOLVES of them. CBC runs
with one thread and a node limit, never a time limit: the same inputs give the same plan.
"""

from __future__ import annotations

import logging

import pulp

from .errors import SolverError
from .graph import CPU, Unit

log = logging.getLogger(__name__)

SPLIT_GAP_REL = 5e-3
SPLIT_MAX_NODES = 200
SPLIT_MAX_SOLVES = 3
INFEASIBLE = float("inf")


def fix_split(split: dict, counts: tuple[int, ...], n_layer: int) -> None:
    """Fix the program's split[layer, k] variables (layer on one of devices[k:]) to `counts` KV layers per device:
    the last layers, devices in order."""
    for (il, k), var in split.items():
        var.lowBound = var.upBound = int(il >= n_layer - sum(counts[k:]))


def split_neighbours(counts: tuple[int, ...], step: int, n_layer: int) -> list[tuple[int, ...]]:
    """Splits one move away: a device takes `step` layers from, or gives them to, the CPU or its next device."""
    out = []
    for k in range(len(counts)):
        for delta in (step, -step):
            moved = list(counts)
            moved[k] += delta
            out.append(tuple(moved))
            if k + 1 < len(counts):
                moved[k + 1] -= delta
                out.append(tuple(moved))
    return [c for c in out if min(c) >= 0 and sum(c) <= n_layer]


def search_split(evaluate, start: tuple[int, ...], n_layer: int) -> tuple[int, ...]:
    """Pattern search over layer counts: from `start`, move to the best neighbour while it is better, with steps
    n_layer/8, ..., 2, 1. evaluate(counts) -> a time (INFEASIBLE where nothing fits); neighbours in a fixed order."""
    best, best_t = start, evaluate(start)
    step = max(1, n_layer // 8)
    while step >= 1:
        while True:
            t, counts = min(((evaluate(c), c) for c in split_neighbours(best, step, n_layer)),
                            default=(INFEASIBLE, best))
            if t >= best_t * (1 - 1e-9):
                break
            best, best_t = counts, t
        step //= 2
    return best


def _solve(prob: pulp.LpProblem, mip: bool) -> float:
    solver = pulp.PULP_CBC_CMD(msg=False, threads=1, mip=mip, gapRel=SPLIT_GAP_REL,
                               options=[f"maxNodes {SPLIT_MAX_NODES}"] if mip else [])
    status = pulp.LpStatus[prob.solve(solver)]
    if status == "Infeasible":
        return INFEASIBLE
    if status != "Optimal":
        raise SolverError(f"CBC returned {status} for the several-device placement; run with --debug and report it")
    return pulp.value(prob.objective)


def best_split(prob: pulp.LpProblem, w: dict, split: dict, units: list[Unit], devices: list[str],
               start: tuple[int, ...], label: str) -> tuple[tuple[int, ...], dict[str, str]] | None:
    """The best (layer counts, placement) of split.py's program `prob` (w[i, d]: unit i on device d; split: its
    split variables), searched from the layer counts `start`; None when no split fits."""
    n_layer = 1 + max(il for il, _ in split)
    bounds: dict[tuple[int, ...], float] = {}

    def relaxed(counts: tuple[int, ...]) -> float:
        if counts not in bounds:
            fix_split(split, counts, n_layer)
            bounds[counts] = _solve(prob, mip=False)
        return bounds[counts]

    search_split(relaxed, start, n_layer)
    found, n_solved = None, 0          # found: (objective us, counts, placement)
    for counts in sorted((c for c in bounds if bounds[c] < INFEASIBLE), key=lambda c: (bounds[c], c)):
        if found and bounds[counts] >= found[0] * (1 - SPLIT_GAP_REL):
            break
        if n_solved == SPLIT_MAX_SOLVES:
            log.info("%s: stopped after %d integer programs; the best split is not proven", label, n_solved)
            break
        fix_split(split, counts, n_layer)
        objective, n_solved = _solve(prob, mip=True), n_solved + 1
        if objective < (found[0] if found else INFEASIBLE):
            placement = {u.key: next((d for d in devices if (w[i, d].value() or 0) > 0.5), CPU)
                         for i, u in enumerate(units)}
            found = (objective, counts, placement)
    log.info("%s: %d splits relaxed, %d solved", label, len(bounds), n_solved)
    return found[1:] if found else None
