"""Every artifact oatoplan writes or reads: frozen dataclasses, stored as JSON with a `schema_version`.

Sizes are bytes, times microseconds, unless a name says otherwise. Tensor names are exactly as in the GGUF file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ArtifactError
from .files import GGUF_MAGIC, Output, describe_mode, write_file

SCHEMA_VERSION = 1

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# Model inventory (stage 1: what is in a GGUF file)

@dataclass(frozen=True)
class TensorInfo:
    name: str                 # exactly as in GGUF, e.g. "blk.3.ffn_up.weight"
    layer: int | None         # block index for "blk.N.*", None for input/output tensors
    group: str                # "input" (token_embd...), "layer", or "output" (output, output_norm)
    role: str                 # "attn_q", "ffn_down", "ffn_up_exps", "attn_norm", "token_embd", ... or "other"
    param: str                # "weight", "bias", or the suffix after the role
    ggml_type: str            # ggml type name, e.g. "Q4_K"
    shape: tuple[int, ...]    # ggml order: shape[0] is the row length (input features for a matrix)
    n_bytes: int
    op: str                   # ggml op that consumes it: MUL_MAT, MUL_MAT_ID, GET_ROWS, MUL, ADD, ROPE, NONE
    flops_per_token: int      # arithmetic per token of batch (2 per multiply-add); 0 for lookups


@dataclass(frozen=True)
class Hyperparameters:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]    # per layer (some models vary it)
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int                    # sliding-window size, 0 if none
    swa_layers: tuple[int, ...]   # layers that use the sliding window
    n_expert: int                 # 0 for dense models
    n_expert_used: int


@dataclass(frozen=True)
class ModelIdentity:
    """Enough to tell one model file from another without hashing gigabytes of weights."""
    file_name: str
    file_bytes: int
    tensor_table_sha256: str      # over (name, type, shape, offset) of every tensor, in file order


@dataclass(frozen=True)
class ModelInventory:
    schema_version: int
    path: str
    identity: ModelIdentity
    hparams: Hyperparameters
    tensors: tuple[TensorInfo, ...]
    # No `output.weight` in the file: llama.cpp then uses token_embd as the output matrix and loads a second copy
    # of it on the output layer's device (it costs VRAM when the output layer is on a GPU).
    tied_output: bool
    data_offset: int              # where tensor data starts in the file
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def output_matrix(self) -> TensorInfo:
        """The tensor the output MUL_MAT reads: `output.weight`, or `token_embd.weight` when tied."""
        return self.tensor("token_embd.weight" if self.tied_output else "output.weight")


# ---------------------------------------------------------------------------------------------------------------
# Workload and predictions (what `plan` optimises for, and what it expects)

OBJECTIVES = ("total", "ttft", "decode")


@dataclass(frozen=True)
class Workload:
    n_prompt: int = 512           # prompt tokens to prefill
    n_gen: int = 128              # tokens to generate
    n_depth: int = 0              # tokens already in the KV cache before the prompt
    objective: str = "total"      # "total" (prefill + all decode), "ttft" (prefill), "decode" (per token)

    @property
    def n_ctx(self) -> int:
        return self.n_depth + self.n_prompt + self.n_gen


@dataclass(frozen=True)
class Prediction:
    prefill_s: float              # the whole prompt: time to first token, less sampling
    decode_s_per_token: float     # averaged over the generated tokens (attention grows with depth)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float                # prefill + n_gen tokens of decode
    gpu_bytes: dict[str, int]     # VRAM by category: weights, kv, compute, pool
    n_crossings: int              # CPU<->GPU crossings in one decode graph


@dataclass(frozen=True)
class BaselinePrediction:
    name: str                     # "llama-cpp-python defaults", "layer offload (--fit)", "--n-cpu-ffn", ...
    flags: str                    # the llama.cpp flags of that arm
    prediction: Prediction | None  # None: does not fit the budget at all
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Plan (what `plan` writes and `load` applies)

@dataclass(frozen=True)
class TensorOverride:
    """One llama.cpp tensor buffer-type override: tensors whose name matches `pattern` (std::regex_search,
    ECMAScript, first match wins) go to `device`. "CPU" means host memory (pinned `CUDA_Host` when mmap is off
    and a GPU is present), a GPU device is named as ggml names it ("CUDA0")."""
    pattern: str
    device: str


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes llama.cpp is expected to allocate, per device ("CPU" covers every host buffer type)."""
    model_bytes: dict[str, int]
    kv_bytes: dict[str, int]
    compute_bytes: dict[str, int] = field(default_factory=dict)   # empty: not predicted, not checked
    # bytes llama.cpp may or may not add to model_bytes (a tied output copy that the CPU backend repacks)
    model_optional_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    schema_version: int
    model: ModelIdentity
    # llama.cpp's rule: the last n_gpu_layers - 1 blocks and `output` go to the GPU (`output` counts as a layer);
    # a block's device is also where its KV cache and attention run.
    n_gpu_layers: int
    tensor_overrides: tuple[TensorOverride, ...]
    n_ctx: int
    n_batch: int
    n_ubatch: int
    use_mmap: bool
    op_offload: bool              # copy CPU-resident weights to the GPU for large batches
    flash_attn: bool
    type_k: str                   # KV cache types: "f16", "q8_0", "q4_0"
    type_v: str
    n_threads: int | None         # None: llama-cpp-python's default
    gpu_devices: tuple[str, ...]  # devices the plan places anything on, e.g. ("CUDA0",); () for all-CPU
    llama_cpp_build: str          # build the plan was solved for; "" = made by hand, any build
    # sliding-window layers keep the whole context (llama.cpp's default) or only n_swa + n_ubatch cells
    swa_full: bool = True
    # logit rows llama.cpp reserves per ubatch (0 = all of them, its default); 1 frees n_ubatch x n_vocab x 4 bytes
    # of compute buffer, and the model can then return logits for one token per ubatch (what generation reads)
    n_outputs_max: int = 0
    profile_id: str = ""
    budget_bytes: int | None = None
    memory: MemoryPrediction | None = None
    notes: tuple[str, ...] = ()
    # written by `oatoplan plan`: what it was solved for and what it expects
    workload: Workload | None = None
    prediction: Prediction | None = None
    baselines: tuple[BaselinePrediction, ...] = ()
    placement: dict[str, str] = field(default_factory=dict)   # unit key ("blk.3.ffn_up", "blk.3.attn") -> device
    flags: str = ""               # the equivalent llama.cpp flags


# ---------------------------------------------------------------------------------------------------------------
# Loader report (what llama.cpp really allocated)

@dataclass(frozen=True)
class BufferAllocation:
    kind: str          # "model", "KV", "compute", "output"
    buffer_type: str   # as llama.cpp names it: "CUDA0", "CUDA_Host", "CPU", "CPU_Mapped", "CPU_REPACK"
    device: str        # "CPU" for every host buffer type, else the GPU's name
    n_bytes: int


@dataclass(frozen=True)
class MemoryCheck:
    kind: str
    device: str
    predicted_bytes: int
    allocated_bytes: int
    ok: bool


@dataclass(frozen=True)
class MemoryReport:
    schema_version: int
    allocations: tuple[BufferAllocation, ...]
    checks: tuple[MemoryCheck, ...]


@dataclass(frozen=True)
class Device:
    name: str            # ggml's name: "CPU", "CUDA0"
    description: str
    type: str            # "CPU", "GPU", "IGPU", "ACCEL"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class RunStats:
    """llama.cpp's own perf counters for one completion."""
    n_prompt_tokens: int
    prompt_ms: float
    n_generated_tokens: int
    generate_ms: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1000.0 * self.n_prompt_tokens / self.prompt_ms if self.prompt_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.n_generated_tokens / self.generate_ms if self.generate_ms else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Profile (what `profile` measures on the user's machine; the planner's cost model reads it)

@dataclass(frozen=True)
class MachineIdentity:
    cpu_model: str
    n_cpu_threads: int            # logical CPUs
    ram_bytes: int
    gpu_name: str                 # "" when profiled without a GPU
    gpu_total_bytes: int
    gpu_driver: str
    pcie_link: str                # e.g. "gen5 x16", "" if unknown
    llama_cpp_build: str


@dataclass(frozen=True)
class OpTiming:
    """Median time of one operator on one device, per copy, from graphs of several independent copies (so that a
    graph launch is not counted as op time and weights are read from memory, not from cache)."""
    device: str                   # "CPU", "CUDA0"
    op: str                       # ggml op: MUL_MAT, FLASH_ATTN_EXT, RMS_NORM, MUL, ADD, GLU, ROPE, SET_ROWS, GET_ROWS
    ggml_type: str                # weight type (MUL_MAT, GET_ROWS), KV type (FLASH_ATTN_EXT, SET_ROWS), else F32
    # MUL_MAT: (K, N) = (input features, output features) of the weight; FLASH_ATTN_EXT: (head_dim, n_head,
    # n_head_kv, n_kv); element-wise ops: (elements per token,)
    shape: tuple[int, ...]
    n_tokens: int
    t_us: float                   # median
    samples_us: tuple[float, ...]


@dataclass(frozen=True)
class TransferTiming:
    direction: str                # "h2d" (host to device) or "d2h"
    memory: str                   # host side: "pinned" or "pageable"
    n_bytes: int
    t_us: float
    samples_us: tuple[float, ...]


@dataclass(frozen=True)
class CalibrationArm:
    """One real llama.cpp decode of the profiled model (`oatoplan profile --model`), against the isolated-op model."""
    name: str                             # the placement, e.g. "FFN of layers 0-13 on CPU"
    flags: str                            # its llama.cpp flags
    decode_us_per_token: tuple[float, ...]   # measured, one sample per repetition
    components_us: dict[str, float]       # uncalibrated predicted decode time per class (cost.DECODE_CLASSES), "fixed"
    n_crossings: int                      # CPU<->GPU crossings in its decode graph


@dataclass(frozen=True)
class Profile:
    schema_version: int
    profile_id: str
    created_utc: str
    machine: MachineIdentity
    n_threads: int                # CPU threads the CPU backend ran with (and a plan must run with)
    gpu_device: str               # ggml device profiled, "" without a GPU
    ops: tuple[OpTiming, ...]
    transfers: tuple[TransferTiming, ...]
    launch_us: dict[str, float]   # one graph of one tiny op, per device: the fixed cost of a graph split
    crossing_us: float            # one CPU<->GPU crossing in a decode graph (half a measured round trip)
    cpu_read_bytes_per_s: float   # weight bytes per second a CPU mat-vec streams (largest weight, 1 token)
    gpu_reserved_bytes: int       # VRAM in use before any buffer (CUDA context, other processes)
    duration_s: float = 0.0
    notes: tuple[str, ...] = ()
    # decode time factors per class of work (cost.DECODE_CLASSES) and the cost of one crossing in a decode graph,
    # fitted to real decodes of a model (oatoplan/calibrate.py); {} and 0: not calibrated
    decode_factors: dict[str, float] = field(default_factory=dict)
    decode_crossing_us: float = 0.0
    calibration: tuple[CalibrationArm, ...] = ()
    calibration_model: str = ""           # file name and sha256 prefix of the model calibrated on


# Ops a profile times on each of its devices (the cost model looks each one up), and the dimensions of their shapes.
PROFILE_OPS = ("MUL_MAT", "FLASH_ATTN_EXT", "RMS_NORM", "MUL", "ADD", "GLU", "ROPE", "SET_ROWS", "GET_ROWS")
PROFILE_OP_DIMS = {"MUL_MAT": 2, "FLASH_ATTN_EXT": 4}      # any other op: (elements per token,)
GPU_DEVICE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")   # ggml's device names: CUDA0, Vulkan0, Metal, ...


def validate_profile(p: Profile) -> None:
    """Raise ValueError naming the field where `p` cannot drive the cost model: a time or rate that is not a finite
    positive number (NaN, negative, zero), a device other than CPU and the profiled GPU, an op missing on a device,
    too few transfer sizes to fit a line to where a GPU is named."""
    devices = ("CPU",) + ((p.gpu_device,) if p.gpu_device else ())
    if p.gpu_device and (p.gpu_device == "CPU" or not GPU_DEVICE_NAME.match(p.gpu_device)):
        raise ValueError(f"gpu_device {p.gpu_device!r} is not a ggml GPU device name (e.g. CUDA0)")
    _at_least("n_threads", p.n_threads, 1)
    _at_least("machine.n_cpu_threads", p.machine.n_cpu_threads, 1)
    for name in ("ram_bytes", "gpu_total_bytes"):
        _at_least(f"machine.{name}", getattr(p.machine, name), 0)
    _at_least("gpu_reserved_bytes", p.gpu_reserved_bytes, 0)
    _finite("cpu_read_bytes_per_s", p.cpu_read_bytes_per_s, positive=True)
    for name in ("crossing_us", "duration_s", "decode_crossing_us"):
        _finite(name, getattr(p, name))
    for device, t in p.launch_us.items():
        _known_device(f"launch_us.{device}", device, devices)
        _finite(f"launch_us.{device}", t)
    for name, factor in p.decode_factors.items():
        _finite(f"decode_factors.{name}", factor)
    if not p.ops:
        raise ValueError("ops is empty")
    for i, o in enumerate(p.ops):
        where = f"ops[{i}]"
        _known_device(f"{where}.device", o.device, devices)
        if len(o.shape) < PROFILE_OP_DIMS.get(o.op, 1):
            raise ValueError(f"{where}.shape {list(o.shape)} has too few dimensions for {o.op}")
        for j, dim in enumerate(o.shape):
            _at_least(f"{where}.shape[{j}]", dim, 1)
        _at_least(f"{where}.n_tokens", o.n_tokens, 1)
        _finite(f"{where}.t_us", o.t_us, positive=True)
        for j, t in enumerate(o.samples_us):
            _finite(f"{where}.samples_us[{j}]", t)
    measured = {(o.device, o.op) for o in p.ops}
    for device in devices:
        for op in PROFILE_OPS:
            if (device, op) not in measured:
                raise ValueError(f"ops: no {op} timing on {device}")
    for i, t in enumerate(p.transfers):
        where = f"transfers[{i}]"
        if t.direction not in ("h2d", "d2h") or t.memory not in ("pinned", "pageable"):
            raise ValueError(f"{where}: direction {t.direction!r} / memory {t.memory!r} is not h2d or d2h / "
                             f"pinned or pageable")
        _at_least(f"{where}.n_bytes", t.n_bytes, 1)
        _finite(f"{where}.t_us", t.t_us, positive=True)
        for j, s in enumerate(t.samples_us):
            _finite(f"{where}.samples_us[{j}]", s)
    if p.gpu_device:
        for memory in ("pinned", "pageable"):   # the cost model fits a line to host-to-device copies of each
            points = sorted((t.n_bytes, t.t_us) for t in p.transfers if t.direction == "h2d" and t.memory == memory)
            if len({n for n, _ in points}) < 2:
                raise ValueError(f"transfers: fewer than two sizes of h2d {memory} copies (the GPU {p.gpu_device} "
                                 f"needs them)")
            if points[-1][1] < points[0][1]:
                raise ValueError(f"transfers: h2d {memory} copies of {points[-1][0]} bytes take less time than "
                                 f"copies of {points[0][0]} bytes")
    for i, arm in enumerate(p.calibration):
        where = f"calibration[{i}]"
        for j, t in enumerate(arm.decode_us_per_token):
            _finite(f"{where}.decode_us_per_token[{j}]", t, positive=True)
        for name, t in arm.components_us.items():
            _finite(f"{where}.components_us.{name}", t)
        _at_least(f"{where}.n_crossings", arm.n_crossings, 0)


def _finite(where: str, value: float, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{where} is {value!r}, not a {'positive' if positive else 'non-negative'} finite number")


def _at_least(where: str, value: int, least: int) -> None:
    if value < least:
        raise ValueError(f"{where} is {value}, less than {least}")


def _known_device(where: str, device: str, devices: tuple[str, ...]) -> None:
    if device not in devices:
        raise ValueError(f"{where}: device {device!r} is not one of the profile's devices ({', '.join(devices)})")


# ---------------------------------------------------------------------------------------------------------------
# Bench (what `bench` measured)

@dataclass(frozen=True)
class BenchArm:
    name: str                     # "oatoplan plan", "llama-cpp-python defaults", ...
    flags: str                    # the equivalent llama.cpp flags
    plan: Plan                    # exactly what was loaded
    prediction: Prediction | None
    vram_bytes: int               # GPU memory in use after loading and a warm-up, less what was in use before
    prefill_tokens_per_s: tuple[float, ...]   # one sample per repetition
    decode_tokens_per_s: tuple[float, ...]
    # what llama.cpp reported allocating per device (weights, KV, compute, output buffers): unlike vram_bytes, no
    # process-wide allocations (CUDA context, library workspaces) can land in it
    allocated_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchResult:
    schema_version: int
    created_utc: str
    machine: MachineIdentity
    model: ModelIdentity
    workload: Workload
    budget_bytes: int | None
    reps: int
    mode: str                     # "interleaved" (A B A B ...) or "sequential" (when the arms do not fit together)
    arms: tuple[BenchArm, ...]
    command: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Doctor (what `doctor` found)

@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""                 # what to do when not ok


@dataclass(frozen=True)
class Diagnosis:
    schema_version: int
    checks: tuple[Check, ...]


# ---------------------------------------------------------------------------------------------------------------
# JSON in and out

def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=1) + "\n"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)     # resolving the annotations is most of the time of reading a profile


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Build a value of type `tp` from parsed JSON; raises ValueError naming `where` on a mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object")
        hints = _type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _convert(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing field {f.name!r}")
        return tp(**kwargs)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_jsonable(cls: type[T], data: Any, source: str) -> T:
    """Check the schema version, then build `cls` and validate it; errors name `source` (a file path or a
    description) and the field."""
    kind = cls.__name__.lower()
    if not isinstance(data, dict):
        raise ArtifactError(f"{source}: not a {kind} (expected a JSON object)")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{source}: {kind} schema_version {version!r} is not supported (this oatoplan reads "
                            f"version {SCHEMA_VERSION}); make it again with this version of oatoplan")
    try:
        obj = _convert(cls, data, kind)
        if cls in _VALIDATORS:
            _VALIDATORS[cls](obj)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{source}: invalid {kind}: {exc}; {_REMAKE.get(cls, 'write it again with oatoplan')}") \
            from None
    except RecursionError:
        raise ArtifactError(f"{source}: invalid {kind}: nested too deeply") from None
    return obj


_VALIDATORS = {Profile: validate_profile}
_REMAKE = {Profile: "measure it again (oatoplan profile)", Plan: "make it again (oatoplan plan)"}
# Artifact kinds for files.write_file (what an existing file at the output path must be to be replaced)
_KINDS = {Plan: "plan", Profile: "profile", BenchResult: "bench", ModelInventory: "inventory", Diagnosis: "diagnosis"}
READ_MAX_BYTES = 256 << 20    # no artifact is this large; a larger file is some other file passed by mistake


def read_json(cls: type[T], path: str | Path) -> T:
    """Read an artifact; any problem with the file (missing, not a regular file, not UTF-8, not JSON, nested too
    deeply, wrong fields or types, failed validation) is an ArtifactError naming it."""
    path = Path(path)
    kind = cls.__name__.lower()
    try:
        # O_NONBLOCK: a FIFO given by mistake is refused below instead of waited on
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{path}: is {describe_mode(st.st_mode)}, not a {kind} file; pass a {kind} JSON "
                                    f"file")
            if st.st_size > READ_MAX_BYTES:
                raise ArtifactError(f"{path}: {st.st_size} bytes is too large for a {kind}; pass a {kind} JSON file")
            raw = fh.read()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror})") from None
    if raw.startswith(GGUF_MAGIC):
        raise ArtifactError(f"{path}: is a GGUF model, not a {kind} JSON file; pass the {kind}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not UTF-8 text (byte {exc.start}), so not a {kind} JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: not a {kind}: its JSON is nested too deeply") from None
    return from_jsonable(cls, data, str(path))


def write_json(obj: Any, out: Output | str | Path) -> Path:
    """Write an artifact through files.write_file (atomic; refuses inputs, special files, files of another kind);
    `out` is an Output (with the command's inputs and --force) or a plain path."""
    return write_file(out, dumps(obj), _KINDS.get(type(obj), "json"))


@dataclass(frozen=True)
class CpuTrace:
    """What oatoplan's CPU op timing (native/ggml-cpu/oato-trace.h) saw since its last reset: graph totals and, per
    ggml op name, thread 0's ns (node start to the end of the barrier after it), nodes (a fused span counts once,
    under its first op), fused spans, and the MUL_MAT weight bytes read."""
    n_graphs: int
    graph_ns: int
    start_ns: int                       # entry to the last thread's arrival, summed over graphs
    op_ns: dict[str, int]
    op_count: dict[str, int]
    op_fused: dict[str, int]
    op_weight_bytes: dict[str, int]
