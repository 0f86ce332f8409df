"""The `oatoplan` command: parses arguments, calls one library entry point, prints, exits. No logic lives here.

Errors a user can fix (OatoError) print one line to stderr and exit 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, report
from .bench import decode_bounds, validate
from .bench_split import bench_budgets
from .build import build as build_wheel
from .calibrate import calibrate
from .doctor import diagnose
from .errors import OatoError
from .files import Output, check_output, companion
from .inventory import check_kv_types, read_inventory
from .load import generate, load, run_stats
from .machine import gpu_devices
from .paths import user_profile_dir
from .memory import budget_bytes, parse_budgets
from .names import is_rpc, rpc_endpoint
from .plan import MAX_N_CTX
from .split import plan_budgets
from .profile import find_profile, measure_profile
from .profile_devices import check_devices, measure_devices
from .rpc import DEFAULT_HOST, DEFAULT_PORT, register_rpc_servers, run_rpc_server
from .serve import serve as serve_model
from .artifacts import dumps, read_json, write_json
from .schema import OBJECTIVES, ModelInventory, Profile, Workload
from .units import format_bytes

app = typer.Typer(help="Plan and run GGUF models split between the CPU and a GPU that is too small for them.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
profile_app = typer.Typer(help="Measure this machine (run), read a profile (show), check it on real runs (validate).",
                          no_args_is_help=True)
app.add_typer(profile_app, name="profile")
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
    _print(report.inventory_view(inventory))
    for warning in inventory.warnings:
        stderr.print(f"oatoplan: warning: {warning}", markup=False)


def _print(renderables) -> None:
    for renderable in renderables:
        stdout.print(renderable)


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
    _in_range("--n-predict", n_predict, 1)
    _in_range("--temp", temperature, 0)
    _in_range("--seed", seed, 0, MAX_SEED)
    llm = load(model, plan, cpu_only=cpu_only)
    if show_memory:
        _print(report.memory_view(llm.oatoplan_memory))
    for text in generate(llm, prompt, n_predict, temperature, seed):
        stdout.print(text, end="", markup=False)
    stdout.print()
    stats = run_stats(llm)
    stderr.print(f"prefill {stats.n_prompt_tokens} tokens in {stats.prompt_ms:.1f} ms "
                 f"({stats.prefill_tokens_per_s:.1f} tokens/s); decode {stats.n_generated_tokens} tokens in "
                 f"{stats.generate_ms:.1f} ms ({stats.decode_tokens_per_s:.1f} tokens/s)")


@contextmanager
def _progress(description: str):
    """A rich progress bar on stderr; yields the library's progress(task, done, total) callback."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"{description}: {what}", completed=done, total=total)
        yield update


MAX_SEED = (1 << 32) - 1      # llama.cpp's seeds are uint32
MAX_REPS = 1000               # repetitions of a measurement: more is a typo, not a wish to wait for days


def _in_range(option: str, value: int | float | None, low: int | float, high: int | float | None = None) -> None:
    """Refuse a number outside low..high (or NaN, or infinite) with one line naming the option; None passes."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if value is None or (finite and low <= value and (high is None or value <= high)):
        return
    wanted = f"from {low} to {high}" if high is not None else f"of at least {low}"
    raise OatoError(f"{option} {value} is out of range: give a number {wanted}")


def _workload(prompt: int, gen: int, depth: int, objective: str, inv: ModelInventory,
              ctx_over_train: bool = False, ctx: int = 0, types: tuple[str, str] = ("f16", "f16")) -> Workload:
    """The workload, its context within the model's training length (or MAX_N_CTX with --ctx-over-train); `ctx`:
    the context to reserve (--ctx), at least what the workload uses; `types`: the KV cache's (-ctk, -ctv)."""
    if objective not in OBJECTIVES:
        raise OatoError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    check_kv_types(inv, *types)     # -ctk / -ctv as llama.cpp takes them
    for option, value, low in (("--prompt", prompt, 1), ("--gen", gen, 0), ("--depth", depth, 0), ("--ctx", ctx, 0)):
        _in_range(option, value, low, MAX_N_CTX)
    used, n_ctx_train = depth + prompt + gen, inv.hparams.n_ctx_train
    if ctx and ctx < used:
        raise OatoError(f"--ctx {ctx} is less than --depth + --prompt + --gen ({used} tokens): give at least {used}, "
                        f"or leave --ctx out")
    what = "--ctx" if ctx else "--depth + --prompt + --gen"
    n_ctx = max(ctx, used)
    if ctx_over_train and n_ctx > MAX_N_CTX:
        raise OatoError(f"{what} is {n_ctx} tokens, more than oatoplan's limit of {MAX_N_CTX}")
    if not ctx_over_train and n_ctx > n_ctx_train:
        raise OatoError(f"{what} is {n_ctx} tokens, more than the {n_ctx_train} tokens "
                        f"{inv.identity.file_name} was trained on: shorten the workload, or add --ctx-over-train")
    return Workload(prompt, gen, depth, objective, ctx, *types)


def _budget(vram: str, prof: Profile) -> int:
    """--vram in bytes, at most the profiled GPU's memory where the profile knows it."""
    n_bytes, total = budget_bytes(vram, prof), prof.machine.gpu_total_bytes
    if total and n_bytes > total:
        raise OatoError(f"--vram {vram} is {format_bytes(n_bytes)}, more than the {format_bytes(total)} of "
                        f"{prof.machine.gpu_name} (profile {prof.profile_id}): give at most that, or auto")
    return n_bytes


PromptOpt = Annotated[int, typer.Option("--prompt", help="Prompt tokens of the workload.")]
GenOpt = Annotated[int, typer.Option("--gen", help="Generated tokens of the workload.")]
DepthOpt = Annotated[int, typer.Option("--depth", help="Tokens already in the KV cache.")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Context to reserve (llama.cpp's -c), e.g. 32768 for chats "
                                                   "that are usually short; default: depth + prompt + gen.")]
CacheTypeKOpt = Annotated[str, typer.Option("--cache-type-k", "-ctk", help="KV cache type of K, as llama.cpp's.")]
CacheTypeVOpt = Annotated[str, typer.Option("--cache-type-v", "-ctv", help="KV cache type of V, as llama.cpp's.")]
CtxOverTrainOpt = Annotated[bool, typer.Option("--ctx-over-train", help="Allow depth + prompt + gen past the "
                                                                        "model's training context.")]
ProfileOpt = Annotated[Optional[Path], typer.Option("--profile", help="Profile JSON; default: the newest for this "
                                                                      "machine's GPU, yours first, then oatoplan's.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an output path that holds another kind of file, or "
                                                        "the file a symlink there points to.")]


@profile_app.command("run")
@handle_errors
def profile_run(
    model: Annotated[Optional[Path], typer.Option("--model", help="Also time this model's own weight shapes, and "
                                                                  "calibrate decode on real decodes of it.")]
    = None,
    calibrate_decode: Annotated[bool, typer.Option("--calibrate/--no-calibrate", help="With --model: decode the "
                                                                                     "model in four placements and "
                                                                                     "fit the decode factors.")]
    = True,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the profile (default "
                                                                    "<id>.json in your profile directory).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: the physical "
                                                                           "cores).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Profile only the CPU, even with a GPU present.")] = False,
    reps: Annotated[int, typer.Option("--reps", help="Repetitions per calibration placement.")] = 3,
    device: Annotated[Optional[list[str]], typer.Option("--device", help="Also profile this accelerator for plans "
                                                                        "over several devices: another local GPU "
                                                                        "(CUDA1) or an RPC device "
                                                                        "(RPC[host:port], an rpc-server). "
                                                                        "Repeat for more.")] = None,
    force: ForceOpt = False,
) -> None:
    """Measure per-operator CPU and GPU costs and transfer costs on this machine."""
    _in_range("--threads", threads, 1, 4096)
    _in_range("--reps", reps, 1, MAX_REPS)
    inv = read_inventory(model) if model else None
    check_output(Output(out or user_profile_dir() / "x.json", (model,), force, "-o"), "profile")   # before measuring
    gpus = [] if cpu else gpu_devices()
    if device:        # before minutes of measuring: a device given twice, or an RPC server that does not answer
        check_devices(device, gpus[0].name if gpus else None)
        register_rpc_servers([rpc_endpoint(d) for d in device if is_rpc(d)])
    with _progress("profiling") as update:
        result = measure_profile(inv, gpu_device=gpus[0].name if gpus else None, n_threads=threads,
                                 progress=update)
    if model and calibrate_decode:
        with _progress("calibrating decode") as update:
            result = calibrate(model, result, reps, update)
    if device:
        with _progress("profiling more devices") as update:
            result = measure_devices(result, inv, device, progress=update)
    path = write_json(result, Output(out or user_profile_dir() / f"{result.profile_id}.json", (model,), force, "-o"))
    for note in result.notes:
        stderr.print(f"oatoplan: note: {note}", markup=False)
    stdout.print(f"wrote {path} ({len(result.ops)} operator points, {result.duration_s:.0f} s)")


@profile_app.command("show")
@handle_errors
def profile_show(
    path: Annotated[Path, typer.Argument(help="A profile JSON.", show_default=False)],
) -> None:
    """Print a profile: the machine, its decode calibration, and the GPU affinity of every operator point."""
    _print(report.profile_view(read_json(Profile, path)))


@profile_app.command("validate")
@handle_errors
def profile_validate(
    model: ModelArg,
    use: ProfileOpt = None,
    reps: Annotated[int, typer.Option("--reps", help="Repetitions per placement.")] = 3,
    prompt: PromptOpt = 512, gen: GenOpt = 128, ctx_over_train: CtxOverTrainOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results JSON (default "
                                                                    "validate-<profile id>.json).")] = None,
    force: ForceOpt = False,
) -> None:
    """Predict and measure three placements of MODEL with a profile: how far the cost model is from reality."""
    _in_range("--reps", reps, 1, MAX_REPS)
    prof = find_profile(use)
    workload = _workload(prompt, gen, 0, "total", read_inventory(model), ctx_over_train)
    target = Output(out or Path(f"validate-{prof.profile_id}.json"), (model, use), force, "-o")
    check_output(target, "bench")
    with _progress("validating") as update:
        result = validate(model, prof, workload, reps, update)
    path = write_json(result, target)
    bounds = decode_bounds(read_inventory(model), prof, result)
    _print([report.table(result, bounds)] + [line for line in [report.summary(result)] if line])
    stdout.print(f"wrote {path}")


@app.command()
@handle_errors
def plan(
    model: ModelArg,
    vram: Annotated[str, typer.Option("--vram", help="VRAM budget, e.g. 6GiB, 4500MiB, 0 (all on the CPU), or auto "
                                                     "(free VRAM - 5%; 0 without a GPU); for several devices, one "
                                                     "per device in split order: "
                                                     "CUDA0=20GiB,CUDA1=auto,RPC[host:50052]=8GiB.")],
    use: ProfileOpt = None, prompt: PromptOpt = 512, gen: GenOpt = 128, depth: DepthOpt = 0, ctx: CtxOpt = 0,
    ctx_over_train: CtxOverTrainOpt = False, cache_type_k: CacheTypeKOpt = "f16", cache_type_v: CacheTypeVOpt = "f16",
    objective: Annotated[str, typer.Option("--objective", help="total, ttft or decode.")] = "total",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plan.")] = Path("plan.json"),
    write_lp: Annotated[Optional[Path], typer.Option("--write-lp", help="Also write the integer program (LP).")]
    = None,
    force: ForceOpt = False,
) -> None:
    """Solve for the fastest placement of MODEL under a VRAM budget, for a workload."""
    prof = find_profile(use)
    inv = read_inventory(model)
    target = Output(out, (model, use, write_lp), force, "-o")
    lp = Output(write_lp, (model, use, out), force, "--write-lp") if write_lp else None
    check_output(target, "plan")
    if lp:
        check_output(lp, "lp")
    workload = _workload(prompt, gen, depth, objective, inv, ctx_over_train, ctx, (cache_type_k, cache_type_v))
    budgets = parse_budgets(vram)
    result = plan_budgets(inv, prof, budgets, 0 if budgets else _budget(vram, prof), workload, lp)
    path = write_json(result, target)
    _print(report.plan_view(result, path))
    stdout.print(f"wrote {path}" + (f" and {write_lp}" if write_lp else ""))


@app.command()
@handle_errors
def bench(
    model: ModelArg,
    vram: Annotated[str, typer.Option("--vram", help="VRAM budget for the plan and every baseline; for several "
                                                     "devices one per device, in split order (as for plan): "
                                                     "CUDA0=20GiB,RPC[host:50052]=8GiB.")],
    use: ProfileOpt = None, prompt: PromptOpt = 512, gen: GenOpt = 128, depth: DepthOpt = 0, ctx: CtxOpt = 0,
    ctx_over_train: CtxOverTrainOpt = False, cache_type_k: CacheTypeKOpt = "f16", cache_type_v: CacheTypeVOpt = "f16",
    reps: Annotated[int, typer.Option("--reps", help="Repetitions per arm (after a warm-up).")] = 3,
    objective: Annotated[str, typer.Option("--objective", help="What the plan minimises: total, ttft or "
                                                               "decode.")] = "total",
    out: Annotated[Path, typer.Option("--out", "-o", help="Results JSON; .md and .png are written beside it.")]
    = Path("bench.json"),
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Also measure the plan with weight "
                                            "streaming off (when it streams) and all on the GPU (when that fits the "
                                            "free VRAM), as references outside the budget comparison.")] = True,
    force: ForceOpt = False,
) -> None:
    """Measure a plan against llama.cpp's own choices at the same VRAM, side by side (interleaved)."""
    _in_range("--reps", reps, 1, MAX_REPS)
    prof = find_profile(use)
    workload = _workload(prompt, gen, depth, objective, read_inventory(model), ctx_over_train, ctx,
                         (cache_type_k, cache_type_v))
    budgets = parse_budgets(vram)
    budget = 0 if budgets else _budget(vram, prof)
    targets = [Output(name, (model, use), force, "-o") for name in (out, companion(out, ".md"), companion(out, ".png"))]
    for target, kind in zip(targets, ("bench", "markdown", "png")):     # before minutes of measuring
        check_output(target, kind)
    command = " ".join(["oatoplan"] + sys.argv[1:])
    with _progress("bench") as update:
        result = bench_budgets(model, prof, budgets, budget, workload, reps, update, command, reference)
    path = write_json(result, targets[0])
    bounds = decode_bounds(read_inventory(model), prof, result)
    written = report.write_bench(result, targets[1], targets[2], bounds)
    _print([report.table(result, bounds)] + [line for line in [report.summary(result)] if line])
    stdout.print(f"wrote {', '.join(str(p) for p in [path] + written)}")


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
    result = build_wheel(cuda=cuda, cuda_arch=cuda_arch, sdist=sdist, source=source, install=not no_install,
                         build_isolation=not no_build_isolation, native=native)
    stdout.print(f"{'cached' if result.cached else 'built'} {result.wheel} (series {result.series_hash}, "
                 f"CMAKE_ARGS {result.cmake_args}) in {result.seconds:.0f} s"
                 + ("" if no_install else "; installed"))
    if result.rpc_server:
        stdout.print(f"rpc-server: {result.rpc_server}", markup=False)


@app.command("rpc-server")
@handle_errors
def rpc_server(
    host: Annotated[str, typer.Option("--host", help="Address to listen on (anything but loopback exposes the "
                                                     "server, unauthenticated, to the network).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = DEFAULT_PORT,
    device: Annotated[Optional[str], typer.Option("--device", help="The device to serve: CPU, CUDA0... (default: "
                                                                   "rpc-server's, the first GPU, else the CPU).")]
    = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads of the served CPU device.")]
    = None,
) -> None:
    """Serve one device of this machine to llama.cpp's RPC backend (rpc-server of the installed build)."""
    _in_range("--port", port, 1, 65535)
    _in_range("--threads", threads, 1, 4096)
    run_rpc_server(host, port, device, threads)


@app.command()
@handle_errors
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnosis as JSON.")] = False,
) -> None:
    """Check the llama.cpp build, devices and profiles, and say what to do about anything missing."""
    diagnosis = diagnose()
    if as_json:
        sys.stdout.write(dumps(diagnosis))
        return
    stdout.print(report.diagnosis_view(diagnosis))


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
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", help="Context size: up to the model's training "
                                                                 "context, and at most the plan's when it uses a "
                                                                 "GPU.")] = None,
    chat_format: Annotated[Optional[str], typer.Option("--chat-format", help="llama-cpp-python's chat format "
                                                                             "(gemma, chatml, llama-3...); default: "
                                                                             "the GGUF's chat template.")] = None,
) -> None:
    """Serve MODEL with a plan's placement: llama-cpp-python's OpenAI-compatible server (needs oatoplan[server])."""
    _in_range("--port", port, 1, 65535)
    _in_range("--n-ctx", n_ctx, 1, MAX_N_CTX)

    def listening(url: str, name: str) -> None:
        stdout.print(f"serving {name} at {url}/v1 with {plan or 'no plan (everything on the CPU)'}; Ctrl+C stops",
                     markup=False)
    serve_model(model, plan, host, port, alias=alias, n_ctx=n_ctx, chat_format=chat_format, on_listening=listening)


def main() -> None:
    app()
