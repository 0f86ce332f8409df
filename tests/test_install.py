"""oatoplan as a user installs it: its wheel built (`pip wheel`), installed into a fresh venv in a temp dir with the
patched llama-cpp-python wheel from the build cache, and used from an unrelated directory: doctor, plan, run, and
build (which finds its patch series in the installed package and the wheel in the cache).

The fresh venv reuses the dev venv's other packages (numpy, pulp, typer, the test model...) through a .pth line that
puts the dev site-packages at the END of sys.path as a plain directory: its own .pth files (the editable oatoplan)
are not processed, and the venv's own site-packages come first, so the installed oatoplan and llama_cpp win.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from oatoplan import build
from oatoplan.paths import SHIPPED_PROFILES_DIR, build_cache_dir
from oatoplan.artifacts import read_json
from oatoplan.schema import Plan, Profile

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CPU = read_json(Profile, SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json")


def _cached_cpu_wheel() -> Path:
    """The patched CPU wheel `oatoplan build --cpu` left in the cache (sha256 checked), or skip."""
    digest = build.series_hash(build.series())
    options = build.cmake_args(False, None)
    wheel_dir = build_cache_dir() / "wheels" / build.cache_key(build.SDIST_SHA256, digest, options)
    wheel = build.cached_wheel(wheel_dir)
    if wheel is None:
        pytest.skip(f"no recorded patched wheel in {wheel_dir}: run `oatoplan build --cpu` (scripts/env.sh does)")
    return wheel


def _oatoplan_wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps` of a clean copy of the package sources (an in-tree build would leave build/ behind,
    whose stale files a later wheel would carry)."""
    src = tmp / "src"
    shutil.copytree(REPO / "oatoplan", src / "oatoplan", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
                          str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = (tmp / "dist").glob("oatoplan-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with oatoplan's wheel and the cached patched llama-cpp-python wheel installed; returns
    (wheel, venv dir, environment for commands run in it, an unrelated working directory)."""
    llama_wheel = _cached_cpu_wheel()
    tmp = tmp_path_factory.mktemp("install")
    wheel = _oatoplan_wheel(tmp)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dev_site = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_dev_venv.pth").write_text("".join(f"{p}\n" for p in dev_site))
    run = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed",
                          str(wheel), str(llama_wheel)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", OATOPLAN_PROFILE_DIR=str(tmp / "user-profiles"),
               OATOPLAN_CACHE=str(build_cache_dir()))
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return wheel, env_dir, env, elsewhere


def _run(installed, *args: str) -> subprocess.CompletedProcess:
    _, env_dir, env, elsewhere = installed
    return subprocess.run([env_dir / "bin" / "oatoplan", *args], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=120)


def test_wheel_carries_the_series_native_sources_and_profiles(installed):
    names = set(zipfile.ZipFile(installed[0]).namelist())
    patches = build.series()
    assert "oatoplan/patches/series" in names
    assert {f"oatoplan/patches/{p.name}" for p in patches} <= names
    assert {f"oatoplan/native/{f.relative_to(build.NATIVE_DIR).as_posix()}" for f in build.native_sources()} <= names
    assert {f"oatoplan/profiles/{p.name}" for p in SHIPPED_PROFILES_DIR.glob("*.json")} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "patches/", "profiles/")) for n in names)


def test_installed_packages_win_over_the_dev_venv(installed):
    _, env_dir, env, elsewhere = installed
    run = subprocess.run([env_dir / "bin" / "python", "-c", "import oatoplan, llama_cpp; print(oatoplan.__file__); "
                          "print(llama_cpp.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    print(run.stdout)
    for line in run.stdout.split():
        assert Path(line).is_relative_to(env_dir), line


def test_doctor_from_an_unrelated_directory(installed):
    run = _run(installed, "doctor", "--json")
    assert run.returncode == 0, run.stderr
    checks = {c["name"]: c for c in json.loads(run.stdout)["checks"]}
    assert checks["llama-cpp-python"]["ok"] and str(installed[1]) in checks["llama-cpp-python"]["detail"]
    series = build.series_hash(build.series())
    assert checks["oatoplan patches"]["ok"] and checks["oatoplan patches"]["detail"].startswith(f"series {series}:")
    if "GPU backend" in checks:     # no GPU here: the shipped CPU profile, found in the installed package
        assert checks["profile"]["detail"] == SHIPPED_CPU.profile_id


def test_plan_and_run_from_an_unrelated_directory(installed, gemma_model):
    elsewhere = installed[3]
    # no --profile: found in the installed package (the shipped CPU profile on a machine without a GPU)
    cpu = _run(installed, "plan", str(gemma_model), "--vram", "0", "--out", "cpu.plan.json")
    if cpu.returncode == 0:
        assert read_json(Plan, elsewhere / "cpu.plan.json").profile_id == SHIPPED_CPU.profile_id
    else:   # until CPU-only planning exists: refused in one line that names the profile found
        assert cpu.stderr.startswith("oatoplan: error: ") and len(cpu.stderr.strip().splitlines()) == 1
        assert f"profile {SHIPPED_CPU.profile_id} has no GPU" in cpu.stderr
    # a shipped GPU profile named by its installed path: a real placement
    h100 = SHIPPED_PROFILES_DIR.name + "/h100-qwen2-7b.json"
    installed_profile = next(installed[1].glob(f"lib/python*/site-packages/oatoplan/{h100}"))
    gpu = _run(installed, "plan", str(gemma_model), "--vram", "600MiB", "--profile", str(installed_profile),
               "--out", "gpu.plan.json")
    assert gpu.returncode == 0, gpu.stderr
    assert read_json(Plan, elsewhere / "gpu.plan.json").budget_bytes == 600 << 20
    plan = ["--plan", "cpu.plan.json"] if cpu.returncode == 0 else []
    run = _run(installed, "run", str(gemma_model), *plan, "-p", "The three primary colors are", "-n", "4")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "prefill" in run.stderr and "decode" in run.stderr


def test_build_finds_the_cached_wheel_and_the_packaged_series(installed):
    run = _run(installed, "build", "--cpu", "--no-install")
    assert run.returncode == 0, run.stderr
    series = build.series_hash(build.series())
    assert run.stdout.startswith(f"cached {_cached_cpu_wheel()} (series {series},"), run.stdout
