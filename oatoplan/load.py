"""Stage 5: load a model through llama-cpp-python with exactly a plan's placement. Entry point: `load(model, plan)`.

llama-cpp-python 0.3.36 declares `llama_model_params.tensor_buft_overrides` but never sets it, so we do: a
NULL-terminated ctypes array of {pattern, buffer type}, with buffer types taken from ggml's device registry in the
very libggml that llama-cpp-python loaded (a second copy of the library would have a registry of its own). After the
load we read back what llama.cpp allocated per buffer (from its log) and compare it with the plan's prediction.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gguf import GGMLQuantizationType

from . import ggml
from .errors import BackendError, LoadError, PlanError, PlanMismatchError
from .graph import CPU
from .inventory import read_inventory
from .machine import buffer_device, buffer_type, default_threads, device_handle, gpu_devices, llama_cpp_build
from .rpc import register_rpc_servers
from .artifacts import read_json
from .plan import ALIGNMENT_SLACK_BYTES, check_plan, cpu_only_plan, override_pattern, predict_memory, stream_env
from .segments import KV_SEGMENT_PATCH, SEGMENT_ENV_KEYS, segment_env
from .schema import SCHEMA_VERSION, BufferAllocation, MemoryCheck, MemoryReport, Plan, RunStats
from .units import BYTES_PER_MIB

try:
    import llama_cpp
    from llama_cpp import _logger
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = _logger = None

log = logging.getLogger(__name__)

# Plan fields that decide placement and memory: passing them to load() as well would make the plan lie.
PLAN_KEYS = ("n_gpu_layers", "n_ctx", "n_batch", "n_ubatch", "use_mmap", "op_offload", "flash_attn", "type_k",
             "type_v", "n_threads", "n_threads_batch", "swa_full", "tensor_split", "main_gpu", "split_mode")
# Memory checks: a difference up to this share of the prediction (or ALIGNMENT_SLACK_BYTES a tensor) is alignment.
RELATIVE_TOLERANCE = 0.01
COMPUTE_TOLERANCE = 0.10
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s*([0-9.]+) MiB")
# llama-model-loader.cpp, for every tensor an override matched (a debug-level line, always passed to the callback)
_OVERRIDE_LINE = re.compile(r"^tensor (\S+) \(.*\) buffer type overridden to (\S+)$")
_load_lock = threading.Lock()


class _Overrides(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def load_plan(path: str | Path) -> Plan:
    return read_json(Plan, path)


def load(model_path: str | Path, plan: Plan | str | Path | None = None, *, cpu_only: bool = False,
         verify: bool = True, **llama_kwargs):
    """Load `model_path` with `plan`'s placement and return a `llama_cpp.Llama` (plus `.oatoplan_memory`, a
    MemoryReport). `plan` may be a Plan or a plan.json path; None means everything on the CPU. `cpu_only` runs a
    GPU plan all on the CPU (explicitly, never by surprise). Other keyword arguments go to `llama_cpp.Llama`."""
    model_path = Path(model_path)
    source = str(plan) if isinstance(plan, (str, Path)) else "plan"
    inventory = read_inventory(model_path)
    plan = load_plan(plan) if isinstance(plan, (str, Path)) else plan or cpu_only_plan(inventory)
    check_plan(inventory, plan, source)
    if plan.n_outputs_max and llama_kwargs.get("logits_all"):
        raise LoadError(f"{source} reserves logits for {plan.n_outputs_max} token per batch (n_outputs_max), so "
                        f"logits_all=True cannot work; plan again for that use or drop logits_all")
    clashing = sorted(set(llama_kwargs) & set(PLAN_KEYS))
    if clashing:
        raise LoadError(f"{', '.join(clashing)} must be set in the plan, not passed to load(): the plan's memory "
                        f"prediction depends on them")
    build = llama_cpp_build()
    if plan.llama_cpp_build and plan.llama_cpp_build != build:
        raise PlanMismatchError(f"{source} was solved for {plan.llama_cpp_build}, but this is {build}; plan again "
                                f"with this build")
    if plan.kv_segments and KV_SEGMENT_PATCH not in build:
        raise PlanMismatchError(f"{source} uses the segment KV cache, which {build} lacks (it needs oatoplan's patch "
                                f"{KV_SEGMENT_PATCH}): run `oatoplan build`, or plan again without --ctx")
    if cpu_only and (plan.gpu_devices or plan.op_offload):
        plan = dataclasses.replace(plan, n_gpu_layers=0, tensor_overrides=(), gpu_devices=(), use_mmap=True,
                                   op_offload=False, rpc_servers=())
        plan = dataclasses.replace(plan, memory=predict_memory(inventory, plan))
        log.warning("running the plan's GPU placement on the CPU (--cpu-only)")
    _check_devices(plan, source)

    # exactly the plan's devices, NULL-terminated: a registered RPC device (or another GPU) never takes layers the
    # plan did not give it; its tensor_split (layer counts) gives each its layers and their KV cache, and without one
    # the first takes all n_gpu_layers, as predict_memory says
    devices = (ctypes.c_void_p * (len(plan.gpu_devices) + 1))(*[device_handle(d) for d in plan.gpu_devices], None)
    split = None
    if len(plan.gpu_devices) > 1:
        split = [float(c) for c in plan.tensor_split] if plan.tensor_split else \
            [1.0] + [0.0] * (len(plan.gpu_devices) - 1)
    overrides = (_Overrides * (len(plan.tensor_overrides) + 1))()
    patterns = [override_pattern(o.tensors).encode() for o in plan.tensor_overrides]   # alive as long as the model
    for i, (override, pattern) in enumerate(zip(plan.tensor_overrides, patterns)):
        overrides[i].pattern = pattern
        # the plain CPU buffer type means "host memory" to llama.cpp: pinned CUDA_Host when mmap is off and a GPU is
        # present (or a repacked CPU buffer on a CPU-only build)
        overrides[i].buft = buffer_type(override.device)
    # a plan's thread count is what runs, for decode and prefill alike; without one, this machine's physical cores
    # (llama-cpp-python's own defaults: logical CPUs // 2 for decode, all logical CPUs for prefill)
    threads = plan.n_threads or default_threads()
    kwargs = dict(n_gpu_layers=plan.n_gpu_layers if plan.gpu_devices else 0, n_ctx=plan.n_ctx,
                  n_batch=plan.n_batch, n_ubatch=plan.n_ubatch, use_mmap=plan.use_mmap, op_offload=plan.op_offload,
                  flash_attn=plan.flash_attn, type_k=_ggml_type(plan.type_k), type_v=_ggml_type(plan.type_v),
                  n_threads=threads, n_threads_batch=threads, swa_full=plan.swa_full, tensor_split=split, verbose=False)
    kwargs.update(llama_kwargs)
    lines: list[str] = []
    with _load_lock, _default_params_with(overrides if plan.tensor_overrides else None, devices, plan.n_outputs_max), \
            _native_environment(plan), _capture_log(lines):
        ring_before = (ggml.stream_stats() or (0, 0, 0, 0))[3]
        try:
            llm = llama_cpp.Llama(str(model_path), **kwargs)
        except ValueError as exc:
            raise LoadError(f"{model_path}: llama.cpp could not load the model with this plan ({exc}); run with "
                            f"--debug to see llama.cpp's log") from None
        ring = (ggml.stream_stats() or (0, 0, 0, 0))[3] - ring_before
    llm._oatoplan_overrides = (overrides, patterns, devices)
    report = dataclasses.replace(memory_report(lines, plan.memory or predict_memory(inventory, plan), plan.use_mmap),
                                 misplaced=tuple(misplaced_tensors(lines, plan)))
    llm.oatoplan_memory = report
    llm.oatoplan_plan = plan
    predicted_ring = sum(plan.memory.stream_bytes.values()) if plan.memory else 0
    if ring != predicted_ring and not _user_turned_off():
        log.warning("weight streaming's staging slots take %.1f MiB of VRAM, the plan expected %.1f MiB%s",
                    ring / BYTES_PER_MIB, predicted_ring / BYTES_PER_MIB,
                    "" if ggml.stream_stats() else " (this build has no weight streaming: run `oatoplan build`)")
    for c in report.checks:
        if c.kind == "compute" and not c.ok:
            log.warning("llama.cpp's compute buffer on %s is %.1f MiB, the plan estimated %.1f MiB", c.device,
                        c.allocated_bytes / BYTES_PER_MIB, c.predicted_bytes / BYTES_PER_MIB)
    if verify and report.misplaced:
        llm.close()
        raise LoadError(f"llama.cpp did not place the tensors as the plan says: {report.misplaced[0]}"
                        + (f" (and {len(report.misplaced) - 1} more)" if len(report.misplaced) > 1 else "")
                        + "; the plan does not describe this load (report a bug with --debug output)")
    bad = [c for c in report.checks if not c.ok and c.kind != "compute"]
    if verify and bad:
        llm.close()
        c = bad[0]
        raise LoadError(f"llama.cpp allocated {c.allocated_bytes / BYTES_PER_MIB:.1f} MiB of {c.kind} on {c.device}, "
                        f"the plan predicted {c.predicted_bytes / BYTES_PER_MIB:.1f} MiB; the plan does not describe "
                        f"this load (re-plan, or report a bug with --debug output)")
    return llm


def _check_devices(plan: Plan, source: str) -> None:
    """Register the plan's RPC servers (probed first), then refuse a plan whose devices this process lacks."""
    rpc = {d.name for d in register_rpc_servers(plan.rpc_servers)} if plan.rpc_servers else set()
    available = {d.name for d in gpu_devices()} | rpc
    missing = [d for d in plan.gpu_devices if d not in available]
    unserved = [d for d in missing if d.startswith("RPC[")]
    if unserved:
        raise PlanError(f"{source} places tensors on {unserved[0]}, but its rpc_servers {list(plan.rpc_servers)} do "
                        f"not name that endpoint; add it there (plan again)")
    if missing:
        have = ", ".join(sorted(available)) or "no GPU: a CPU-only build"
        raise BackendError(f"{source} places tensors on {', '.join(missing)}, but this llama-cpp-python has {have}; "
                           f"install a CUDA build (oatoplan build --cuda), or run all on the CPU with --cpu-only")


def _user_turned_off() -> bool:
    """OATO_STREAM set to 0 (natively: any value that starts with 0)."""
    return os.environ.get("OATO_STREAM", "").startswith("0")


@contextmanager
def _native_environment(plan: Plan):
    """The plan's weight-streaming and segment KV cache settings in the environment while llama.cpp creates the
    context (it reads them then), and nothing else of ours. OATO_STREAM=0 set by the user wins: it turns streaming
    off for A/B runs."""
    env = stream_env(plan)
    if _user_turned_off() and plan.stream_slots:
        log.info("OATO_STREAM=0: weight streaming off for this load, though the plan has it")
        env = {"OATO_STREAM": "0"}
    env.update(segment_env(plan.kv_segments))
    keys = ("OATO_STREAM", "OATO_STREAM_SLOTS", "OATO_STREAM_SLOT_BYTES") + SEGMENT_ENV_KEYS
    with ggml.environment(**{k: env.get(k) for k in keys}):
        yield


def _ggml_type(name: str) -> int:
    return int(GGMLQuantizationType[name.upper()])


@contextmanager
def _default_params_with(overrides, devices, n_outputs_max: int):
    """Llama.__init__ starts from llama_model_default_params() / llama_context_default_params() and never sets
    tensor_buft_overrides, devices or n_outputs_max: hand it params that already carry ours, for one load."""
    bindings = llama_cpp.llama.llama_cpp
    model_defaults, context_defaults = bindings.llama_model_default_params, bindings.llama_context_default_params

    def model_params():
        params = model_defaults()
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.devices = ctypes.cast(devices, ctypes.c_void_p)
        return params

    def context_params():
        params = context_defaults()
        params.n_outputs_max = n_outputs_max
        return params
    bindings.llama_model_default_params, bindings.llama_context_default_params = model_params, context_params
    try:
        yield
    finally:
        bindings.llama_model_default_params, bindings.llama_context_default_params = model_defaults, context_defaults


@contextmanager
def _capture_log(lines: list[str]):
    """Collect llama.cpp's log lines during a load (forwarded to our debug log), then give the log back to
    llama-cpp-python."""
    pending = [""]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        pending[0] += text.decode("utf-8", "replace")
        *complete, pending[0] = pending[0].split("\n")
        for line in complete:
            lines.append(line)
            log.debug("llama.cpp: %s", line)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if pending[0]:
            lines.append(pending[0])


def misplaced_tensors(lines: list[str], plan: Plan) -> list[str]:
    """Every overridden tensor of `plan` whose buffer type in llama.cpp's load log is not on the plan's device, or that
    the log does not name, and every tensor the log names that the plan does not override."""
    wanted = {name: o.device for o in plan.tensor_overrides for name in o.tensors}
    seen: dict[str, set[str]] = {}
    for line in lines:
        match = _OVERRIDE_LINE.match(line.strip())
        if match:
            seen.setdefault(match.group(1), set()).add(match.group(2))
    problems = [f"{name}: not overridden (wanted on {device})" for name, device in wanted.items() if name not in seen]
    for name, buffer_types in sorted(seen.items()):
        devices = {buffer_device(b) for b in buffer_types}
        if name not in wanted:
            problems.append(f"{name}: overridden to {', '.join(sorted(buffer_types))}, which the plan does not ask")
        elif devices != {wanted[name]}:
            problems.append(f"{name}: in {', '.join(sorted(buffer_types))}, the plan says {wanted[name]}")
    return problems


def memory_report(lines: list[str], predicted, use_mmap: bool) -> MemoryReport:
    """Buffers llama.cpp reported while loading, and each predicted (kind, device) checked against them.
    CPU weights with mmap on are a view of the file (CPU_Mapped covers a file range), so they are not checked."""
    allocations = []
    for line in lines:
        match = _BUFFER_LINE.search(line)
        if match:
            buffer_type, kind, size_mib = match.group(1), match.group(2), float(match.group(3))
            allocations.append(BufferAllocation(kind, buffer_type, buffer_device(buffer_type),
                                                int(round(size_mib * BYTES_PER_MIB))))
    checks = []
    for kind, per_device in (("model", predicted.model_bytes), ("KV", predicted.kv_bytes),
                             ("compute", predicted.compute_bytes)):
        for device in sorted(set(per_device) | {a.device for a in allocations if a.kind == kind and kind != "compute"}):
            if kind == "model" and device == CPU and use_mmap:
                continue
            want = per_device.get(device, 0)
            optional = predicted.model_optional_bytes.get(device, 0) if kind == "model" else 0
            got = sum(a.n_bytes for a in allocations if a.kind == kind and a.device == device)
            slack = max(RELATIVE_TOLERANCE * want, 0.02 * BYTES_PER_MIB + ALIGNMENT_SLACK_BYTES * 64)
            if kind == "compute":   # an estimate of llama.cpp's graph allocator, not a byte count
                slack = max(COMPUTE_TOLERANCE * want, 64 * BYTES_PER_MIB)
            ok = want - slack <= got <= want + optional + slack
            checks.append(MemoryCheck(kind, device, want, got, ok))
    return MemoryReport(SCHEMA_VERSION, tuple(allocations), tuple(checks))


def generate(llm, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> Iterator[str]:
    """Stream the completion of `prompt` (greedy at temperature 0); read `run_stats(llm)` afterwards."""
    # counted as llama-cpp-python counts it before refusing with "Requested tokens (...) exceed context window"
    n_prompt, n_ctx = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)), llm.n_ctx()
    if n_prompt >= n_ctx:
        planned = getattr(llm, "oatoplan_plan", None)
        rounded = f" ({n_ctx} as llama.cpp rounds it)" if planned and planned.n_ctx != n_ctx else ""
        raise PlanError(f"the prompt is {n_prompt} tokens, the plan's n_ctx is {planned.n_ctx if planned else n_ctx}"
                        f"{rounded}: plan again with --prompt {n_prompt} (or more) for a larger context")
    if n_prompt + max_tokens > n_ctx:
        log.warning("the context holds %d tokens after the %d-token prompt: generating at most %d, not %d",
                    n_ctx - n_prompt, n_prompt, n_ctx - n_prompt, max_tokens)
    if seed is not None:
        llm.set_seed(seed)
    for chunk in llm(prompt, max_tokens=max_tokens, temperature=temperature, stream=True):
        yield chunk["choices"][0]["text"]


def run_stats(llm) -> RunStats:
    """Prefill and decode counters of the last completion, from llama.cpp itself."""
    data = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return RunStats(int(data.n_p_eval), float(data.t_p_eval_ms), int(data.n_eval), float(data.t_eval_ms))
