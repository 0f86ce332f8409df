"""The `oatoplan` command: parses arguments, calls one library entry point, prints, exits. No logic lives here.

Errors a user can fix (OatoError) print one line to stderr and exit 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .bench import decode_bounds, markdown
from .profile import budget_bytes, find_profile
from .cost import CostModel
from .errors import OatoError
from .ggml import row_bytes
from .inventory import kv_bytes_per_token, read_inventory
from .plan import llama_server_command
from .schema import OBJECTIVES, ModelInventory, Plan, Profile, Workload, dumps, read_json, write_json
from .units import format_bytes, format_flops, mib

app = typer.Typer(help="Plan and run GGUF models split between the CPU and a GPU that is too small for them.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
stdout = Console(highlight=False, soft_wrap=True)
if not stdout.is_terminal:
    stdout.width = 200   # piped into a file or a test: do not cut tables at 80 columns
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


def handle_errors(command):
    """Turn an OatoError into one line on stderr and exit code 1 (a traceback with --debug)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except OatoError as exc:
            if _state["debug"]:
                raise
            stderr.print(f"oatoplan: error: {exc}", markup=False)
            raise typer.Exit(1) from None
    return wrapper


def _version(value: bool) -> None:
    if value:
        stdout.print(f"oatoplan {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="oatoplan: %(levelname)s: %(message)s", stream=sys.stderr, force=True)


ModelArg = Annotated[Path, typer.Argument(help="A GGUF model file.", show_default=False)]


@app.command()
@handle_errors
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole inventory as JSON.")] = False,
) -> None:
    """What is in a GGUF model: hyperparameters, and bytes and types per layer and role."""
    inventory = read_inventory(model)
    if as_json:
        sys.stdout.write(dumps(inventory))
        return
    _print_inventory(inventory)


def _print_inventory(inv: ModelInventory) -> None:
    hp = inv.hparams
    kv_f16 = sum(kv_bytes_per_token(hp, layer) for layer in range(hp.n_layer))
    stdout.print(f"[bold]{inv.identity.file_name}[/bold]  {hp.architecture}, {hp.n_layer} layers, "
                 f"{len(inv.tensors)} tensors, {format_bytes(inv.total_bytes)} of weights "
                 f"(file {format_bytes(inv.identity.file_bytes)})")
    heads_kv = sorted(set(hp.n_head_kv))
    stdout.print(f"n_embd {hp.n_embd}, n_head {hp.n_head}, n_head_kv {'/'.join(map(str, heads_kv))}, "
                 f"head_dim {hp.head_dim_k}, n_ff {hp.n_ff}, n_vocab {hp.n_vocab}, n_ctx_train {hp.n_ctx_train}"
                 + (f", n_swa {hp.n_swa} on {len(hp.swa_layers)} layers" if hp.n_swa else "")
                 + (f", {hp.n_expert} experts ({hp.n_expert_used} used)" if hp.n_expert else ""))
    stdout.print(f"KV cache (f16): {format_bytes(kv_f16)} per token of context over all layers")
    if inv.tied_output:
        stdout.print(f"tied output: no output.weight; llama.cpp loads a second copy of token_embd.weight "
                     f"({format_bytes(inv.output_matrix().n_bytes)}) on the output layer's device")

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
    table = Table(show_edge=False, pad_edge=False, box=None)
    for name in ["layer"] + columns + ["total"]:
        table.add_column(name, justify="left" if name == "layer" else "right", no_wrap=True)
    rows = ["input"] + [f"blk.{i}" for i in range(hp.n_layer)] + ["output"]
    for row in rows:
        if row not in cells:
            continue
        values = [f"{'/'.join(sorted(cells[row][c][1]))} {mib(cells[row][c][0]):.2f}" if c in cells[row] else ""
                  for c in columns]
        table.add_row(row, *values, f"{mib(sum(v[0] for v in cells[row].values())):.2f}")
    stdout.print("per layer and role: ggml type and MiB ('other': norms, biases and the rest)")
    stdout.print(table)
    flops = sum(t.flops_per_token for t in inv.tensors) + (2 * hp.n_embd * hp.n_vocab if inv.tied_output else 0)
    stdout.print(f"total {format_bytes(inv.total_bytes)}; {format_flops(flops)} per token in weight ops "
                 f"(before attention)")
    for warning in inv.warnings:
        stderr.print(f"oatoplan: warning: {warning}", markup=False)


@app.command()
@handle_errors
def run(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to complete.")],
    plan: Annotated[Optional[Path], typer.Option("--plan", help="plan.json; without it everything runs on the CPU.")]
    = None,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    cpu_only: Annotated[bool, typer.Option("--cpu-only", help="Run a GPU plan all on the CPU.")] = False,
    show_memory: Annotated[bool, typer.Option("--show-memory", help="Print what llama.cpp allocated, per buffer, "
                                                                    "against the plan's prediction.")] = False,
) -> None:
    """Load MODEL with a plan's placement, stream a completion, and print prefill and decode speed."""
    from .load import generate, load, run_stats
    llm = load(model, plan, cpu_only=cpu_only)
    if show_memory:
        _print_memory(llm.oatoplan_memory)
    for text in generate(llm, prompt, n_predict, temperature, seed):
        stdout.print(text, end="", markup=False)
    stdout.print()
    stats = run_stats(llm)
    stderr.print(f"prefill {stats.n_prompt_tokens} tokens in {stats.prompt_ms:.1f} ms "
                 f"({stats.prefill_tokens_per_s:.1f} tokens/s); decode {stats.n_generated_tokens} tokens in "
                 f"{stats.generate_ms:.1f} ms ({stats.decode_tokens_per_s:.1f} tokens/s)")


def _print_memory(report) -> None:
    table = Table(title="llama.cpp buffers", show_edge=False, box=None)
    for name in ("kind", "buffer type", "device", "MiB"):
        table.add_column(name, justify="right" if name == "MiB" else "left")
    for a in report.allocations:
        table.add_row(a.kind, a.buffer_type, a.device, f"{mib(a.n_bytes):.2f}")
    stdout.print(table)
    checks = Table(title="plan vs allocated", show_edge=False, box=None)
    for name in ("kind", "device", "predicted MiB", "allocated MiB", "ok"):
        checks.add_column(name, justify="left" if name in ("kind", "device") else "right")
    for c in report.checks:
        checks.add_row(c.kind, c.device, f"{mib(c.predicted_bytes):.2f}", f"{mib(c.allocated_bytes):.2f}",
                       "yes" if c.ok else "NO")
    stdout.print(checks)


@contextmanager
def _progress(description: str):
    """A rich progress bar on stderr; yields the library's progress(task, done, total) callback."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"{description}: {what}", completed=done, total=total)
        yield update


def _workload(prompt: int, gen: int, depth: int, objective: str) -> Workload:
    if objective not in OBJECTIVES:
        raise OatoError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if prompt < 1 or gen < 0 or depth < 0:
        raise OatoError("--prompt must be at least 1, --gen and --depth at least 0")
    return Workload(prompt, gen, depth, objective)


PromptOpt = Annotated[int, typer.Option("--prompt", help="Prompt tokens of the workload.")]
GenOpt = Annotated[int, typer.Option("--gen", help="Generated tokens of the workload.")]
DepthOpt = Annotated[int, typer.Option("--depth", help="Tokens already in the KV cache.")]
ProfileOpt = Annotated[Optional[Path], typer.Option("--profile", help="Profile JSON; default: the newest one in "
                                                                      "profiles/ for this machine's GPU.")]


@app.command()
@handle_errors
def profile(
    model: Annotated[Optional[Path], typer.Option("--model", help="Also time this model's own weight shapes, and "
                                                                  "calibrate decode on real decodes of it.")]
    = None,
    calibrate: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="With --model: decode the model "
                                                                              "in four placements and fit the "
                                                                              "decode factors.")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the profile (default "
                                                                    "profiles/<id>.json).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: all logical "
                                                                           "CPUs).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Profile only the CPU, even with a GPU present.")] = False,
    show: Annotated[Optional[Path], typer.Option("--show", help="Print the GPU-affinity table of a profile.")] = None,
    validate: Annotated[Optional[Path], typer.Option("--validate", help="Predict and measure three placements of "
                                                                        "this model with the profile.")] = None,
    use: ProfileOpt = None,
    reps: Annotated[int, typer.Option("--reps", help="Repetitions per placement (--validate, calibration).")] = 3,
    prompt: PromptOpt = 512, gen: GenOpt = 128,
) -> None:
    """Measure per-operator CPU and GPU costs and transfer costs on this machine."""
    from .profile import measure_profile
    if show:
        _print_affinity(read_json(Profile, show))
        return
    if validate:
        from .bench import run_bench, validation_arms
        prof = find_profile(use)
        arms = validation_arms(read_inventory(validate), prof, _workload(prompt, gen, 0, "total"))
        with _progress("validating") as update:
            result = run_bench(validate, arms, arms[0][1].workload, reps, update)
        path = write_json(result, out or Path(f"validate-{prof.profile_id}.json"))
        stdout.print(markdown(result, decode_bounds(read_inventory(validate), prof, result)), markup=False)
        stdout.print(f"wrote {path}")
        return
    inv = read_inventory(model) if model else None
    from .load import gpu_devices
    _writable(out or Path("profiles") / "x.json")     # before minutes of measuring, not after
    gpus = [] if cpu else gpu_devices()
    with _progress("profiling") as update:
        result = measure_profile(inv, gpu_device=gpus[0].name if gpus else None, n_threads=threads,
                                 progress=update)
    if model and calibrate:
        from .calibrate import calibrate as calibrate_decode
        with _progress("calibrating decode") as update:
            result = calibrate_decode(model, result, reps, update)
    path = write_json(result, out or Path("profiles") / f"{result.profile_id}.json")
    for note in result.notes:
        stderr.print(f"oatoplan: note: {note}", markup=False)
    stdout.print(f"wrote {path} ({len(result.ops)} operator points, {result.duration_s:.0f} s)")


def _writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OatoError(f"{path}: cannot write ({exc.strerror}); choose a writable path") from None
    if not os.access(path.parent, os.W_OK):
        raise OatoError(f"{path}: cannot write (directory not writable); choose a writable path")


def _print_affinity(prof: Profile) -> None:
    stdout.print(f"[bold]{prof.profile_id}[/bold]: {prof.machine.cpu_model} ({prof.n_threads} threads), "
                 f"{prof.machine.gpu_name or 'no GPU'}; crossing {prof.crossing_us:.1f} us, CPU mat-vec stream "
                 f"{prof.cpu_read_bytes_per_s / 1e9:.1f} GB/s")
    if prof.decode_factors:
        stdout.print(f"decode calibrated on {prof.calibration_model}: " + ", ".join(
            f"{c} x{f:.2f}" for c, f in prof.decode_factors.items()) +
            (f", crossing {prof.decode_crossing_us:.1f} us" if prof.decode_crossing_us else ""), markup=False)
        for arm in prof.calibration:
            measured = statistics.median(arm.decode_us_per_token)
            stdout.print(f"  {arm.name}: measured {measured / 1e3:.2f} ms/token, isolated ops "
                         f"{(sum(arm.components_us.values()) + arm.n_crossings * prof.crossing_us) / 1e3:.2f} ms, "
                         f"{arm.n_crossings} crossings", markup=False)
    cost = CostModel(prof)
    table = Table(show_edge=False, box=None)
    for name in ("op", "type", "shape", "tokens", "CPU us", "GPU us", "GPU+upload us", "CPU/GPU"):
        table.add_column(name, justify="left" if name in ("op", "type", "shape") else "right")
    gpu_points = {(o.op, o.ggml_type, o.shape, o.n_tokens): o.t_us for o in prof.ops if o.device == prof.gpu_device}
    for o in prof.ops:
        if o.device != "CPU":
            continue
        t_gpu = gpu_points.get((o.op, o.ggml_type, o.shape, o.n_tokens))
        upload = ""
        if t_gpu is not None and o.op == "MUL_MAT" and prof.transfers:
            upload = f"{t_gpu + cost.transfer_us(row_bytes(o.ggml_type, o.shape[0]) * o.shape[1]):.1f}"
        table.add_row(o.op, o.ggml_type, "x".join(map(str, o.shape)), str(o.n_tokens), f"{o.t_us:.1f}",
                      f"{t_gpu:.1f}" if t_gpu is not None else "", upload,
                      f"{o.t_us / t_gpu:.1f}" if t_gpu else "")
    stdout.print(table)


@app.command()
@handle_errors
def plan(
    model: ModelArg,
    vram: Annotated[str, typer.Option("--vram", help="VRAM budget, e.g. 6GiB, 4500MiB, or auto (free VRAM - 5%).")],
    use: ProfileOpt = None,
    prompt: PromptOpt = 512, gen: GenOpt = 128, depth: DepthOpt = 0,
    objective: Annotated[str, typer.Option("--objective", help="total, ttft or decode.")] = "total",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plan.")] = Path("plan.json"),
    write_lp: Annotated[Optional[Path], typer.Option("--write-lp", help="Also write the integer program (LP).")]
    = None,
) -> None:
    """Solve for the fastest placement of MODEL under a VRAM budget, for a workload."""
    from .plan import plan_model
    prof = find_profile(use)
    inv = read_inventory(model)
    result = plan_model(inv, prof, budget_bytes(vram, prof), _workload(prompt, gen, depth, objective), write_lp)
    path = write_json(result, out)
    _print_plan(result, path)
    stdout.print(f"wrote {path}" + (f" and {write_lp}" if write_lp else ""))


def _print_plan(p: Plan, path: Path) -> None:
    pred, w = p.prediction, p.workload
    stdout.print(f"[bold]plan[/bold] for {p.model.file_name}, VRAM budget {format_bytes(p.budget_bytes or 0)}, "
                 f"workload pp{w.n_prompt} tg{w.n_gen} depth {w.n_depth}, objective {w.objective}")
    for note in p.notes:
        stdout.print(f"  {note}", markup=False)
    stdout.print("VRAM: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in pred.gpu_bytes.items())
                 + f" = {format_bytes(sum(pred.gpu_bytes.values()))}")
    table = Table(show_edge=False, box=None)
    for name in ("arm", "flags", "VRAM", "TTFT s", "pp t/s", "tg t/s", "total s"):
        table.add_column(name, justify="left" if name in ("arm", "flags") else "right")
    rows = [("this plan", p.flags, pred)] + [(b.name, b.flags, b.prediction) for b in p.baselines]
    for name, flags, q in rows:
        if q is None:
            table.add_row(name, flags, "does not fit", "", "", "", "")
            continue
        table.add_row(name, flags, format_bytes(sum(q.gpu_bytes.values())), f"{q.prefill_s:.3f}",
                      f"{q.prefill_tokens_per_s:,.0f}", f"{q.decode_tokens_per_s:.1f}", f"{q.total_s:.2f}")
    stdout.print("predicted:")
    stdout.print(table)
    stdout.print(f"llama-cpp-python: oatoplan.load(model, '{path}') = Llama(model, n_gpu_layers={p.n_gpu_layers}, "
                 f"n_ctx={p.n_ctx}, n_batch={p.n_batch}, n_ubatch={p.n_ubatch}, use_mmap={p.use_mmap}, "
                 f"op_offload={p.op_offload}, flash_attn=True, n_threads={p.n_threads}) with the -ot overrides "
                 f"above" + (f" and n_outputs_max={p.n_outputs_max}" if p.n_outputs_max else ""), markup=False)
    stdout.print(f"llama-server: {llama_server_command(p, p.model.file_name)}", markup=False)


@app.command()
@handle_errors
def bench(
    model: ModelArg,
    vram: Annotated[str, typer.Option("--vram", help="VRAM budget for the plan and every baseline.")],
    use: ProfileOpt = None,
    prompt: PromptOpt = 512, gen: GenOpt = 128, depth: DepthOpt = 0,
    reps: Annotated[int, typer.Option("--reps", help="Repetitions per arm (after a warm-up).")] = 3,
    objective: Annotated[str, typer.Option("--objective", help="What the plan minimises: total, ttft or "
                                                               "decode.")] = "total",
    out: Annotated[Path, typer.Option("--out", "-o", help="Results JSON; .md and .png are written beside it.")]
    = Path("bench.json"),
) -> None:
    """Measure a plan against llama.cpp's own choices at the same VRAM, side by side (interleaved)."""
    from .bench import arm_plans, plot, run_bench
    from .plan import plan_model
    prof = find_profile(use)
    inv = read_inventory(model)
    workload = _workload(prompt, gen, depth, objective)
    solved = plan_model(inv, prof, budget_bytes(vram, prof), workload)
    arms = arm_plans(inv, solved, prof)
    with _progress("bench") as update:
        result = run_bench(model, arms, workload, reps, update)
    result = dataclasses.replace(result, command=" ".join(["oatoplan"] + sys.argv[1:]))
    path = write_json(result, out)
    table = markdown(result, decode_bounds(inv, prof, result))
    path.with_suffix(".md").write_text(table)
    stdout.print(table, markup=False)
    try:
        plot([result], path.with_suffix(".png"))
    except ImportError:
        stderr.print("oatoplan: note: matplotlib is missing; no PNG written", markup=False)
    stdout.print(f"wrote {path} (+ .md, .png)")


@app.command()
@handle_errors
def build(
    cuda: Annotated[bool, typer.Option("--cuda/--cpu", help="With the CUDA backend, or CPU only.")] = False,
    cuda_arch: Annotated[Optional[str], typer.Option("--cuda-arch", help="CUDA architectures, e.g. 90.")] = None,
    sdist: Annotated[Optional[Path], typer.Option("--sdist", help="A local llama-cpp-python 0.3.36 sdist "
                                                                  "(offline); default: download it.")] = None,
    source: Annotated[Optional[Path], typer.Option("--source", help="An unpacked llama-cpp-python 0.3.36 tree "
                                                                    "instead of the sdist (copied, not changed).")]
    = None,
    no_build_isolation: Annotated[bool, typer.Option("--no-build-isolation", help="Use the build tools already "
                                                                                  "installed (offline).")] = False,
    no_install: Annotated[bool, typer.Option("--no-install", help="Build (or find) the wheel, do not install.")]
    = False,
    native: Annotated[bool, typer.Option("--native/--portable", help="CPU code for this machine's instruction set "
                                                                     "(-march=native), or for any AVX2 x86-64.")]
    = False,
) -> None:
    """Build and install llama-cpp-python 0.3.36 with oatoplan's patch series (cached after the first build)."""
    from .build import build as build_wheel
    result = build_wheel(cuda=cuda, cuda_arch=cuda_arch, sdist=sdist, source=source, install=not no_install,
                         build_isolation=not no_build_isolation, native=native)
    stdout.print(f"{'cached' if result.cached else 'built'} {result.wheel} (series {result.series_hash}, "
                 f"CMAKE_ARGS {result.cmake_args}) in {result.seconds:.0f} s"
                 + ("" if no_install else "; installed"))


@app.command()
@handle_errors
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON.")] = False,
) -> None:
    """Check the llama.cpp build, devices and profiles, and say what to do about anything missing."""
    from .doctor import diagnose
    diagnosis = diagnose()
    if as_json:
        sys.stdout.write(dumps(diagnosis))
        return
    table = Table(show_edge=False, box=None)
    for name in ("check", "", "found", "to do"):
        table.add_column(name)
    for c in diagnosis.checks:
        table.add_row(c.name, "ok" if c.ok else "--", c.detail, "" if c.ok else c.fix)
    stdout.print(table)


@app.command()
@handle_errors
def serve(
    model: ModelArg,
    plan: Annotated[Optional[Path], typer.Option("--plan", help="plan.json; without it everything runs on the CPU.")]
    = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    alias: Annotated[Optional[str], typer.Option("--alias", help="Model name clients ask for (default: the file's "
                                                                 "stem).")] = None,
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", help="Context size: any without a GPU, at most the "
                                                                 "plan's with one.")] = None,
    chat_format: Annotated[Optional[str], typer.Option("--chat-format", help="llama-cpp-python's chat format "
                                                                             "(gemma, chatml, llama-3...); default: "
                                                                             "the GGUF's chat template.")] = None,
) -> None:
    """Serve MODEL with a plan's placement: llama-cpp-python's OpenAI-compatible server (needs oatoplan[server])."""
    from .serve import serve as serve_model   # fastapi, uvicorn: the optional `server` extra

    def listening(url: str, name: str) -> None:
        stdout.print(f"serving {name} at {url}/v1 with {plan or 'no plan (everything on the CPU)'}; Ctrl+C stops",
                     markup=False)
    serve_model(model, plan, host, port, alias=alias, n_ctx=n_ctx, chat_format=chat_format, on_listening=listening)


def main() -> None:
    app()
