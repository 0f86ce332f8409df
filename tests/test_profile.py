"""The profiler on this machine's CPU (a small grid, so the test stays fast), and bad profile files."""

import pytest

from oatoplan import profile as profiler
from oatoplan.cost import CostModel
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.schema import Profile, read_json, write_json


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


def test_profile_show(cli):
    result = cli(["profile", "--show", SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json"])
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
    result = cli(["profile", "--show", path])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output(small_grid, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(profiler, "WEIGHT_TYPES", ("Q4_K",))
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli(["profile", "--cpu", "--out", blocker / "p.json"])
    assert result.exit_code == 1 and "cannot write" in result.stderr
    assert "profiling" not in result.stderr     # refused before measuring
