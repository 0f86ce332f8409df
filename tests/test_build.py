"""The patch pipeline without compiling: the series, its hash, applying it (and refusing a patch that does not
apply), the cache key inputs. The full build is a benchmark-like manual run (benchmarks/results/README.md)."""

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from oatoplan import build, paths


def test_shipped_series_is_complete_and_hashed():
    patches = build.series()
    assert [p.name for p in patches][0] == "0001-llama-oato-patch-series.patch"
    for p in patches:
        head = p.read_text().split("\n--- ", 1)[0]
        assert "Subject: [PATCH]" in head and "Why:" in head        # one change each, a header saying why
    assert len(build.series_hash(patches)) == 16


def _tree(tmp_path):
    source = tmp_path / "src"
    (source / "vendor" / "llama.cpp" / "src").mkdir(parents=True)
    (source / "vendor" / "llama.cpp" / "src" / "llama.cpp").write_text("int a;\nint b;\nint c;\n")
    return source


def _patches(tmp_path, body):
    d = tmp_path / "patches"
    d.mkdir()
    (d / "0001-x.patch").write_text("Subject: [PATCH] x\n\nWhy: test\n\n" + body)
    (d / "series").write_text("# comment\n0001-x.patch\n")
    return d


GOOD = """--- a/vendor/llama.cpp/src/llama.cpp
+++ b/vendor/llama.cpp/src/llama.cpp
@@ -1,3 +1,4 @@
 int a;
 int b;
 int c;
+int oato;
"""


def test_apply_series_patches_and_names_the_series(tmp_path):
    source = _tree(tmp_path)
    patches = build.series(_patches(tmp_path, GOOD))
    native = tmp_path / "native"
    (native / "ggml-cpu").mkdir(parents=True)
    (native / "ggml-cpu" / "oato-x.c").write_text("int x;\n")
    build.apply_series(source, patches, "abc", native)
    assert (source / "vendor/llama.cpp/src/llama.cpp").read_text().endswith("int oato;\n")
    assert '"abc:0001-x"' in (source / "vendor/llama.cpp/src/oato-series.h").read_text()
    assert (source / "vendor/llama.cpp/ggml/src/ggml-cpu/oato-x.c").read_text() == "int x;\n"


def test_series_hash_covers_native_sources(tmp_path):
    patches = build.series(_patches(tmp_path, GOOD))
    native = tmp_path / "native"
    native.mkdir()
    before = build.series_hash(patches, native)
    (native / "oato-x.c").write_text("int x;\n")
    assert build.series_hash(patches, native) != before
    suffixes = {f.suffix for f in build.native_sources()}
    assert suffixes == {".c", ".h", ".cu", ".cuh"}   # the CPU files and native/ggml-cuda's, README left out


def test_a_patch_that_does_not_apply_is_named_and_changes_nothing(tmp_path):
    source = _tree(tmp_path)
    patches = build.series(_patches(tmp_path, GOOD.replace(" int b;", " int zzz;")))
    with pytest.raises(build.BuildError, match="patch 0001-x.patch does not apply"):
        build.apply_series(source, patches, "abc")
    assert (source / "vendor/llama.cpp/src/llama.cpp").read_text() == "int a;\nint b;\nint c;\n"


def test_series_file_naming_a_missing_patch(tmp_path):
    d = tmp_path / "patches"
    d.mkdir()
    (d / "series").write_text("0002-gone.patch\n")
    with pytest.raises(build.BuildError, match="names 0002-gone.patch"):
        build.series(d)


def test_sdist_checksum_is_checked(tmp_path):
    fake = tmp_path / build.SDIST_NAME
    with tarfile.open(fake, "w:gz"):
        pass
    with pytest.raises(build.BuildError, match="sha256 .* is not the llama-cpp-python 0.3.36 sdist"):
        build.check_sdist(fake)


def test_cmake_args():
    assert "-DGGML_CUDA=ON" not in build.cmake_args(False, None)
    assert "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" in build.cmake_args(True, "90")
    assert "-DGGML_NATIVE=OFF" in build.cmake_args(False, None)
    assert "-DGGML_NATIVE=ON" in build.cmake_args(False, None, native=True)
    assert "AVX2" not in build.cmake_args(False, None, native=True)


def test_cache_key_inputs():
    digest = build.series_hash(build.series())
    options = build.cmake_args(False, None)
    key = build.cache_key(build.SDIST_SHA256, digest, options)
    assert key == hashlib.sha256(f"{build.SDIST_SHA256}|{digest}|{options}|{sys.version_info[:2]}".encode()
                                 ).hexdigest()[:16]
    assert build.cache_key(build.SDIST_SHA256, digest, options, native=True) != key
    assert build.cache_key(build.SDIST_SHA256, digest, build.cmake_args(True, "90")) != key


def test_package_data_holds_the_series():
    assert build.PATCHES_DIR == paths.PACKAGE_DIR / "patches" and build.NATIVE_DIR == paths.PACKAGE_DIR / "native"
    assert {f.name for f in build.native_sources()} >= {"oato-fused.c", "oato-matvec.c", "oato-trace.c"}


WHEEL_NAME = "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"


def _cache(tmp_path, content=b"a wheel", record=True):
    """A cache holding the CPU wheel of the shipped series, as `build` leaves it."""
    digest = build.series_hash(build.series())
    options = build.cmake_args(False, None)
    wheel = tmp_path / "wheels" / build.cache_key(build.SDIST_SHA256, digest, options) / WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(content)
    if record:
        build.record_wheel(wheel, digest, options)
    return wheel


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail on any pip run (building or installing): the cached wheel must be used, or refused, without one."""
    def refuse(cmd, *args, **kwargs):
        raise AssertionError(f"ran {cmd}")
    monkeypatch.setattr(build.subprocess, "run", refuse)


def test_cached_wheel_is_reused_without_building(tmp_path, no_subprocess):
    wheel = _cache(tmp_path)
    record = json.loads((wheel.parent / build.WHEEL_RECORD).read_text())
    assert record["wheel"] == WHEEL_NAME and record["sha256"] == hashlib.sha256(b"a wheel").hexdigest()
    result = build.build(cuda=False, install=False, cache_dir=tmp_path, rpc_server=False)
    assert result.cached and result.wheel == wheel


@pytest.mark.parametrize("tamper, message", [
    (lambda wheel: wheel.write_bytes(b"another wheel"), "sha256 .* is not the .* recorded when it was built"),
    (lambda wheel: wheel.unlink(), "recorded in .* but missing"),
    (lambda wheel: (wheel.parent / build.WHEEL_RECORD).write_text("{"), "not a wheel record"),
    (lambda wheel: (wheel.parent / build.WHEEL_RECORD).write_text('{"wheel": 1}'), "not a wheel record"),
    (lambda wheel: (wheel.parent / build.WHEEL_RECORD).write_text(
        (wheel.parent / build.WHEEL_RECORD).read_text().replace(WHEEL_NAME, "../../evil.whl")), "not a wheel record"),
])
def test_a_changed_cached_wheel_is_refused_not_installed(tmp_path, no_subprocess, tamper, message):
    wheel = _cache(tmp_path)
    tamper(wheel)
    with pytest.raises(build.BuildError, match=message) as refused:
        build.build(cuda=False, install=True, cache_dir=tmp_path, rpc_server=False)
    assert f"delete {wheel.parent} and run oatoplan build again" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_wheel_without_a_record_is_built_again(tmp_path, monkeypatch):
    """An interrupted build or an older oatoplan's cache: the wheel is not trusted, it is rebuilt (here: the sdist
    download is where the rebuild would start)."""
    _cache(tmp_path, record=False)

    def download(cache_dir):
        raise build.BuildError("rebuilding")
    monkeypatch.setattr(build, "fetch_sdist", download)
    with pytest.raises(build.BuildError, match="rebuilding"):
        build.build(cuda=False, install=False, cache_dir=tmp_path, rpc_server=False)


def test_a_built_wheel_is_recorded_then_reused(tmp_path, monkeypatch):
    """The build itself faked (apply_series and pip wheel), the cache bookkeeping real."""
    source = _tree(tmp_path)
    monkeypatch.setattr(build, "apply_series", lambda *args, **kwargs: None)
    runs = []

    def pip(cmd, env=None, **kwargs):
        runs.append(cmd)
        out = Path(cmd[cmd.index("-w") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / WHEEL_NAME).write_bytes(b"compiled")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(build.subprocess, "run", pip)
    first = build.build(cuda=False, source=source, install=False, cache_dir=tmp_path / "cache", rpc_server=False)
    assert not first.cached and first.wheel.read_bytes() == b"compiled" and len(runs) == 1
    record = json.loads((first.wheel.parent / build.WHEEL_RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(b"compiled").hexdigest() and record["series_hash"] == first.series_hash
    again = build.build(cuda=False, source=source, install=False, cache_dir=tmp_path / "cache", rpc_server=False)
    assert again.cached and again.wheel == first.wheel and len(runs) == 1


@pytest.mark.parametrize("arch", ["90", "86;89", "90-real", "89-virtual;90-real", "90a", "120f", "native", "all",
                                  "all-major"])
def test_cuda_arch_accepted(arch):
    assert f"-DCMAKE_CUDA_ARCHITECTURES={arch}" in build.cmake_args(True, arch)


@pytest.mark.parametrize("arch", ["", "90 -DGGML_NATIVE=ON", "86,89", "sm_90", "90;", ";90", "native;90", "90-realx",
                                  "$(touch x)", "9.0", "'90'"])
def test_cuda_arch_refused(arch):
    with pytest.raises(build.BuildError, match="is not a CUDA architecture list"):
        build.cmake_args(True, arch)


def test_cuda_arch_needs_cuda():
    with pytest.raises(build.BuildError, match="needs --cuda"):
        build.cmake_args(False, "90")


@pytest.mark.parametrize("args, message", [
    (["--cuda", "--cuda-arch", "90 -DX=1"], "--cuda-arch '90 -DX=1' is not a CUDA architecture list"),
    (["--cpu", "--cuda-arch", "90"], "--cuda-arch 90 needs --cuda"),
])
def test_build_cli_refuses_bad_cuda_arch(cli, tmp_path, monkeypatch, no_subprocess, args, message):
    monkeypatch.setenv("OATOPLAN_CACHE", str(tmp_path))
    result = cli(["build", *args, "--no-install"])
    assert result.exit_code == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())    # before any download


def test_source_tree_must_be_llama_cpp_python(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(build.BuildError, match="not a llama-cpp-python source tree"):
        build.build(cuda=False, source=tmp_path / "empty", install=False, cache_dir=tmp_path / "cache")


def _wheel_with_libs(tmp_path, libs):
    """A cached wheel (a real zip holding llama_cpp/lib/<name> files) of the shipped series, with its record."""
    digest = build.series_hash(build.series())
    options = build.cmake_args(False, None)
    wheel = tmp_path / "wheels" / build.cache_key(build.SDIST_SHA256, digest, options) / WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in libs.items():
            archive.writestr(f"llama_cpp/lib/{name}", data)
        archive.writestr("llama_cpp/__init__.py", "")
    build.record_wheel(wheel, digest, options)
    return wheel


RPC_LIBS = {"libggml.so.0": b"ggml", "libggml-base.so.0": b"base", "libggml-rpc.so.0": b"rpc"}


def test_rpc_server_is_compiled_once_beside_the_cached_wheel(tmp_path, monkeypatch):
    """The compiler faked, the rest real: the patched tree's rpc-server.cpp is linked against the wheel's own ggml
    libraries, its record names their sha256, and the next build reuses it."""
    wheel = _wheel_with_libs(tmp_path, RPC_LIBS)
    monkeypatch.setattr(build, "_patched_tree", lambda tmp, *args: Path(tmp))
    monkeypatch.setenv("CXX", sys.executable)       # any executable: which() must find it
    runs = []

    def cxx(cmd, **kwargs):
        runs.append(cmd)
        lib_dir = Path(cmd[cmd.index("-L") + 1])
        assert sorted(p.name for p in lib_dir.iterdir()) == sorted(RPC_LIBS)      # linked against the wheel's
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"binary")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(build.subprocess, "run", cxx)
    first = build.build(cuda=False, install=False, cache_dir=tmp_path)
    assert first.cached and first.rpc_server == wheel.parent / "rpc-server" and first.rpc_server.read_bytes() == b"binary"
    assert runs[0][0] == sys.executable and "-l:libggml.so.0" in runs[0] and runs[0][-1] == "-Wl,-rpath,$ORIGIN"
    assert any(a.endswith("tools/rpc/rpc-server.cpp") for a in runs[0]) and "-std=c++17" in runs[0]
    record = json.loads((wheel.parent / "rpc-server.json").read_text())
    assert record["libs"] == {name: hashlib.sha256(data).hexdigest() for name, data in RPC_LIBS.items()}
    again = build.build(cuda=False, install=False, cache_dir=tmp_path)
    assert again.rpc_server == first.rpc_server and len(runs) == 1


def test_a_wheel_without_the_rpc_backend_gets_no_rpc_server(tmp_path, monkeypatch):
    _wheel_with_libs(tmp_path, {"libggml.so.0": b"ggml"})
    monkeypatch.setattr(build, "_patched_tree", lambda tmp, *args: Path(tmp))
    monkeypatch.setenv("CXX", sys.executable)
    with pytest.raises(build.BuildError, match="has no libggml-rpc.so.0 .* delete .* and run oatoplan build again"):
        build.build(cuda=False, install=False, cache_dir=tmp_path)


def test_build_without_a_cxx_compiler_says_what_to_install(cli, tmp_path, monkeypatch, no_subprocess):
    _wheel_with_libs(tmp_path, RPC_LIBS)
    monkeypatch.setenv("OATOPLAN_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    result = cli(["build", "--cpu", "--no-install"])
    assert result.exit_code == 1 and "no C++ compiler (no-such-compiler-here)" in result.stderr
    assert "apt install g++" in result.stderr and len(result.stderr.strip().splitlines()) == 1
