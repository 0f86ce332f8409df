"""The `oatoplan` command: parses arguments, calls one library entry point, prints, exits. No logic lives here.

Errors a user can fix (OatoError) print one line to stderr and exit 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import NotBuiltYetError, OatoError
from .inventory import kv_bytes_per_token, read_inventory
from .schema import ModelInventory, dumps
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


def _not_built(name: str, issue: int) -> None:
    raise NotBuiltYetError(f"'oatoplan {name}' is not built yet (tracked as issue #{issue})")


@app.command()
@handle_errors
def profile() -> None:
    """Measure per-operator CPU and GPU costs on this machine (not built yet)."""
    _not_built("profile", 4)


@app.command()
@handle_errors
def plan() -> None:
    """Solve for the fastest placement under a VRAM budget (not built yet)."""
    _not_built("plan", 5)


@app.command()
@handle_errors
def bench() -> None:
    """Measure a plan against llama.cpp's own choices at the same VRAM (not built yet)."""
    _not_built("bench", 6)


@app.command()
@handle_errors
def build() -> None:
    """Build and install the patched llama-cpp-python (not built yet)."""
    _not_built("build", 7)


@app.command()
@handle_errors
def doctor() -> None:
    """Check the llama.cpp build, devices and profiles (not built yet)."""
    _not_built("doctor", 7)


def main() -> None:
    app()
