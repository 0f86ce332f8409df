"""llama.cpp's RPC backend (ggml-rpc): another process's device 0, served by `rpc-server` on this or another machine,
as a device of this process, named RPC[host:port] in plans and profiles. Entry points: `register_rpc_servers`
(probe, then register in libllama's own ggml registry), `find_rpc_server` and `run_rpc_server` (the rpc-server
binary `oatoplan build` compiled for the installed llama-cpp-python).

ggml aborts the whole process when an endpoint does not answer or speaks another protocol version, so every endpoint
is probed from Python first (TCP connect + the protocol's HELLO) and only then handed to ggml. An rpc-server serves
one client at a time: once registered, this process holds the connection until it exits.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import ggml
from .errors import BackendError, RpcError
from .machine import RPC_REGISTRY, devices, rpc_device_name
from .paths import build_cache_dir
from .schema import Device

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
# ggml-rpc.h of the vendored llama.cpp: a client refuses a server of another major or of a newer minor version
PROTO_MAJOR, PROTO_MINOR = 7, 0
# the handshake (ggml-rpc.cpp): | cmd u8 = RPC_CMD_HELLO | size u64 | conn_caps[24] | -> | size u64 | major minor
# patch padding u8 | conn_caps[24] |; all-zero caps ask for no transport upgrade
_HELLO_CMD, _CAPS_BYTES = 14, 24
PROBE_TIMEOUT_S = 5.0
# beside each cached wheel (build.py): the binary and what it was linked against
RPC_SERVER_BINARY = "rpc-server"
RPC_SERVER_RECORD = "rpc-server.json"
RPC_SERVER_RECORD_VERSION = 1
_ENDPOINT = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")
# endpoint -> ggml_backend_reg_t registered in this process (ggml would register a second copy of the same devices)
_registered: dict[str, int] = {}


@dataclass(frozen=True)
class RpcServerRecord:
    """What `oatoplan build` wrote beside an rpc-server binary: the sha256 of each ggml library of the wheel it was
    linked against (llama_cpp/lib/<name>), so that it is only run against that very build."""
    schema_version: int
    binary: str
    libs: dict[str, str]
    built_utc: str


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """("host", port) of "host:port"; an RpcError for anything else."""
    match = _ENDPOINT.fullmatch(endpoint.strip())
    if not match or not 1 <= int(match.group("port")) <= 65535:
        raise RpcError(f"RPC endpoint {endpoint!r} is not host:port (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return match.group("host").strip("[]"), int(match.group("port"))


def probe(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """Connect to an rpc-server and say HELLO: its protocol version (major, minor, patch). An RpcError when nothing
    answers there (or the server is busy with another client), or a server of an incompatible version does."""
    host, port = parse_endpoint(endpoint)
    start = f"start it with `oatoplan rpc-server --port {port}` there"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack("<BQ", _HELLO_CMD, _CAPS_BYTES) + bytes(_CAPS_BYTES))
            reply = _receive(sock, 8 + 4 + _CAPS_BYTES)
    except OSError as exc:
        busy = " (or it serves another client)" if isinstance(exc, TimeoutError) else ""
        raise RpcError(f"RPC server {endpoint} does not answer{busy}: {start}") from None
    size, major, minor, patch = struct.unpack("<QBBB", reply[:11])
    if size != 4 + _CAPS_BYTES:
        raise RpcError(f"{endpoint} answers, but not as a llama.cpp RPC server: {start}")
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise RpcError(f"RPC server {endpoint} speaks protocol {major}.{minor}.{patch}, this llama.cpp "
                       f"{PROTO_MAJOR}.{PROTO_MINOR}: run the rpc-server of the same llama.cpp there "
                       f"(`oatoplan rpc-server` after `oatoplan build`)")
    return major, minor, patch


def _receive(sock: socket.socket, n_bytes: int) -> bytes:
    data = b""
    while len(data) < n_bytes:
        chunk = sock.recv(n_bytes - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def register_rpc_servers(endpoints: Sequence[str]) -> list[Device]:
    """Make each endpoint's device 0 a device of this process (what llama.cpp's `--rpc` does), in order, once per
    endpoint per process; the Devices, named RPC[host:port]. Every new endpoint is probed before ggml sees it."""
    lib = ggml.lib()
    rpc_reg = lib.ggml_backend_reg_by_name(RPC_REGISTRY.encode())
    if not rpc_reg:
        raise BackendError("this llama-cpp-python was built without the RPC backend; run `oatoplan build` "
                           "(it builds with -DGGML_RPC=ON)")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        lib.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server"))
    for endpoint in dict.fromkeys(e.strip() for e in endpoints):
        if endpoint in _registered:
            continue
        probe(endpoint)
        server_reg = add_server(endpoint.encode())
        n_devices = lib.ggml_backend_reg_dev_count(server_reg) if server_reg else 0
        if n_devices != 1:
            raise RpcError(f"RPC server {endpoint} has {n_devices} devices; oatoplan uses servers of one device: "
                           f"restart it with one (`oatoplan rpc-server --device CUDA0` or `--device CPU`)")
        lib.ggml_backend_register(server_reg)
        _registered[endpoint] = server_reg
        log.info("registered RPC server %s", endpoint)
    by_name = {d.name: d for d in devices()}
    return [by_name[rpc_device_name(e.strip())] for e in endpoints]


def installed_lib_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python (its libllama and ggml libraries)."""
    if llama_cpp is None:
        raise RpcError("llama-cpp-python is not installed here; run `oatoplan build`")
    return Path(llama_cpp.__file__).resolve().parent / "lib"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_server_record(directory: Path) -> RpcServerRecord | None:
    """The record beside an rpc-server binary in `directory`, None when there is none or it is unreadable."""
    try:
        record = RpcServerRecord(**json.loads((directory / RPC_SERVER_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    ok = record.schema_version == RPC_SERVER_RECORD_VERSION and record.binary == RPC_SERVER_BINARY and \
        isinstance(record.libs, dict) and (directory / record.binary).is_file()
    return record if ok else None


def write_server_record(directory: Path, libs: dict[str, str], built_utc: str) -> RpcServerRecord:
    record = RpcServerRecord(RPC_SERVER_RECORD_VERSION, RPC_SERVER_BINARY, libs, built_utc)
    (directory / RPC_SERVER_RECORD).write_text(json.dumps(dataclasses.asdict(record), indent=1) + "\n")
    return record


def find_rpc_server(cache_dir: Path | None = None) -> Path:
    """The rpc-server binary that `oatoplan build` linked against the installed llama-cpp-python's very libraries
    (their sha256 as recorded), among the cached builds."""
    lib_dir = installed_lib_dir()
    if llama_cpp is None or not llama_cpp.llama_supports_rpc():
        raise RpcError("the installed llama-cpp-python has no RPC backend; run `oatoplan build`")
    wheels = (cache_dir or build_cache_dir()) / "wheels"
    records = [(d, r) for d in sorted(wheels.glob("*")) if (r := read_server_record(d)) is not None]
    hashes: dict[str, str] = {}
    for directory, record in records:
        for name in record.libs:
            if name not in hashes:
                hashes[name] = file_sha256(lib_dir / name) if (lib_dir / name).is_file() else ""
        if all(hashes[name] == sha for name, sha in record.libs.items()):
            return directory / record.binary
    if records:
        raise RpcError(f"no rpc-server in {wheels} was built with the installed llama-cpp-python ({lib_dir}); run "
                       f"`oatoplan build` (with the options of the installed build) to make one")
    raise RpcError(f"no rpc-server in {wheels}; run `oatoplan build` to make one")


def rpc_server_command(host: str, port: int, device: str | None, threads: int | None,
                       cache_dir: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The rpc-server command line and environment (the installed library directory first on LD_LIBRARY_PATH)."""
    binary = find_rpc_server(cache_dir)
    argv = [str(binary), "-H", host, "-p", str(port)]
    argv += ["-d", device] if device else []
    argv += ["-t", str(threads)] if threads else []
    paths = [str(installed_lib_dir())] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return argv, {**os.environ, "LD_LIBRARY_PATH": ":".join(paths)}


def run_rpc_server(host: str, port: int, device: str | None, threads: int | None) -> None:
    """Replace this process with rpc-server (so that Ctrl+C and kill reach the server itself); returns only on an
    error."""
    argv, env = rpc_server_command(host, port, device, threads)
    log.info("running %s", " ".join(argv))
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        raise RpcError(f"could not run {argv[0]} ({exc.strerror}); run `oatoplan build` again") from None
