"""The patch pipeline without compiling: the series, its hash, applying it (and refusing a patch that does not
apply), the cache key inputs. The full build is a benchmark-like manual run (benchmarks/results/README.md)."""

import tarfile

import pytest

from oatoplan import build


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
    assert build.native_sources() and all(f.suffix in (".c", ".h") for f in build.native_sources())


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


def test_cached_wheel_is_reused_without_building(tmp_path, monkeypatch):
    patches = build.series()
    options = build.cmake_args(False, None)
    import hashlib
    import sys
    key = hashlib.sha256(f"{build.SDIST_SHA256}|{build.series_hash(patches)}|{options}|{sys.version_info[:2]}"
                         .encode()).hexdigest()[:16]
    wheel = tmp_path / "wheels" / key / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    result = build.build(cuda=False, install=False, cache_dir=tmp_path)
    assert result.cached and result.wheel == wheel


def test_source_tree_must_be_llama_cpp_python(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(build.BuildError, match="not a llama-cpp-python source tree"):
        build.build(cuda=False, source=tmp_path / "empty", install=False, cache_dir=tmp_path / "cache")
