"""What this installation can do: llama-cpp-python version, llama.cpp build and CPU features, devices with their
memory, and a profile for this machine. Entry point: `diagnose()` -> Diagnosis."""

from __future__ import annotations

import re
from pathlib import Path

from .build import series, series_hash
from .errors import OatoError
from .machine import devices, llama_cpp_build, loaded_series
from .profile import find_profile
from .schema import SCHEMA_VERSION, Check, Diagnosis

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

PINNED_LLAMA_CPP_PYTHON = "0.3.36"


def diagnose(profiles_dir: Path = Path("profiles")) -> Diagnosis:
    checks = [Check("llama-cpp-python", llama_cpp.__version__ == PINNED_LLAMA_CPP_PYTHON,
                    f"{llama_cpp.__version__} ({Path(llama_cpp.__file__).parent})",
                    f"pip install llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON} (oatoplan's ctypes bindings and "
                    f"plans target that release)")]
    checks.append(Check("llama.cpp build", True, llama_cpp_build()))
    carried = loaded_series()
    expected = series_hash(series())
    checks.append(Check("oatoplan patches", carried is not None and carried.startswith(expected + ":"),
                        f"series {carried}" if carried else "none: this is the stock llama.cpp",
                        f"oatoplan build --cpu (or --cuda) builds and installs the patched library (series "
                        f"{expected}); everything else works without it"))
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = sorted(set(re.findall(r"(\w+) = 1", info)))
    checks.append(Check("CPU features", True, ", ".join(features) or info.strip()))
    gpus = [d for d in devices() if d.type in ("GPU", "IGPU")]
    for d in devices():
        checks.append(Check(f"device {d.name}", True, f"{d.description}: {d.free_bytes / 2**30:.1f} GiB free of "
                                                      f"{d.total_bytes / 2**30:.1f} GiB"))
    if not gpus:
        checks.append(Check("GPU backend", False, "this llama-cpp-python has no GPU backend",
                            "install a CUDA build: CMAKE_ARGS='-DGGML_CUDA=on' pip install --no-binary :all: "
                            f"llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}; CPU-only plans still run"))
    try:
        found = find_profile(None) if profiles_dir.exists() else None
        checks.append(Check("profile", found is not None, found.profile_id if found else "no profiles/ directory",
                            "oatoplan profile run --model MODEL.gguf"))
    except OatoError as exc:
        checks.append(Check("profile", False, str(exc), "oatoplan profile run --model MODEL.gguf"))
    return Diagnosis(SCHEMA_VERSION, tuple(checks))
