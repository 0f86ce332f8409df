"""The machine and the llama.cpp build at hand: ggml's device registry (devices, their memory and buffer types) in the
very libggml that llama-cpp-python loaded, the identity of the machine and of the build (with oatoplan's patch
series, if it carries one), and the default thread count. Both the profiler and the loader ask here.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import socket
import subprocess

from . import ggml
from .errors import BackendError
from .graph import CPU
from .schema import Device, MachineIdentity, Profile

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

_GGML_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}
# ggml's RPC backend registry; its devices are another process's device 0, reached over TCP (rpc.py registers them)
RPC_REGISTRY = "RPC"
RPC = "RPC"     # Device.type of an RPC device (ggml says GPU): never counted as a local GPU
# llama.cpp's name of an RPC buffer type: RPC<device index on the server>[host:port]
_RPC_BUFFER = re.compile(r"RPC(\d+)\[(.+)\]")
RPC_PROBE_TIMEOUT_S = 1.0


def rpc_device_name(endpoint: str) -> str:
    """How plans and profiles name the device 0 of the RPC server at `endpoint` ("host:port")."""
    return f"RPC[{endpoint}]"


def _device_name(lib: ctypes.CDLL, dev: int) -> str:
    """ggml's name of a local device ("CPU", "CUDA0"); RPC[host:port] for an RPC device, whose ggml name ("RPCn") is
    a counter in registration order, while its description is the endpoint."""
    if lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode() == RPC_REGISTRY:
        return rpc_device_name(lib.ggml_backend_dev_description(dev).decode())
    return lib.ggml_backend_dev_name(dev).decode()


def _device_handles() -> dict[str, int]:
    """Every device of the loaded libggml by our name -> its ggml_backend_dev_t."""
    lib = ggml.lib()
    handles = (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))
    return {_device_name(lib, dev): dev for dev in handles}


def device_handle(device_name: str) -> int:
    """The ggml_backend_dev_t of a device by our name (for llama_model_params.devices)."""
    handles = _device_handles()
    if device_name not in handles:
        raise BackendError(f"device {device_name!r} is not in this llama.cpp build (it has {', '.join(handles)})")
    return handles[device_name]


def _answers(endpoint: str) -> bool:
    """Whether something listens at an RPC device's "host:port" (ggml's RPC client aborts the process when it asks a
    server that has gone away)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RPC_PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def devices() -> list[Device]:
    """The devices of the llama.cpp build that llama-cpp-python loaded, with free and total memory; RPC devices
    registered in this process as RPC[host:port] with the remote device's memory, 0 and 0 when its server no longer
    answers."""
    lib = ggml.lib()
    found = []
    for name, dev in _device_handles().items():
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        kind = RPC if name.startswith(f"{RPC}[") else _GGML_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "?")
        if kind != RPC or _answers(name[len(RPC) + 1:-1]):
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(Device(name, lib.ggml_backend_dev_description(dev).decode(), kind, free.value, total.value))
    return found


def gpu_devices() -> list[Device]:
    """This machine's own GPUs (RPC devices are not among them)."""
    return [d for d in devices() if d.type in ("GPU", "IGPU")]


def rpc_devices() -> list[Device]:
    """The RPC devices registered in this process (rpc.register_rpc_servers), in registration order."""
    return [d for d in devices() if d.type == RPC]


def buffer_type(device_name: str) -> int:
    """The default buffer type of a device (a ggml_backend_buffer_type_t), for tensor buffer-type overrides."""
    return ggml.lib().ggml_backend_dev_buffer_type(device_handle(device_name))


def buffer_device(buffer_type_name: str) -> str:
    """Device a llama.cpp buffer type lives on: host buffer types (CPU, CPU_Mapped, CPU_REPACK, CUDA_Host) -> CPU;
    RPC0[host:port] (the server's device 0) -> RPC[host:port]."""
    if buffer_type_name.startswith("CPU") or buffer_type_name.endswith("_Host"):
        return CPU
    rpc = _RPC_BUFFER.fullmatch(buffer_type_name)
    if rpc and rpc.group(1) == "0":
        return rpc_device_name(rpc.group(2))
    return buffer_type_name


def loaded_series() -> str | None:
    """The patch series of the llama.cpp that llama-cpp-python loaded ("hash:names"), None for a stock build."""
    try:
        fn = llama_cpp.llama_cpp._lib.oato_patch_series
    except AttributeError:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return fn().decode()


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (everything but `oatoplan build` needs it)."""
    return llama_cpp is not None and ggml.libggml is not None


def llama_cpp_build() -> str:
    """Identity of the llama.cpp build at hand; a plan solved for one build is refused by another. The llama.cpp
    sources are those llama-cpp-python's version vendors, so the version and oatoplan's patch series name them; ggml's
    commit string is left out: it reads "0c1e570-dirty" or "unknown" for the same sources, depending on whether the
    tree that was built carried its .git folder."""
    lib = ggml.lib()
    carried = loaded_series()
    return (f"llama-cpp-python {llama_cpp.__version__}, ggml {lib.ggml_version().decode()}"
            + (f", oatoplan patches {carried}" if carried else ""))


def physical_cores(cpuinfo: str, allowed: set[int] | None = None) -> int | None:
    """Physical cores in /proc/cpuinfo text: unique (physical id, core id) pairs over the processors in `allowed`
    (all if None). None when the text has no core ids (some ARM kernels, other systems)."""
    cores = set()
    for block in re.split(r"\n\s*\n", cpuinfo):
        fields = dict(re.findall(r"^([^:\n]+?)\s*:\s*(.*)$", block, re.M))
        if "processor" not in fields or "core id" not in fields:
            continue
        if allowed is None or (fields["processor"].isdigit() and int(fields["processor"]) in allowed):
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def default_threads() -> int:
    """The physical cores this process may run on: one thread per core (a second thread on a core's other
    hyperthread competes for the same execution units and memory bandwidth). Falls back to the logical CPUs where
    /proc/cpuinfo does not say. Virtual machines that report each vCPU as a core get one thread per vCPU."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/cpuinfo") as f:
            cores = physical_cores(f.read(), allowed)
    except OSError:
        cores = None
    return cores or (len(allowed) if allowed else os.cpu_count() or 1)


def logical_cpus() -> int:
    """What llama-cpp-python's defaults count from (multiprocessing.cpu_count())."""
    return os.cpu_count() or 1


def machine_identity(gpu_device: str | None) -> MachineIdentity:
    """CPU, RAM, the GPU `gpu_device` names (driver and PCIe link from nvidia-smi where there is one) and the build."""
    cpu_model = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", open("/proc/cpuinfo").read(), re.M)
        cpu_model = match.group(1).strip() if match else cpu_model
        ram_kib = int(re.search(r"^MemTotal:\s*(\d+)", open("/proc/meminfo").read(), re.M).group(1))
    except (OSError, AttributeError):
        ram_kib = 0
    gpu_name, gpu_total, driver, pcie = "", 0, "", ""
    if gpu_device:
        info = {d.name: d for d in devices()}[gpu_device]
        gpu_name, gpu_total = info.description, info.total_bytes
        driver, pcie = _nvidia_smi()
    return MachineIdentity(cpu_model, os.cpu_count() or 1, ram_kib * 1024, gpu_name, gpu_total, driver, pcie,
                           llama_cpp_build())


def _nvidia_smi() -> tuple[str, str]:
    if not shutil.which("nvidia-smi"):
        return "", ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,pcie.link.gen.max,pcie.link.width.max",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
        driver, gen, width = [x.strip() for x in out.splitlines()[0].split(",")]
        return driver, f"gen{gen} x{width}"
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return "", ""


def target_build(profile: Profile) -> str:
    """The llama.cpp build a plan is solved for, and that `load` will insist on: the one installed here, where plans
    are made to be loaded (a profile measured on another build of the same llama.cpp still prices it: plan_model
    notes the difference), or the profile's where no llama-cpp-python is installed."""
    return llama_cpp_build() if llama_cpp_available() else profile.machine.llama_cpp_build
