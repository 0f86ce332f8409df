"""Build the patched llama-cpp-python: the pinned sdist (sha256 checked), our patch series (package data:
oatoplan/patches, oatoplan/native), a wheel built with CMake options for this machine, cached by (sdist, series,
options) with its sha256 recorded beside it, installed into this environment. Entry point: `build(...)` -> BuildResult.

Offline-friendly: `sdist` may be a local file, and `build_isolation=False` uses the build tools already installed
(scikit-build-core, cmake, ninja), as on the GPU machine, which has no network.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .paths import NATIVE_DIR, PATCHES_DIR, build_cache_dir
from .rpc import RPC_SERVER_BINARY, RPC_SERVER_RECORD, file_sha256, read_server_record, write_server_record

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# sha256 of the sdist as PyPI serves it (https://pypi.org/simple/llama-cpp-python/, 2026-11-22)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
INDEX_URL = "https://pypi.org/simple/llama-cpp-python/"
# native/X (paths.NATIVE_DIR) is copied here, relative to the source tree, before the series is applied (the patches
# wire the files into the build)
NATIVE_DEST = Path("vendor") / "llama.cpp" / "ggml" / "src"
# beside each cached wheel: its sha256 as built, checked before the wheel is used again
WHEEL_RECORD = "wheel.json"
WHEEL_RECORD_VERSION = 1
# CMAKE_CUDA_ARCHITECTURES: one of CMake's special values, or a ;-separated list of compute capabilities (90, 90a,
# 120f), each optionally -real (SASS only) or -virtual (PTX only)
# rpc-server (llama.cpp's tools/rpc; llama-cpp-python's CMake never builds tools): one source file, compiled against
# the wheel's own ggml libraries so that it speaks the very RPC protocol and runs the very kernels of that build
RPC_SERVER_SOURCE = Path("vendor") / "llama.cpp" / "tools" / "rpc" / "rpc-server.cpp"
GGML_INCLUDE = Path("vendor") / "llama.cpp" / "ggml" / "include"
_WHEEL_GGML_LIB = re.compile(r"llama_cpp/lib/(libggml[\w-]*\.so\.0)")
_CUDA_ARCH = re.compile(r"native|all|all-major|\d+[af]?(?:-real|-virtual)?(?:;\d+[af]?(?:-real|-virtual)?)*")


@dataclass(frozen=True)
class BuildResult:
    wheel: Path
    series_hash: str
    cmake_args: str
    cached: bool
    seconds: float
    rpc_server: Path | None = None     # beside the wheel; None when not asked for


@dataclass(frozen=True)
class WheelRecord:
    """What `build` wrote into a cache directory: the wheel's file name and sha256 as built."""
    schema_version: int
    wheel: str
    sha256: str
    series_hash: str
    cmake_args: str
    built_utc: str


def series(patches_dir: Path = PATCHES_DIR) -> list[Path]:
    """The patches named in `series`, in order (blank lines and # comments skipped)."""
    listing = patches_dir / "series"
    if not listing.exists():
        raise BuildError(f"{listing}: no series file; {patches_dir} must list its patches in order")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")]
    missing = [n for n in names if not (patches_dir / n).exists()]
    if missing:
        raise BuildError(f"{listing} names {missing[0]}, which is not in {patches_dir}")
    return [patches_dir / n for n in names]


def native_sources(native_dir: Path = NATIVE_DIR) -> list[Path]:
    """Our C/C++/CUDA files under native/ (sorted; README files are documentation, not sources)."""
    if not native_dir.is_dir():
        return []
    return sorted(p for p in native_dir.rglob("*") if p.is_file() and p.suffix in (".c", ".h", ".cpp", ".cu", ".cuh"))


def series_hash(patches: list[Path], native_dir: Path = NATIVE_DIR) -> str:
    """16 hex digits naming the patches and the native sources they compile."""
    digest = hashlib.sha256()
    for p in patches:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    for f in native_sources(native_dir):
        digest.update(f.relative_to(native_dir).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def check_cuda_arch(cuda_arch: str) -> str:
    """`cuda_arch` if it is a CMAKE_CUDA_ARCHITECTURES value (it goes into CMAKE_ARGS, which is split on spaces)."""
    if not _CUDA_ARCH.fullmatch(cuda_arch):
        raise BuildError(f"--cuda-arch {cuda_arch!r} is not a CUDA architecture list; give compute capabilities "
                         f"separated by ';' (e.g. 90, or '86;89', optionally 90-real / 90-virtual), or native, all, "
                         f"all-major")
    return cuda_arch


def cmake_args(cuda: bool, cuda_arch: str | None, native: bool = False) -> str:
    """CMake options: CUDA for the given architectures; CPU code for any x86-64 machine of the last decade
    (GGML_CPU_ALL_VARIANTS would need GGML_BACKEND_DL, which llama-cpp-python's loader does not do), or with
    `native` for this machine's CPU only (the wheel's cache key then includes the CPU's feature flags)."""
    if cuda_arch is not None and not cuda:
        raise BuildError(f"--cuda-arch {cuda_arch} needs --cuda (a CPU-only build has no CUDA architectures)")
    portable = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    args = ["-DGGML_NATIVE=ON"] if native else portable
    args += ["-DGGML_RPC=ON"]   # the RPC backend (statically registered in libggml) and rpc-server's library
    if cuda:
        args += ["-DGGML_CUDA=ON"]
        args += [f"-DCMAKE_CUDA_ARCHITECTURES={check_cuda_arch(cuda_arch)}"] if cuda_arch is not None else []
    return " ".join(args)


def cache_key(origin: str, digest: str, options: str, native: bool = False) -> str:
    """16 hex digits naming a wheel in the cache: the source (sdist hash or tree path), the series, the CMake
    options, this Python's version and, for -march=native wheels, this CPU's flags."""
    cpu = f"|{_cpu_flags()}" if native else ""
    return hashlib.sha256(f"{origin}|{digest}|{options}|{sys.version_info[:2]}{cpu}".encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), so that a -march=native wheel is never taken from a cache another CPU
    filled."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def check_sdist(path: Path) -> Path:
    if not path.is_file():
        raise BuildError(f"{path}: no such file; pass the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
    digest = file_sha256(path)
    if digest != SDIST_SHA256:
        raise BuildError(f"{path}: sha256 {digest[:16]}... is not the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
                         f"sdist ({SDIST_SHA256[:16]}...); download it again")
    return path


def fetch_sdist(cache_dir: Path) -> Path:
    """The pinned sdist from PyPI (its simple JSON index names the file's URL), kept in the cache."""
    cached = cache_dir / "sdist" / SDIST_NAME
    if cached.exists():
        return check_sdist(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        request = urllib.request.Request(INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        url = next(f["url"] for f in files if f["filename"] == SDIST_NAME)
        log.info("downloading %s", url)
        partial = cached.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
        partial.replace(cached)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise BuildError(f"could not download {SDIST_NAME} from PyPI ({exc}); pass --sdist FILE") from None
    return check_sdist(cached)


def apply_series(source: Path, patches: list[Path], digest: str, native_dir: Path = NATIVE_DIR) -> None:
    """Copy native/ into the tree, apply each patch with `patch -p1` (a dry run first, so a patch that does not
    apply changes nothing), then write src/oato-series.h naming the series."""
    for f in native_sources(native_dir):
        dest = source / NATIVE_DEST / f.relative_to(native_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    for p in patches:
        for dry in (True, False):
            if shutil.which("patch"):
                cmd = ["patch", "-p1", "--forward", "--batch", "--silent", "--fuzz=0", "-i", str(p)]
                cmd += ["--dry-run"] if dry else []
            else:   # git apply is as strict (no fuzz) and works outside a repository
                cmd = ["git", "apply", "-p1"] + (["--check"] if dry else []) + [str(p)]
            run = subprocess.run(cmd, cwd=source, capture_output=True, text=True)
            if run.returncode != 0:
                raise BuildError(f"patch {p.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}: "
                                 f"{(run.stdout + run.stderr).strip().splitlines()[0]}; fix or drop it in "
                                 f"{p.parent / 'series'}")
    header = source / "vendor" / "llama.cpp" / "src" / "oato-series.h"
    names = ",".join(p.stem for p in patches)
    header.write_text(f'#pragma once\n#define OATO_PATCH_SERIES "{digest}:{names}"\n')


def record_wheel(wheel: Path, digest: str, options: str) -> WheelRecord:
    """Write WHEEL_RECORD beside a freshly built `wheel` (atomically: a half-written record is never read)."""
    record = WheelRecord(WHEEL_RECORD_VERSION, wheel.name, file_sha256(wheel), digest, options, _utc_now())
    fd, tmp = tempfile.mkstemp(dir=wheel.parent, prefix=".wheel-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(dataclasses.asdict(record), indent=1) + "\n")
        os.replace(tmp, wheel.parent / WHEEL_RECORD)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


def cached_wheel(wheel_dir: Path) -> Path | None:
    """The wheel recorded in `wheel_dir` after its sha256 was checked against the record; None when no record is
    there (nothing cached, an interrupted build, or a wheel cached by an older oatoplan: it is built again)."""
    record_file = wheel_dir / WHEEL_RECORD
    if not record_file.is_file():
        if any(wheel_dir.glob("*.whl")):
            log.warning("%s: a wheel without a sha256 record (an interrupted build or an older oatoplan); building "
                        "it again", wheel_dir)
        return None
    fix = f"delete {wheel_dir} and run oatoplan build again"
    try:
        record = WheelRecord(**json.loads(record_file.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise BuildError(f"{record_file}: not a wheel record ({exc}); {fix}") from None
    if record.schema_version != WHEEL_RECORD_VERSION or not isinstance(record.wheel, str) or \
            not re.fullmatch(r"llama_cpp_python-[\w.+-]+\.whl", record.wheel):
        raise BuildError(f"{record_file}: not a wheel record of this oatoplan; {fix}")
    wheel = wheel_dir / record.wheel
    if not wheel.is_file():
        raise BuildError(f"{wheel}: recorded in {record_file} but missing; {fix}")
    actual = file_sha256(wheel)
    if actual != record.sha256:
        raise BuildError(f"{wheel}: sha256 {actual[:16]}... is not the {str(record.sha256)[:16]}... recorded when it "
                         f"was built (the file changed in the cache); {fix}")
    return wheel


def cxx_compiler() -> str:
    """The C++ compiler that builds rpc-server: $CXX, else g++."""
    name = os.environ.get("CXX") or "g++"
    found = shutil.which(name)
    if not found:
        raise BuildError(f"no C++ compiler ({name}) to build rpc-server and llama-cpp-python: install one (Debian/"
                         f"Ubuntu: apt install g++; Fedora: dnf install gcc-c++) or set CXX, then run oatoplan build "
                         f"again")
    return found


def compile_rpc_server(tree: Path, wheel: Path, cxx: str) -> Path:
    """Compile the patched tree's rpc-server.cpp against the wheel's own ggml libraries (llama_cpp/lib/libggml*.so.0)
    into the wheel's cache directory, and record their sha256 beside it (rpc.find_rpc_server matches them against
    the installed build)."""
    dest = wheel.parent
    (dest / RPC_SERVER_RECORD).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="oatoplan-rpc-") as tmp:
        libs = {}
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                match = _WHEEL_GGML_LIB.fullmatch(member)
                if match:
                    (Path(tmp) / match.group(1)).write_bytes(archive.read(member))
                    libs[match.group(1)] = file_sha256(Path(tmp) / match.group(1))
        if "libggml-rpc.so.0" not in libs:
            raise BuildError(f"{wheel.name} has no libggml-rpc.so.0 (built without -DGGML_RPC=ON); delete "
                             f"{wheel.parent} and run oatoplan build again")
        partial = Path(tmp) / RPC_SERVER_BINARY
        # -rpath-link: libggml's own dependencies (libggml-cpu, -rpc) are found at link time among the wheel's;
        # CUDA's libraries of libggml-cuda only at run time
        cmd = [cxx, "-std=c++17", "-O2", "-I", str(tree / GGML_INCLUDE), str(tree / RPC_SERVER_SOURCE), "-o",
               str(partial), "-pthread", "-L", tmp, "-l:libggml.so.0", "-l:libggml-base.so.0",
               f"-Wl,-rpath-link,{tmp}", "-Wl,--allow-shlib-undefined", "-Wl,-rpath,$ORIGIN"]
        log.info("compiling rpc-server: %s", " ".join(cmd))
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            log.error("compiler output (last lines):\n%s", "\n".join(run.stderr.strip().splitlines()[-20:]))
            raise BuildError(f"compiling rpc-server with {cxx} failed; run with --debug to see the compiler output")
        binary = Path(shutil.move(str(partial), dest / RPC_SERVER_BINARY))
    write_server_record(dest, libs, _utc_now())
    return binary


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _patched_tree(tmp: str, source: Path | None, sdist: Path | None, cache_dir: Path, patches: list[Path],
                  digest: str) -> Path:
    """The llama-cpp-python tree (a copy of `source`, else the sdist unpacked) with the series applied, under tmp."""
    tree = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if source is not None:
        if not (Path(source) / "vendor" / "llama.cpp").is_dir():
            raise BuildError(f"{source}: not a llama-cpp-python source tree (no vendor/llama.cpp)")
        shutil.copytree(source, tree, symlinks=True)
    else:
        with tarfile.open(check_sdist(sdist) if sdist else fetch_sdist(cache_dir)) as archive:
            archive.extractall(tmp, filter="data")
    apply_series(tree, patches, digest)
    return tree


def build(*, cuda: bool, cuda_arch: str | None = None, sdist: Path | None = None, source: Path | None = None,
          install: bool = True, build_isolation: bool = True, cache_dir: Path | None = None,
          patches_dir: Path = PATCHES_DIR, native: bool = False, rpc_server: bool = True) -> BuildResult:
    """Build (or take from the cache) and install the patched wheel, and with `rpc_server` the rpc-server binary
    beside it (compiled once per cached wheel). `source`: an unpacked (possibly trimmed) llama-cpp-python 0.3.36
    tree instead of the sdist, copied before patching (not checksummed: the GPU machine gets a trimmed tree because
    the sdist is too big to carry). `cache_dir`: default paths.build_cache_dir()."""
    started = time.perf_counter()
    cache_dir = cache_dir or build_cache_dir()
    patches = series(patches_dir)
    digest = series_hash(patches)
    options = cmake_args(cuda, cuda_arch, native)
    origin = SDIST_SHA256 if source is None else f"tree:{Path(source).resolve()}"
    wheel_dir = cache_dir / "wheels" / cache_key(origin, digest, options, native)
    wheel = cached_wheel(wheel_dir)
    cached = wheel is not None
    server = read_server_record(wheel_dir) if cached and rpc_server else None
    cxx = cxx_compiler() if rpc_server and server is None else None     # before the long build, not after it
    if wheel is None or cxx is not None:
        with tempfile.TemporaryDirectory(prefix="oatoplan-build-") as tmp:
            tree = _patched_tree(tmp, source, sdist, cache_dir, patches, digest)
            if wheel is None:
                wheel = _build_wheel(tree, Path(tmp) / "dist", wheel_dir, digest, options, len(patches),
                                     build_isolation)
            if cxx is not None:
                compile_rpc_server(tree, wheel, cxx)
    if install:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(f"pip could not install {wheel.name}: {run.stderr.strip().splitlines()[-1]}")
    binary = wheel_dir / RPC_SERVER_BINARY if rpc_server else None
    return BuildResult(wheel, digest, options, cached, time.perf_counter() - started, binary)


def _build_wheel(tree: Path, out: Path, wheel_dir: Path, digest: str, options: str, n_patches: int,
                 build_isolation: bool) -> Path:
    """pip wheel of the patched tree with CMAKE_ARGS `options`, copied into the cache with its record."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(tree)]
    if not build_isolation:
        cmd.insert(4, "--no-build-isolation")
    log.info("building the patched wheel: CMAKE_ARGS=%r", options)
    run = subprocess.run(cmd, env={**os.environ, "CMAKE_ARGS": options}, capture_output=True, text=True)
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-20:])
        log.error("pip wheel output (last lines):\n%s", tail)
        raise BuildError(f"building llama-cpp-python with {n_patches} patches failed (CMAKE_ARGS "
                         f"{options}); run with --debug to see the compiler output")
    built = sorted(out.glob("llama_cpp_python-*.whl"))
    if len(built) != 1:
        raise BuildError(f"pip wheel made {len(built)} llama-cpp-python wheels, not one; run with --debug")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    (wheel_dir / RPC_SERVER_RECORD).unlink(missing_ok=True)     # linked against the wheel this one replaces
    wheel = Path(shutil.copy2(built[0], wheel_dir))
    record_wheel(wheel, digest, options)
    return wheel
