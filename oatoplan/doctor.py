"""What this installation can do: llama-cpp-python version, llama.cpp build and CPU features, devices with their
memory, and a profile for this machine. Entry point: `diagnose()` -> Diagnosis."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from . import ggml
from .build import series, series_hash
from .errors import OatoError
from .machine import devices, llama_cpp_build, loaded_series
from .paths import user_profile_dir
from .profile import find_profile
from .schema import SCHEMA_VERSION, Check, Diagnosis

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

PINNED_LLAMA_CPP_PYTHON = "0.3.36"


def cuda_arch_hint() -> str | None:
    """This machine's NVIDIA GPUs as a --cuda-arch value (compute capability 9.0 -> "90"; several: "86;89"), from
    nvidia-smi; None without nvidia-smi or an answer."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = {line.strip() for line in out.splitlines()}
    return ";".join(sorted((c.replace(".", "") for c in caps if re.fullmatch(r"\d+\.\d+", c)), key=int)) or None


def gpu_backend_fix(cuda_arch: str | None) -> str:
    """What to run for a GPU backend: oatoplan's own CUDA build (a stock llama-cpp-python would drop the patches)."""
    arch = f"'{cuda_arch}'" if cuda_arch and ";" in cuda_arch else cuda_arch
    how = (f"oatoplan build --cuda --cuda-arch {arch} (this machine's GPUs)" if cuda_arch else
           "oatoplan build --cuda --cuda-arch CC (CC: the GPU's compute capability, e.g. 90 for an H100, 89 for an "
           "RTX 40xx)")
    return (f"{how} builds and installs llama-cpp-python {PINNED_LLAMA_CPP_PYTHON} with CUDA and oatoplan's patches "
            f"(needs the CUDA toolkit); CPU-only plans still run")


def diagnose() -> Diagnosis:
    checks = [Check("llama-cpp-python", llama_cpp.__version__ == PINNED_LLAMA_CPP_PYTHON,
                    f"{llama_cpp.__version__} ({Path(llama_cpp.__file__).parent})",
                    f"oatoplan build --cpu (or --cuda) installs llama-cpp-python {PINNED_LLAMA_CPP_PYTHON} with "
                    f"oatoplan's patches (its ctypes bindings and plans target that release)")]
    checks.append(Check("llama.cpp build", True, llama_cpp_build()))
    carried = loaded_series()
    expected = series_hash(series())
    checks.append(Check("oatoplan patches", carried is not None and carried.startswith(expected + ":"),
                        f"series {carried}" if carried else "none: this is the stock llama.cpp",
                        f"oatoplan build --cpu (or --cuda) builds and installs the patched library (series "
                        f"{expected}); everything else works without it"))
    streaming = ggml.stream_stats() is not None
    detail = ("not in this build" if not streaming else "off: OATO_STREAM=0 is set"
              if os.environ.get("OATO_STREAM", "").startswith("0") else "on for plans that use it (OATO_STREAM=0: off)")
    checks.append(Check("weight streaming", streaming, detail,
                        "oatoplan build --cpu (or --cuda) builds the patched library with it (patches/0005)"))
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = sorted(set(re.findall(r"(\w+) = 1", info)))
    checks.append(Check("CPU features", True, ", ".join(features) or info.strip()))
    gpus = [d for d in devices() if d.type in ("GPU", "IGPU")]
    for d in devices():
        checks.append(Check(f"device {d.name}", True, f"{d.description}: {d.free_bytes / 2**30:.1f} GiB free of "
                                                      f"{d.total_bytes / 2**30:.1f} GiB"))
    if not gpus:
        checks.append(Check("GPU backend", False, "this llama-cpp-python has no GPU backend",
                            gpu_backend_fix(cuda_arch_hint())))
    try:
        checks.append(Check("profile", True, find_profile(None).profile_id))
    except OatoError as exc:
        checks.append(Check("profile", False, str(exc), f"oatoplan profile run --model MODEL.gguf (writes to "
                                                        f"{user_profile_dir()})"))
    return Diagnosis(SCHEMA_VERSION, tuple(checks))
