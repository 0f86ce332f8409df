"""Artifacts as strict JSON: every dataclass of schema.py written (through files.write_file: atomic, never over a
file it must not replace) and read back with every field's type checked, unknown fields refused, and a profile
validated (finite, positive times and rates, every op on every device), so that a damaged or hand-edited file is one
line naming it and the field, never a traceback deeper in."""

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
from pathlib import Path
from typing import Any, TypeVar

from .errors import ArtifactError
from .files import GGUF_MAGIC, Output, describe_mode, write_file
from .schema import SCHEMA_VERSION, BenchResult, Diagnosis, ModelInventory, Plan, Profile

T = TypeVar("T")


# Ops a profile times on each of its devices (the cost model looks each one up), and the dimensions of their shapes.
PROFILE_OPS = ("MUL_MAT", "FLASH_ATTN_EXT", "RMS_NORM", "MUL", "ADD", "GLU", "ROPE", "SET_ROWS", "GET_ROWS")
PROFILE_OP_DIMS = {"MUL_MAT": 2, "FLASH_ATTN_EXT": 4,     # any other op: (elements per token,)
                   "MUL_MAT_ID": 4, "MOE_ROUTE": 2, "EXPERT_UPLOAD": 2}   # profile_moe.py
GPU_DEVICE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")   # ggml's device names: CUDA0, Vulkan0, Metal, ...
RPC_DEVICE_NAME = re.compile(r"^RPC\[([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):([0-9]{1,5})\]$")   # RPC[host:port]


def validate_profile(p: Profile) -> None:
    """Raise ValueError naming the field where `p` cannot drive the cost model: a time or rate that is not a finite
    positive number (NaN, negative, zero), a device other than CPU and the profiled GPU, an op missing on a device,
    too few transfer sizes to fit a line to where a GPU is named."""
    devices = ("CPU",) + ((p.gpu_device,) if p.gpu_device else ()) + tuple(d.device for d in p.devices)
    if p.gpu_device and (p.gpu_device == "CPU" or not GPU_DEVICE_NAME.match(p.gpu_device)):
        raise ValueError(f"gpu_device {p.gpu_device!r} is not a ggml GPU device name (e.g. CUDA0)")
    for i, link in enumerate(p.devices):
        where = f"devices[{i}]"
        if not (GPU_DEVICE_NAME.match(link.device) or RPC_DEVICE_NAME.match(link.device)):
            raise ValueError(f"{where}.device {link.device!r} is not a ggml GPU name (CUDA1) or RPC[host:port]")
        if devices.count(link.device) > 1:
            raise ValueError(f"{where}.device {link.device!r} is listed twice")
        _at_least(f"{where}.total_bytes", link.total_bytes, 0)
        for name in ("crossing_us", "decode_crossing_us"):
            _finite(f"{where}.{name}", getattr(link, name))
        for name in ("h2d_bytes_per_s", "d2h_bytes_per_s"):
            _finite(f"{where}.{name}", getattr(link, name), positive=True)
        if link.decode_class not in ("cpu", "gpu"):
            raise ValueError(f"{where}.decode_class {link.decode_class!r} is not cpu or gpu")
    _at_least("n_threads", p.n_threads, 1)
    _at_least("machine.n_cpu_threads", p.machine.n_cpu_threads, 1)
    for name in ("ram_bytes", "gpu_total_bytes"):
        _at_least(f"machine.{name}", getattr(p.machine, name), 0)
    _at_least("gpu_reserved_bytes", p.gpu_reserved_bytes, 0)
    _finite("cpu_read_bytes_per_s", p.cpu_read_bytes_per_s, positive=True)
    for name in ("crossing_us", "duration_s", "decode_crossing_us", "host_read_bytes_per_s"):
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
        if t.direction not in ("h2d", "d2h") or t.memory not in ("pinned", "pageable", "pinned-busy"):
            raise ValueError(f"{where}: direction {t.direction!r} / memory {t.memory!r} is not h2d or d2h / "
                             f"pinned, pageable or pinned-busy (copied while the GPU computes)")
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
_REMAKE = {Profile: "measure it again (oatoplan profile run)", Plan: "make it again (oatoplan plan)"}
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
