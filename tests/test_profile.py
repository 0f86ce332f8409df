"""The profiler on this machine's CPU (a small grid, so the test stays fast), and bad profile files."""

import dataclasses
import importlib
import importlib.util
import logging
import os
from types import SimpleNamespace

import pytest

from oatoplan import profile as profiler
from oatoplan.cost import CostModel
from oatoplan.artifacts import read_json, write_json
from oatoplan.errors import OatoError
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.schema import Profile

load = importlib.import_module("oatoplan.load")     # the module: oatoplan.load is the function
SHIPPED_CPU = read_json(Profile, SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json")
SHIPPED_H100 = read_json(Profile, SHIPPED_PROFILES_DIR / "h100-qwen2-7b.json")


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(profiler, "WEIGHT_TYPES", ("Q4_K", "F16"))
    monkeypatch.setattr(profiler, "DEFAULT_SHAPES", ((512, 1024),))
    monkeypatch.setattr(profiler, "PREFILL_TOKENS_CPU", (32,))
    monkeypatch.setattr(profiler, "KV_LENGTHS", (256, 1024))
    monkeypatch.setattr(profiler, "ATTN_TOKENS_CPU", (1, 32))
    monkeypatch.setattr(profiler, "ELEMENTWISE_TOKENS", (1, 32))
    monkeypatch.setattr(profiler, "COPY_BYTES", 8 << 20)


def test_cpu_profile_measures_every_op(small_grid, tmp_path):
    seen = []
    prof = profiler.measure_profile(None, n_threads=2, budget_s=0.02, progress=lambda *a: seen.append(a))
    assert prof.gpu_device == "" and prof.notes == ("no GPU: only the CPU side was profiled",)
    ops = {o.op for o in prof.ops}
    assert ops == {"MUL_MAT", "FLASH_ATTN_EXT", "RMS_NORM", "MUL", "ADD", "GLU", "ROPE", "SET_ROWS", "GET_ROWS"}
    assert all(o.t_us > 0 and len(o.samples_us) >= 3 for o in prof.ops)
    assert prof.launch_us["CPU"] > 0 and prof.cpu_read_bytes_per_s > 0
    assert seen and seen[-1][1] < seen[-1][2]
    # more tokens never cost less than one token, for the same weight (medians; 32x the work)
    mm = {(o.ggml_type, o.n_tokens): o.t_us for o in prof.ops if o.op == "MUL_MAT"}
    assert mm[("Q4_K", 32)] > mm[("Q4_K", 1)]
    path = write_json(prof, tmp_path / "p.json")
    again = read_json(Profile, path)
    assert again == prof
    assert CostModel(again).matmul_us("CPU", "Q4_K", 512, 1024, 1) == pytest.approx(mm[("Q4_K", 1)])
    # one-token attention over f16 and over q8_0 K/V at every length; batches over f16 only
    fa = {(o.ggml_type, o.n_tokens, o.shape[3]) for o in prof.ops if o.op == "FLASH_ATTN_EXT"}
    assert fa == {(t, n, kv) for t, n in (("F16", 1), ("F16", 32), ("Q8_0", 1)) for kv in (256, 1024)}
    assert CostModel(again).kv_type_measured("CPU", "q8_0") and not CostModel(again).kv_type_measured("CPU", "q4_0")


def test_attention_copies_defeat_caches():
    """One-token attention is timed over about COPY_BYTES of K/V (a decode reads every layer's cache), 8 to 64
    copies; a batch's node once. Qwen2-7B's layout (4 KV heads of 128, f16 K and V: 2 KiB a cell): a copy of 4,096
    cells is 8 MiB, so 32 copies; 256 cells would need 512 (64); 32,768 cells need 4 (8)."""
    s = dataclasses.replace(profiler.model_shapes(None), head_dim=128, n_head=28, n_head_kv=4)
    assert [profiler.attention_copies(s, 1, n) for n in (256, 1024, 4096, 16384, 32768)] == [64, 64, 32, 8, 8]
    assert profiler.attention_copies(s, 512, 4096) == 1
    assert profiler.attention_copies(s, 1, 4096, "Q8_0") == 61      # 34 bytes per 32 values: 4.25 MiB a copy


def test_profile_show(cli):
    result = cli(["profile", "show", SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json"])
    assert result.exit_code == 0, result.stderr
    assert "MUL_MAT" in result.stdout and "Q4_K" in result.stdout


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"schema_version": 99}', "schema_version 99 is not supported"),
    ('{"schema_version": 1, "profile_id": 3}', "invalid profile"),
])
def test_bad_profile_files(cli, tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = cli(["profile", "show", path])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output(small_grid, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(profiler, "WEIGHT_TYPES", ("Q4_K",))
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli(["profile", "run", "--cpu", "--out", blocker / "p.json"])
    assert result.exit_code == 1 and "cannot write" in result.stderr
    assert "profiling" not in result.stderr     # refused before measuring


@pytest.fixture
def machine_gpus(monkeypatch):
    """Pretend this machine has the GPUs named (by llama.cpp's device description); none by default."""
    def pretend(*names: str) -> None:
        fake = [SimpleNamespace(name=f"CUDA{i}", description=n, type="GPU") for i, n in enumerate(names)]
        for module in [load, profiler] + [importlib.import_module(m) for m in ("oatoplan.machine",)
                                          if importlib.util.find_spec(m)]:
            monkeypatch.setattr(module, "gpu_devices", lambda: fake, raising=False)   # where it may be looked up
    pretend()
    return pretend


def _user_profile(directory, base: Profile, profile_id: str, created_utc: str, mtime: float | None = None):
    path = write_json(dataclasses.replace(base, profile_id=profile_id, created_utc=created_utc),
                      directory / f"{profile_id}.json")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_find_profile_falls_back_to_the_shipped_cpu_profile(machine_gpus, user_profile_dir):
    assert not list(user_profile_dir.iterdir())
    assert profiler.find_profile().profile_id == SHIPPED_CPU.profile_id


def test_find_profile_takes_the_users_profile_first_even_if_older(machine_gpus, user_profile_dir):
    _user_profile(user_profile_dir, SHIPPED_CPU, "mine", "2020-01-01T00:00:00+00:00")
    assert profiler.find_profile().profile_id == "mine"


def test_find_profile_takes_the_newest_by_creation_not_file_time(machine_gpus, user_profile_dir):
    _user_profile(user_profile_dir, SHIPPED_CPU, "old", "2026-01-01T00:00:00+00:00", mtime=2e9)
    _user_profile(user_profile_dir, SHIPPED_CPU, "new", "2026-06-01T00:00:00+00:00", mtime=1e9)
    assert profiler.find_profile().profile_id == "new"


def test_find_profile_matches_the_gpu(machine_gpus, user_profile_dir):
    # without a GPU, a user's GPU profile is not for this machine
    _user_profile(user_profile_dir, SHIPPED_H100, "my-h100", "2030-01-01T00:00:00+00:00")
    assert profiler.find_profile().profile_id == SHIPPED_CPU.profile_id
    machine_gpus(SHIPPED_H100.machine.gpu_name)
    assert profiler.find_profile().profile_id == "my-h100"
    (user_profile_dir / "my-h100.json").unlink()
    assert profiler.find_profile().profile_id == SHIPPED_H100.profile_id
    machine_gpus("NVIDIA GeForce RTX 4060")
    with pytest.raises(profiler.ProfileError, match=f"RTX 4060.*in {user_profile_dir} or among oatoplan's shipped"):
        profiler.find_profile()


def test_find_profile_skips_unreadable_files(machine_gpus, user_profile_dir, caplog):
    (user_profile_dir / "broken.json").write_text("{")
    with caplog.at_level(logging.WARNING):
        assert profiler.find_profile().profile_id == SHIPPED_CPU.profile_id
    assert "broken.json" in caplog.text


def test_find_profile_reads_the_path_given(user_profile_dir):
    path = _user_profile(user_profile_dir, SHIPPED_H100, "given", "2020-01-01T00:00:00+00:00")
    assert profiler.find_profile(path).profile_id == "given"


def test_profile_writes_into_the_user_profile_directory(small_grid, cli, user_profile_dir):
    result = cli(["profile", "run", "--cpu"])
    assert result.exit_code == 0, result.stderr
    written = list(user_profile_dir.glob("*.json"))
    assert len(written) == 1 and f"wrote {written[0]}" in result.stdout
    assert profiler.find_profile().profile_id == read_json(Profile, written[0]).profile_id


def test_a_gpu_machine_without_its_profile_plans_with_the_cpu_profile_measured_here(machine_gpus, user_profile_dir):
    """`profile run --cpu` on a machine whose GPU has no profile: find_profile takes that CPU profile (not a shipped
    CPU profile of another machine)."""
    machine_gpus("Some Unprofiled GPU")
    _user_profile(user_profile_dir, SHIPPED_CPU, "measured-here", "2026-12-01T00:00:00+00:00")
    assert profiler.find_profile().profile_id == "measured-here"
    (user_profile_dir / "measured-here.json").unlink()
    with pytest.raises(OatoError, match="no profile for this machine"):
        profiler.find_profile()
