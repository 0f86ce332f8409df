"""Weight streaming's decisions beyond the integer program (solve.py), for a solution that streams: which layers'
weights stay in host memory, and how many staging slots.

The integer program prices streaming as ideal overlap: uploads and compute add up to the larger of the two. Real
overlap needs the copy stream to be ahead of the compute stream, and it can only be ahead by as many weights as
there are slots. A block whose weights stream uploads for longer than it computes (an FFN matrix at 512 tokens
takes about twice as long over PCIe as on the GPU), so host blocks in a row fall behind, and the GPU-resident blocks
that follow them leave the copy stream idle. With the host blocks spread evenly over the model, each GPU-resident
block gives the copy stream time to catch up. Which layers of a role are on the host changes no other term the
program prices (each role's units differ only by their weight types), so the plan takes the spread placement when
the cost model's prediction (cost.stream_prefill_us simulates the slots) says it is faster, and then the number of
slots that is fastest within the budget. Both the program and the prediction charge every streamed host tensor the
profile's fixed cost per upload (cost.CostModel.stream_split_us), so a norm or a bias on the host, which saves almost
no VRAM, stays there only where that pays (in decode crossings, say).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from .cost import CostModel, combine, predict
from .graph import CPU, model_units, role
from .memory import fits, gpu_overhead_bytes
from .schema import ModelInventory, Workload
from .units import format_bytes
from .solve import Solution

# Staging slots tried for a streaming solution. At least 3: with 2 the copy stream is at most one weight ahead, and
# the two 2-slot plans measured in benches fell 12-15% short of stream_prefill_us's simulation (single-arm runs of 2
# to 6 slots came within 3%: benchmarks/results/2026-12-01-h200-stream-sweep-qwen2-7b.jsonl,
# 2026-12-01-h200-bench-pp2048-stream-{2.5,1.4}GiB.json).
STREAM_SLOT_CANDIDATES = (3, 4, 6, 8)


def spread(inv: ModelInventory, devices: dict[str, str]) -> dict[str, str]:
    """The same number of host units per role, at evenly spaced layers (KV caches and attention keep their
    n_gpu_layers suffix)."""
    by_role: dict[str, list[str]] = defaultdict(list)
    for u in model_units(inv):
        if u.layer is not None and not u.is_attention:
            by_role[role(u)].append(u.key)
    out = dict(devices)
    for keys in by_role.values():
        gpu = next((devices[k] for k in keys if devices[k] != CPU), None)
        n_host = sum(devices[k] == CPU for k in keys)
        if gpu is None or n_host == 0:
            continue
        host = {min(len(keys) - 1, int((i + 0.5) * len(keys) / n_host)) for i in range(n_host)}
        for j, key in enumerate(keys):
            out[key] = CPU if j in host else gpu
    return out


def refine(inv: ModelInventory, cost: CostModel, solution: Solution, budget_bytes: int,
           workload: Workload, others: tuple[dict[str, str], ...] = ()) -> Solution:
    """The fastest predicted of (the program's placement, its spread, `others` and theirs) x STREAM_SLOT_CANDIDATES
    that keeps to the budget rule, at the solution's other settings; the solution unchanged when it does not
    stream."""
    if not solution.settings.stream_slots:
        return solution
    units = model_units(inv)
    overhead = gpu_overhead_bytes(cost.profile)
    best = (combine(solution.prediction.prefill_s, solution.prediction.decode_s_per_token, workload), solution)
    for devices in [d for placement in (solution.devices, *others) for d in (placement, spread(inv, placement))]:
        for slots in STREAM_SLOT_CANDIDATES:
            s = dataclasses.replace(solution.settings, stream_slots=slots)
            if not fits(inv, units, devices, s, budget_bytes, overhead):
                continue
            p = predict(cost, inv, devices, workload, s)
            t = combine(p.prefill_s, p.decode_s_per_token, workload)
            if t < best[0] * (1 - 1e-9):
                best = (t, dataclasses.replace(solution, devices=devices, settings=s, prediction=p))
    return best[1]


def stream_note(inv: ModelInventory, cost: CostModel, solution, workload: Workload) -> tuple[str, ...]:
    """What weight streaming does for the plan, with the same placement's prediction without it."""
    s, p = solution.settings, solution.prediction
    if not s.stream_slots or not p.gpu_bytes.get("stream"):
        return ()
    off = predict(cost, inv, solution.devices, workload, dataclasses.replace(s, stream_slots=0))
    unmeasured = () if cost.profile.stream_split is not None else (
        f"profile {cost.profile.profile_id} did not measure the fixed cost of a streamed upload (`oatoplan profile "
        f"run --model` on a build with weight streaming does): the prediction leaves it out, and prefill with many "
        f"host tensors is slower than predicted",)
    return (f"weight streaming: host weights upload on a second stream into {s.stream_slots} slots "
            f"({format_bytes(p.gpu_bytes['stream'])} of VRAM) while the GPU computes: prefill "
            f"{p.prefill_tokens_per_s:,.0f} tokens/s predicted, {off.prefill_tokens_per_s:,.0f} without "
            f"(OATO_STREAM=0)",) + unmeasured
