"""Stage 6: measure a plan against llama.cpp's own choices at the same VRAM budget. Entry point:
`run_bench(model, plan, arms, workload, reps)` -> BenchResult.

Like llama-bench: prefill is one timed pass over n_prompt random tokens (in n_batch chunks), decode is n_gen timed
single-token steps after it; logits only for the last token; the KV cache is cleared between repetitions. Every arm
is loaded once; when they fit together in VRAM the repetitions are interleaved (A B A B ...), so that a drift in the
machine (clocks, page cache) hits every arm alike.
"""

from __future__ import annotations

import datetime
import io
import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .cost import CostModel, Settings, model_units, predict
from .files import Output, write_file
from .inventory import read_inventory
from .plan import llama_cpp_flags, make_plan, tensor_placement
from .schema import (SCHEMA_VERSION, BenchArm, BenchResult, ModelInventory, Plan, Prediction, Profile, Workload)
from .solve import baseline_arms

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    arm: BenchArm
    llm: object
    vram_bytes: int


def arm_plans(inv: ModelInventory, plan: Plan, profile: Profile) -> list[tuple[str, Plan, Prediction | None]]:
    """The plan and the baselines at its budget, as Plans the loader applies, with their predictions."""
    cost = CostModel(profile)
    workload = plan.workload or Workload()
    arms = [("oatoplan plan", plan, plan.prediction)]
    for name, unit_devices, s, _ in baseline_arms(inv, cost.gpu, plan.budget_bytes or 0, workload):
        if unit_devices is None:
            log.warning("baseline %r does not fit the budget; left out", name)
            continue
        arms.append((name, plan_for(inv, unit_devices, s, profile, cost.gpu), predict(cost, inv, unit_devices,
                                                                                      workload, s)))
    return arms


def validation_arms(inv: ModelInventory, profile: Profile, workload: Workload
                    ) -> list[tuple[str, Plan, Prediction | None]]:
    """Three placements that stress different parts of the cost model (`oatoplan profile --validate`): all on the
    GPU; layer offload of half the layers; every layer's attention on the GPU with the first half's FFN on the CPU.
    Pinned host memory, op offload, ubatch 512 (2048 for longer prompts)."""
    from .solve import layer_offload, n_cpu_ffn
    cost = CostModel(profile)
    gpu, half = cost.gpu, inv.hparams.n_layer // 2
    s = Settings(512 if workload.n_prompt <= 512 else 2048, True, True, workload.n_ctx)
    arms = []
    for name, unit_devices in (("all on GPU", {u.key: gpu for u in model_units(inv)}),
                               (f"layer offload -ngl {half + 1}", layer_offload(inv, gpu, half + 1)),
                               (f"attention on GPU, FFN of layers 0-{half - 1} on CPU", n_cpu_ffn(inv, gpu, half))):
        plan = replace(plan_for(inv, unit_devices, s, profile, gpu), workload=workload)
        arms.append((name, plan, predict(cost, inv, unit_devices, workload, s)))
    return arms


def plan_for(inv: ModelInventory, unit_devices: dict[str, str], s: Settings, profile: Profile, gpu: str) -> Plan:
    """A loader Plan for a per-unit placement and settings (mmap on when `s.pinned` is off)."""
    from .cost import gpu_memory
    devices, n_gpu_layers = tensor_placement(inv, unit_devices)
    compute = gpu_memory(inv, model_units(inv), unit_devices, s)["compute"]
    plan = make_plan(inv, devices, n_gpu_layers=n_gpu_layers, gpu_devices=(gpu,), n_ctx=s.n_ctx,
                     n_batch=s.n_ubatch, n_ubatch=s.n_ubatch, use_mmap=not s.pinned, op_offload=s.op_offload,
                     n_outputs_max=s.n_outputs_max,
                     n_threads=profile.n_threads, llama_cpp_build=profile.machine.llama_cpp_build,
                     profile_id=profile.profile_id, compute_bytes={gpu: compute})
    return replace(plan, placement=dict(unit_devices), flags=llama_cpp_flags(plan))


def _gpu_used_bytes(device: str) -> int:
    d = next(d for d in _devices() if d.name == device)
    return d.total_bytes - d.free_bytes


def _decode(llm, tokens: list[int]) -> None:
    import llama_cpp
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    rc = llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(array, len(tokens)))
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    llama_cpp.llama_synchronize(llm._ctx.ctx)


def measure_once(llm, plan: Plan, workload: Workload, rng: np.random.Generator) -> tuple[float, float]:
    """(prefill seconds for n_prompt tokens, decode seconds for n_gen tokens) of one repetition."""
    import llama_cpp
    n_vocab = llm.n_vocab()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    for start in range(0, workload.n_depth, plan.n_batch):          # context already in the cache, untimed
        _decode(llm, rng.integers(0, n_vocab, min(plan.n_batch, workload.n_depth - start)).tolist())
    prompt = rng.integers(0, n_vocab, workload.n_prompt).tolist()
    t0 = time.perf_counter()
    for start in range(0, len(prompt), plan.n_batch):
        _decode(llm, prompt[start:start + plan.n_batch])
    prefill_s = time.perf_counter() - t0
    token = int(rng.integers(0, n_vocab))
    t0 = time.perf_counter()
    for _ in range(workload.n_gen):
        _decode(llm, [token])
    return prefill_s, time.perf_counter() - t0


def run_bench(model: str | Path, arms: list[tuple[str, Plan, Prediction | None]], workload: Workload, reps: int = 3,
              progress: Callable[[str, int, int], None] | None = None) -> BenchResult:
    """Measure every arm `reps` times (after one warm-up), interleaved when all arms fit in VRAM together."""
    from .load import load
    from .profile import machine_identity
    inv = read_inventory(model)
    gpu = next((p.gpu_devices[0] for _, p, _ in arms if p.gpu_devices), None)
    free = next((d.free_bytes for d in _devices() if d.name == gpu), 0) if gpu else 0
    together = sum((p.budget_bytes or _predicted_vram(pr)) for _, p, pr in arms) < 0.9 * free
    rng = np.random.default_rng(0)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in arms}
    loaded: dict[str, _Loaded] = {}
    done, total = 0, len(arms) * (reps + 1)

    def open_arm(name: str, plan: Plan, prediction) -> _Loaded:
        before = _gpu_used_bytes(gpu) if gpu else 0
        llm = load(model, plan)
        measure_once(llm, plan, replace(workload, n_gen=min(workload.n_gen, 8)), rng)     # warm-up
        vram = (_gpu_used_bytes(gpu) - before) if gpu else 0
        allocated: dict[str, int] = {}
        for a in llm.oatoplan_memory.allocations:
            allocated[a.device] = allocated.get(a.device, 0) + a.n_bytes
        arm = BenchArm(name, plan.flags or llama_cpp_flags(plan), plan, prediction, vram, (), (), allocated)
        return _Loaded(arm, llm, vram)

    def step(name: str) -> None:
        nonlocal done
        item = loaded[name]
        samples[name].append(measure_once(item.llm, item.arm.plan, workload, rng))
        done += 1
        if progress:
            progress(name, done, total)

    if together:
        for name, plan, prediction in arms:
            loaded[name] = open_arm(name, plan, prediction)
            done += 1
        for _ in range(reps):
            for name, _, _ in arms:
                step(name)
    else:
        for name, plan, prediction in arms:
            loaded[name] = open_arm(name, plan, prediction)
            done += 1
            for _ in range(reps):
                step(name)
            loaded[name].llm.close()
    results = []
    for name, _, _ in arms:
        item = loaded[name]
        prefill = tuple(round(workload.n_prompt / p, 3) for p, _ in samples[name])
        decode = tuple(round(workload.n_gen / d, 3) for _, d in samples[name]) if workload.n_gen else ()
        results.append(replace(item.arm, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode))
        if together:
            item.llm.close()
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return BenchResult(SCHEMA_VERSION, created, machine_identity(gpu),
                       inv.identity, workload, arms[0][1].budget_bytes, reps,
                       "interleaved" if together else "sequential", tuple(results))


def _devices():
    from .load import devices
    return devices()


def _predicted_vram(prediction: Prediction | None) -> int:
    return sum(prediction.gpu_bytes.values()) if prediction else 0


def stats(values: tuple[float, ...]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def decode_bounds(inv: ModelInventory, profile: Profile, result: BenchResult) -> dict[str, float]:
    """Each arm's decode bound (tokens/s) under `profile`: host bytes at the CPU's streaming rate + GPU time."""
    from .cost import decode_bound_tokens_per_s
    cost = CostModel(profile)
    return {a.name: decode_bound_tokens_per_s(cost, inv, a.plan.placement) for a in result.arms if a.plan.placement}


def markdown(result: BenchResult, bounds: dict[str, float] | None = None) -> str:
    """llama-bench style: one row per arm, pp and tg as avg ± stdev tokens/s, predicted beside measured; with
    `bounds` (arm -> decode bound, tokens/s) the measured decode as a share of it; then the plan / best ratios."""
    w = result.workload
    pp, tg = f"pp{w.n_prompt}", f"tg{w.n_gen}" + (f" @ d{w.n_depth}" if w.n_depth else "")
    lines = [f"| arm | flags | VRAM MiB | {pp} t/s | {tg} t/s | total s | predicted {pp} | predicted {tg} |"
             + (" tg / bound |" if bounds else ""), "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if bounds else "")]
    totals = {}
    for arm in result.arms:
        (p_avg, p_sd), (t_avg, t_sd) = stats(arm.prefill_tokens_per_s), stats(arm.decode_tokens_per_s)
        totals[arm.name] = (p_avg, t_avg, w.n_prompt / p_avg + (w.n_gen / t_avg if t_avg else 0.0))
        pred = arm.prediction
        predicted = f"{pred.prefill_tokens_per_s:,.0f} | {pred.decode_tokens_per_s:,.1f}" if pred else "n/a | n/a"
        share = f" {t_avg / bounds[arm.name]:.0%} of {bounds[arm.name]:.1f} |" if bounds and arm.name in bounds else \
            (" |" if bounds else "")
        lines.append(f"| {arm.name} | `{arm.flags}` | {arm.vram_bytes / 2**20:,.0f} | {p_avg:,.1f} ± {p_sd:,.1f} | "
                     f"{t_avg:,.2f} ± {t_sd:,.2f} | {totals[arm.name][2]:.2f} | {predicted} |{share}")
    first, *others = result.arms
    if others:
        best_pp = max(totals[a.name][0] for a in others)
        best_tg = max(totals[a.name][1] for a in others)
        best_total = min(totals[a.name][2] for a in others)
        p, t, total = totals[first.name]
        lines.append("")
        lines.append(f"{first.name} / best other arm: {pp} {p / best_pp:.2f}x, {tg} {t / best_tg:.2f}x, "
                     f"total time {total / best_total:.2f}x (lower is better)")
    return "\n".join(lines) + "\n"


def plot(results: list[BenchResult], out: Output | Path) -> Path:
    """Bars of measured prefill and decode tokens/s per arm (error bars: stdev), one panel per workload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.2 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        names = [a.name for a in result.arms]
        for ax, attr, label in ((row[0], "prefill_tokens_per_s", f"pp{result.workload.n_prompt}"),
                                (row[1], "decode_tokens_per_s", f"tg{result.workload.n_gen}")):
            avg_sd = [stats(getattr(a, attr)) for a in result.arms]
            ax.barh(names, [a for a, _ in avg_sd], xerr=[s for _, s in avg_sd], color=["C0"] + ["C7"] * len(names))
            ax.invert_yaxis()
            ax.set_xlabel(f"{label} tokens/s")
            ax.set_title(f"{label}, VRAM budget {(result.budget_bytes or 0) / 2**30:.2f} GiB", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return write_file(out, png.getvalue(), "png")
