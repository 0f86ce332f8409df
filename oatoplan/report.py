"""What the CLI shows, built as data: bench results llama-bench style (one column list, several printers: markdown,
rich table, JSON, PNG), and the views of an inventory, a profile, a plan, a load's memory and a diagnosis as rich
renderables. The library builds them; cli.py prints them.
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from .bench import ALL_GPU_ARM, SEGMENTS_OFF_ARM, STREAM_OFF_ARM
from .bench_split import over_budget
from .cost import CostModel
from .files import Output, write_file
from .ggml import row_bytes
from .graph import CPU
from .inventory import kv_bytes_per_token
from .measure import stats
from .plan import llama_server_command, stream_env
from .segments import segment_env
from .schema import BenchArm, BenchResult, Diagnosis, MemoryReport, ModelInventory, Plan, Profile
from .units import BYTES_PER_MIB, format_bytes, format_flops, mib

# ---------------------------------------------------------------------------------------------------------------
# Bench results


@dataclass(frozen=True)
class Row:
    """One arm's numbers, as the columns read them."""
    arm: BenchArm
    pp: tuple[float, float]        # prefill tokens/s: mean, stdev
    tg: tuple[float, float]        # decode tokens/s
    total_s: float                 # n_prompt / pp + n_gen / tg
    bound: float | None            # decode bound, tokens/s
    pp_share: float | None = None  # mean prefill tokens/s over the all-GPU reference arm's in the same run


@dataclass(frozen=True)
class Column:
    name: str                      # "{pp}" and "{tg}" stand for the workload's tests, e.g. pp512 and tg128
    get: Callable[[Row], object]   # None: no value
    fmt: str                       # str.format of the value (a tuple is spread)
    left: bool = False
    missing: str = ""              # what an absent value shows


def _predicted(attr: str) -> Callable[[Row], object]:
    return lambda r: getattr(r.arm.prediction, attr) if r.arm.prediction else None


COLUMNS = (
    Column("arm", lambda r: r.arm.name, "{}", left=True),
    Column("flags", lambda r: r.arm.flags, "`{}`", left=True),
    Column("VRAM MiB", lambda r: r.arm.vram_bytes / BYTES_PER_MIB, "{:,.0f}"),
    Column("{pp} t/s", lambda r: r.pp, "{:,.1f} ± {:,.1f}"),
    Column("{tg} t/s", lambda r: r.tg, "{:,.2f} ± {:,.2f}"),
    Column("pp / all-GPU", lambda r: r.pp_share, "{:.0%}"),
    Column("total s", lambda r: r.total_s, "{:.2f}"),
    Column("predicted {pp}", _predicted("prefill_tokens_per_s"), "{:,.0f}", missing="n/a"),
    Column("predicted {tg}", _predicted("decode_tokens_per_s"), "{:,.1f}", missing="n/a"),
)
BOUND = Column("tg / bound", lambda r: (r.tg[0] / r.bound, r.bound) if r.bound else None, "{:.0%} of {:.1f}")


def _streamed(r: Row) -> tuple[float, int] | None:
    """(MiB, weights) streamed per timed repetition."""
    n = len(r.arm.prefill_tokens_per_s)
    return (r.arm.stream_stats[1] / n / BYTES_PER_MIB, r.arm.stream_stats[0] // n) if r.arm.stream_stats and n \
        else None


# shown when the build streams weights (BenchArm.stream_stats recorded)
STREAMED = Column("streamed / rep", _streamed, "{:,.0f} MiB in {:,}", missing="n/a")


def _per_device(r: Row) -> str:
    """What llama.cpp allocated on each accelerator / the arm's budget there (MiB), "OVER" past it."""
    budgets, over = r.arm.plan.budgets_bytes, over_budget(r.arm)
    devices = list(budgets) or [d for d in r.arm.allocated_bytes if d != CPU]
    return ", ".join(f"{d} {r.arm.allocated_bytes.get(d, 0) / BYTES_PER_MIB:,.0f}"
                     + (f" / {budgets[d] / BYTES_PER_MIB:,.0f}" if d in budgets else "")
                     + (" OVER" if d in over else "") for d in devices)


# shown for benches over several devices (arms with per-device budgets)
PER_DEVICE = Column("allocated / budget MiB", _per_device, "{}", left=True)


def rows(result: BenchResult, bounds: dict[str, float] | None = None) -> list[Row]:
    w = result.workload
    base = next((stats(a.prefill_tokens_per_s)[0] for a in result.arms if a.reference and a.name == ALL_GPU_ARM), 0)
    out = []
    for arm in result.arms:
        pp, tg = stats(arm.prefill_tokens_per_s), stats(arm.decode_tokens_per_s)
        total = w.n_prompt / pp[0] + (w.n_gen / tg[0] if tg[0] else 0.0)
        out.append(Row(arm, pp, tg, total, (bounds or {}).get(arm.name), pp[0] / base if base else None))
    return out


def _columns(result: BenchResult, bounds: dict[str, float] | None) -> tuple[Column, ...]:
    return COLUMNS + ((BOUND,) if bounds else ()) + ((STREAMED,) if any(a.stream_stats for a in result.arms) else ()) \
        + ((PER_DEVICE,) if any(a.plan.budgets_bytes for a in result.arms) else ())


def _tests(result: BenchResult) -> dict[str, str]:
    """llama-bench's names of the two tests: pp512, tg128 (@ d4096 with a context depth)."""
    w = result.workload
    return {"pp": f"pp{w.n_prompt}", "tg": f"tg{w.n_gen}" + (f" @ d{w.n_depth}" if w.n_depth else "")}


def _header(column: Column, result: BenchResult) -> str:
    return column.name.format(**_tests(result))


def _cell(column: Column, row: Row, markdown: bool = True) -> str:
    value = column.get(row)
    if value is None:
        return column.missing
    fmt = column.fmt if markdown else column.fmt.strip("`")
    return fmt.format(*value) if isinstance(value, tuple) else fmt.format(value)


def summary(result: BenchResult) -> str | None:
    """The first arm (the plan) against the best other arm that is no reference, per test and in total time; then
    against the reference arms: streaming on / off, and prefill as a share of all on the GPU."""
    first, *others = rows(result)
    rivals = [r for r in others if not r.arm.reference]
    tests = _tests(result)
    parts = []
    if rivals:
        best_pp, best_tg = max(r.pp[0] for r in rivals), max(r.tg[0] for r in rivals)
        best_total = min(r.total_s for r in rivals)
        parts.append(f"{first.arm.name} / best other arm: {tests['pp']} {first.pp[0] / best_pp:.2f}x, {tests['tg']} "
                     f"{first.tg[0] / best_tg:.2f}x, total time {first.total_s / best_total:.2f}x (lower is better)")
    off = next((r for r in others if r.arm.reference and r.arm.name == STREAM_OFF_ARM), None)
    if off:
        parts.append(f"streaming on / off: {tests['pp']} {first.pp[0] / off.pp[0]:.2f}x")
    stock = next((r for r in others if r.arm.reference and r.arm.name == SEGMENTS_OFF_ARM), None)
    if stock:
        parts.append(f"segments on / off: {tests['tg']} {first.tg[0] / stock.tg[0]:.2f}x, total time "
                     f"{first.total_s / stock.total_s:.2f}x")
    if first.pp_share is not None:
        parts.append(f"{tests['pp']} {first.pp_share:.0%} of all on the GPU")
    over = [f"{a.name} on {', '.join(over_budget(a))}" for a in result.arms if over_budget(a)]
    if over:
        parts.append(f"over budget: {'; '.join(over)}")
    return "; ".join(parts) or None


def markdown(result: BenchResult, bounds: dict[str, float] | None = None) -> str:
    """llama-bench style: one row per arm, pp and tg as avg ± stdev tokens/s, predicted beside measured; with
    `bounds` (arm -> decode bound, tokens/s) the measured decode as a share of it; then the plan / best ratios."""
    columns = _columns(result, bounds)
    lines = ["| " + " | ".join(_header(c, result) for c in columns) + " |",
             "|" + "|".join("---" if c.left else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, r) for c in columns) + " |" for r in rows(result, bounds)]
    line = summary(result)
    return "\n".join(lines + (["", line] if line else [])) + "\n"


def table(result: BenchResult, bounds: dict[str, float] | None = None) -> Table:
    """The same columns as a rich table."""
    columns = _columns(result, bounds)
    out = Table(show_edge=False, box=None)
    for c in columns:
        out.add_column(_header(c, result), justify="left" if c.left else "right")
    for r in rows(result, bounds):
        out.add_row(*(Text(_cell(c, r, markdown=False)) for c in columns))
    return out


def plot(results: list[BenchResult], out: Output | Path) -> Path:
    """Bars of measured prefill and decode tokens/s per arm (error bars: stdev), one panel per workload: the plan
    blue, the reference arms green, the rest grey; prefill bars labelled with their share of all on the GPU."""
    import matplotlib   # optional and slow to import: only for the PNG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.2 * len(results)), squeeze=False)
    for panels, result in zip(axes, results):
        names = [a.name for a in result.arms]
        colors = ["C0"] + ["C2" if a.reference else "C7" for a in result.arms[1:]]
        shares = [f"{r.pp_share:.0%}" if r.pp_share is not None else "" for r in rows(result)]
        for ax, attr, label in ((panels[0], "prefill_tokens_per_s", f"pp{result.workload.n_prompt}"),
                                (panels[1], "decode_tokens_per_s", f"tg{result.workload.n_gen}")):
            avg_sd = [stats(getattr(a, attr)) for a in result.arms]
            bars = ax.barh(names, [a for a, _ in avg_sd], xerr=[s for _, s in avg_sd], color=colors)
            if attr == "prefill_tokens_per_s" and any(shares):
                ax.bar_label(bars, shares, fontsize=7, padding=6)
                ax.margins(x=0.08)          # room for the longest bar's label
            ax.invert_yaxis()
            ax.set_xlabel(f"{label} tokens/s")
            ax.set_title(f"{label}, VRAM budget {(result.budget_bytes or 0) / 2**30:.2f} GiB", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return write_file(out, png.getvalue(), "png")


def write_bench(result: BenchResult, md: Output | Path, png: Output | Path,
                bounds: dict[str, float] | None = None) -> list[Path]:
    """The result as markdown and, when matplotlib is there, as PNG (the caller writes the JSON)."""
    written = [write_file(md, markdown(result, bounds), "markdown")]
    try:
        written.append(plot([result], png))
    except ImportError:
        pass
    return written


# ---------------------------------------------------------------------------------------------------------------
# Views


def inventory_view(inv: ModelInventory) -> list[RenderableType]:
    """Hyperparameters, then bytes and ggml types per layer (rows) and role (columns), then totals."""
    hp = inv.hparams
    kv_f16 = sum(kv_bytes_per_token(hp, layer) for layer in range(hp.n_layer))
    heads_kv = sorted(set(hp.n_head_kv))
    out: list[RenderableType] = [
        Text.assemble((inv.identity.file_name, "bold"), f"  {hp.architecture}, {hp.n_layer} layers, "
                      f"{len(inv.tensors)} tensors, {format_bytes(inv.total_bytes)} of weights "
                      f"(file {format_bytes(inv.identity.file_bytes)})"),
        Text(f"n_embd {hp.n_embd}, n_head {hp.n_head}, n_head_kv {'/'.join(map(str, heads_kv))}, "
             f"head_dim {hp.head_dim_k}, n_ff {hp.n_ff}, n_vocab {hp.n_vocab}, n_ctx_train {hp.n_ctx_train}"
             + (f", n_swa {hp.n_swa} on {len(hp.swa_layers)} layers" if hp.n_swa else "")
             + (f", {hp.n_expert} experts ({hp.n_expert_used} used)" if hp.n_expert else "")),
        Text(f"KV cache (f16): {format_bytes(kv_f16)} per token of context over all layers")]
    if inv.tied_output:
        out.append(Text(f"tied output: no output.weight; llama.cpp loads a second copy of token_embd.weight "
                        f"({format_bytes(inv.output_matrix().n_bytes)}) on the output layer's device"))
    # rows: input, blk.0..N-1, output; columns: the matrix roles present, then everything else summed
    matrix_roles = list(dict.fromkeys(t.role for t in inv.tensors if t.op in ("MUL_MAT", "MUL_MAT_ID")
                                      and t.group == "layer"))
    cells: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0, set()]))
    for t in inv.tensors:
        row = t.group if t.layer is None else f"blk.{t.layer}"
        big = t.role in matrix_roles if t.group == "layer" else t.op in ("GET_ROWS", "MUL_MAT")
        column = t.role if big and t.param == "weight" else "other"
        cells[row][column][0] += t.n_bytes
        cells[row][column][1].add(t.ggml_type)
    columns = matrix_roles + sorted({c for r in cells.values() for c in r} - set(matrix_roles) - {"other"}) + ["other"]
    by_layer = Table(show_edge=False, pad_edge=False, box=None)
    for name in ["layer"] + columns + ["total"]:
        by_layer.add_column(name, justify="left" if name == "layer" else "right", no_wrap=True)
    for row in ["input"] + [f"blk.{i}" for i in range(hp.n_layer)] + ["output"]:
        if row in cells:
            values = [f"{'/'.join(sorted(cells[row][c][1]))} {mib(cells[row][c][0]):.2f}" if c in cells[row] else ""
                      for c in columns]
            by_layer.add_row(row, *values, f"{mib(sum(v[0] for v in cells[row].values())):.2f}")
    flops = sum(t.flops_per_token for t in inv.tensors) + (2 * hp.n_embd * hp.n_vocab if inv.tied_output else 0)
    return out + [Text("per layer and role: ggml type and MiB ('other': norms, biases and the rest)"), by_layer,
                  Text(f"total {format_bytes(inv.total_bytes)}; {format_flops(flops)} per token in weight ops "
                       f"(before attention)")]


def profile_view(prof: Profile) -> list[RenderableType]:
    """The machine, the decode calibration, and per operator point the CPU and GPU times (the GPU affinity)."""
    out: list[RenderableType] = [Text.assemble(
        (prof.profile_id, "bold"), f": {prof.machine.cpu_model} ({prof.n_threads} threads), "
        f"{prof.machine.gpu_name or 'no GPU'}; crossing {prof.crossing_us:.1f} us, CPU mat-vec stream "
        f"{prof.cpu_read_bytes_per_s / 1e9:.1f} GB/s" +
        (f", plain host read {prof.host_read_bytes_per_s / 1e9:.1f} GB/s" if prof.host_read_bytes_per_s else ""))]
    if prof.decode_factors:
        out.append(Text(f"decode calibrated on {prof.calibration_model}: " + ", ".join(
            f"{c} x{f:.2f}" for c, f in prof.decode_factors.items()) +
            (f", crossing {prof.decode_crossing_us:.1f} us" if prof.decode_crossing_us else "")))
        for arm in prof.calibration:
            measured = statistics.median(arm.decode_us_per_token)
            out.append(Text(f"  {arm.name}: measured {measured / 1e3:.2f} ms/token, isolated ops "
                            f"{(sum(arm.components_us.values()) + arm.n_crossings * prof.crossing_us) / 1e3:.2f} ms, "
                            f"{arm.n_crossings} crossings"))
    cost = CostModel(prof)
    affinity = Table(show_edge=False, box=None)
    for name in ("op", "type", "shape", "tokens", "CPU us", "GPU us", "GPU+upload us", "CPU/GPU"):
        affinity.add_column(name, justify="left" if name in ("op", "type", "shape") else "right")
    gpu_points = {(o.op, o.ggml_type, o.shape, o.n_tokens): o.t_us for o in prof.ops if o.device == prof.gpu_device}
    for o in prof.ops:
        if o.device != CPU:
            continue
        t_gpu = gpu_points.get((o.op, o.ggml_type, o.shape, o.n_tokens))
        upload = ""
        if t_gpu is not None and o.op == "MUL_MAT" and prof.transfers:
            upload = f"{t_gpu + cost.transfer_us(row_bytes(o.ggml_type, o.shape[0]) * o.shape[1]):.1f}"
        affinity.add_row(o.op, o.ggml_type, "x".join(map(str, o.shape)), str(o.n_tokens), f"{o.t_us:.1f}",
                         f"{t_gpu:.1f}" if t_gpu is not None else "", upload,
                         f"{o.t_us / t_gpu:.1f}" if t_gpu else "")
    return out + [affinity]


def plan_view(p: Plan, path: Path) -> list[RenderableType]:
    """The plan's budget and workload, why it placed what where, its VRAM, its predicted speed beside the
    baselines', and the llama-cpp-python call it amounts to."""
    pred, w = p.prediction, p.workload
    where = f"VRAM budget {format_bytes(p.budget_bytes or 0)}" if p.gpu_devices else "all on the CPU"
    out: list[RenderableType] = [Text.assemble(
        ("plan", "bold"), f" for {p.model.file_name}, {where}, "
        f"workload pp{w.n_prompt} tg{w.n_gen} depth {w.n_depth}{f' ctx {w.n_ctx_asked}' if w.n_ctx_asked else ''}, "
        f"objective {w.objective}")]
    out += [Text(f"  {note}") for note in p.notes]
    if p.gpu_devices:
        out.append(Text("VRAM: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in pred.gpu_bytes.items())
                        + f" = {format_bytes(sum(pred.gpu_bytes.values()))}"))
    arms = Table(show_edge=False, box=None)
    for name in ("arm", "flags", "VRAM", "TTFT s", "pp t/s", "tg t/s", "total s"):
        arms.add_column(name, justify="left" if name in ("arm", "flags") else "right")
    for name, flags, q, note in [("this plan", p.flags, pred, "")] + [(b.name, b.flags, b.prediction, b.note)
                                                                       for b in p.baselines]:
        if q is None:
            arms.add_row(Text(name), Text(flags), Text(note or "does not fit"), "", "", "", "")
            continue
        arms.add_row(Text(name), Text(flags), format_bytes(sum(q.gpu_bytes.values())), f"{q.prefill_s:.3f}",
                     f"{q.prefill_tokens_per_s:,.0f}", f"{q.decode_tokens_per_s:.1f}", f"{q.total_s:.2f}")
    return out + [Text("predicted:"), arms, Text(
        f"llama-cpp-python: oatoplan.load(model, '{path}') = Llama(model, n_gpu_layers={p.n_gpu_layers}, "
        f"n_ctx={p.n_ctx}, n_batch={p.n_batch}, n_ubatch={p.n_ubatch}, use_mmap={p.use_mmap}, "
        f"op_offload={p.op_offload}, flash_attn={p.flash_attn}, type_k={p.type_k!r}, type_v={p.type_v!r}, "
        f"n_threads={p.n_threads}, n_threads_batch={p.n_threads})"
        + (" with the -ot overrides above" if p.tensor_overrides else "")
        + (f" and n_outputs_max={p.n_outputs_max}" if p.n_outputs_max else "")
        + ", in the environment " + " ".join(f"{k}={v}" for k, v in {**stream_env(p),
                                                                      **segment_env(p.kv_segments)}.items())),
        Text(f"llama-server: {llama_server_command(p, p.model.file_name)}")]


def memory_view(report: MemoryReport) -> list[RenderableType]:
    """What llama.cpp allocated per buffer, and each predicted (kind, device) against it."""
    buffers = Table(title="llama.cpp buffers", show_edge=False, box=None)
    for name in ("kind", "buffer type", "device", "MiB"):
        buffers.add_column(name, justify="right" if name == "MiB" else "left")
    for a in report.allocations:
        buffers.add_row(a.kind, a.buffer_type, a.device, f"{mib(a.n_bytes):.2f}")
    checks = Table(title="plan vs allocated", show_edge=False, box=None)
    for name in ("kind", "device", "predicted MiB", "allocated MiB", "ok"):
        checks.add_column(name, justify="left" if name in ("kind", "device") else "right")
    for c in report.checks:
        checks.add_row(c.kind, c.device, f"{mib(c.predicted_bytes):.2f}", f"{mib(c.allocated_bytes):.2f}",
                       "yes" if c.ok else "NO")
    return [buffers, checks]


def diagnosis_view(diagnosis: Diagnosis) -> Table:
    out = Table(show_edge=False, box=None)
    for name in ("check", "", "found", "to do"):
        out.add_column(name)
    for c in diagnosis.checks:
        out.add_row(Text(c.name), "ok" if c.ok else "--", Text(c.detail), Text("" if c.ok else c.fix))
    return out
