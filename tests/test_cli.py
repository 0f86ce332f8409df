"""The CLI as a user meets it: inspect's table, plan and its errors, doctor, version."""

import pytest

from oatoplan.artifacts import read_json, write_json
from oatoplan.machine import default_threads, gpu_devices
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.schema import Plan
from profiles import shipped_cpu_profile, synthetic_profile


def test_inspect_table(tiny_model, cli):
    result = cli(["inspect", tiny_model])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "llama, 4 layers, 39 tensors" in out
    for row in ("input", "blk.0", "blk.3", "output"):
        assert f"\n{row} " in out
    assert "attn_q" in out and "ffn_down" in out
    assert "tied output" not in out


def test_inspect_tied_model_says_so(tiny_tied_model, cli):
    result = cli(["inspect", tiny_tied_model])
    assert result.exit_code == 0
    assert "tied output: no output.weight" in result.stdout


def test_inspect_gemma(gemma_model, cli):
    result = cli(["inspect", gemma_model])
    assert result.exit_code == 0
    assert "gemma3, 18 layers, 236 tensors" in result.stdout
    assert "n_swa 512 on 15 layers" in result.stdout


def test_version(cli):
    result = cli(["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("oatoplan ")


def test_plan_writes_a_plan_the_loader_accepts(qwen_header_model, cli, tmp_path):
    from oatoplan.plan import check_plan
    from oatoplan.inventory import read_inventory
    from oatoplan.artifacts import read_json, write_json
    from oatoplan.schema import Plan
    from profiles import synthetic_profile
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    out, lp = tmp_path / "plan.json", tmp_path / "plan.lp"
    result = cli(["plan", qwen_header_model, "--vram", "3GiB", "--profile", profile, "--prompt", "1024",
                  "--out", out, "--write-lp", lp])
    assert result.exit_code == 0, result.stderr
    plan = read_json(Plan, out)
    check_plan(read_inventory(qwen_header_model), plan, str(out))
    assert plan.budget_bytes == 3 << 30 and sum(plan.prediction.gpu_bytes.values()) <= 3 << 30
    assert plan.workload.n_prompt == 1024 and plan.n_ctx == 1024 + 128
    assert "vram_budget" in lp.read_text()
    for name in ("this plan", "llama-cpp-python defaults", "llama.cpp --fit (layer offload)", "greedy"):
        assert name in result.stdout
    assert "-ngl " in plan.flags and plan.profile_id == "synthetic-test"


@pytest.mark.parametrize("args, message", [
    (["--vram", "lots"], "lots"),
    (["--vram", "3GiB", "--objective", "fast"], "--objective 'fast'"),
    (["--vram", "10MiB"], "the smallest needs"),
    (["--vram", "3GiB", "-ctk", "q4_k"], "--cache-type-k 'q4_k' is not a KV cache type of llama.cpp"),
    (["--vram", "3GiB", "--cache-type-v", "f8"], "--cache-type-v 'f8'"),
])
def test_plan_bad_input(qwen_header_model, cli, tmp_path, args, message):
    from oatoplan.artifacts import write_json
    from profiles import synthetic_profile
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    if "--profile" not in args:
        args = args + ["--profile", str(profile)]
    result = cli(["plan", qwen_header_model, *args, "--out", tmp_path / "p.json"])
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_bench_bad_objective(qwen_header_model, cli, tmp_path):
    from oatoplan.artifacts import write_json
    from profiles import synthetic_profile
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    result = cli(["bench", qwen_header_model, "--vram", "3GiB", "--profile", profile, "--objective", "fast",
                  "--out", tmp_path / "b.json"])
    assert result.exit_code == 1 and "--objective 'fast'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b.json").exists()


def test_doctor_reports_this_installation(cli):
    import json
    result = cli(["doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["llama-cpp-python"]["ok"] and "0.3.36" in checks["llama-cpp-python"]["detail"]
    assert "device CPU" in checks and checks["llama.cpp build"]["detail"].startswith("llama-cpp-python 0.3.36")
    patched = checks["oatoplan patches"]
    assert patched["ok"] == patched["detail"].startswith("series ") and "oatoplan build" in patched["fix"]
    table = cli(["doctor"])
    assert table.exit_code == 0 and "CPU features" in table.stdout


@pytest.mark.skipif(bool(gpu_devices()), reason="needs a machine without a GPU")
def test_vram_auto_without_a_gpu_plans_for_the_cpu_and_runs(gemma_model, cli, tmp_path):
    out = tmp_path / "cpu.plan.json"
    result = cli(["plan", gemma_model, "--vram", "auto", "--out", out])     # finds the shipped CPU profile
    assert result.exit_code == 0, result.stderr
    assert "all on the CPU" in result.stdout and "llama-cpp-python defaults (n_threads" in result.stdout
    plan = read_json(Plan, out)
    assert plan.gpu_devices == () and plan.n_threads == default_threads()
    assert plan.profile_id == shipped_cpu_profile().profile_id
    run = cli(["run", gemma_model, "--plan", out, "-p", "The three primary colors are", "-n", "8", "--show-memory"])
    assert run.exit_code == 0, run.stderr
    assert "plan vs allocated" in run.stdout and " NO" not in run.stdout
    assert "prefill" in run.stderr and "decode 7 tokens" in run.stderr


def test_vram_0_with_a_gpu_profile_gives_a_cpu_plan_that_runs(tiny_model, cli, tmp_path):
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    out = tmp_path / "plan.json"
    result = cli(["plan", tiny_model, "--vram", "0", "--profile", profile, "--out", out])
    assert result.exit_code == 0, result.stderr
    plan = read_json(Plan, out)
    assert plan.gpu_devices == () and plan.n_gpu_layers == 0 and not plan.op_offload and plan.budget_bytes == 0
    run = cli(["run", tiny_model, "--plan", out, "-p", "hello", "-n", "4"])
    assert run.exit_code == 0, run.stderr
    assert "decode" in run.stderr


def test_a_quantized_kv_cache_is_planned_and_loaded_as_asked(tiny_model, gemma_model, qwen_header_model, cli,
                                                             tmp_path):
    """-ctk / -ctv as llama.cpp takes them: the plan's cache types, in its flags and every baseline's, and a plan that
    the loader accepts (it checks llama.cpp's KV bytes against the plan's) and runs; refused, as llama.cpp refuses
    it, where the type's blocks do not divide the head size (the tiny model's 16)."""
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    out = tmp_path / "plan.json"
    refused = cli(["plan", tiny_model, "--vram", "0", "--profile", profile, "-ctk", "q8_0", "--out", out])
    assert refused.exit_code == 1 and "blocks of 32 values do not divide" in refused.stderr and not out.exists()
    result = cli(["plan", gemma_model, "--vram", "0", "--profile", profile, "-ctk", "q8_0", "-ctv", "q8_0",
                  "--ctx", "1024", "--out", out])
    assert result.exit_code == 0, result.stderr
    plan = read_json(Plan, out)
    assert (plan.type_k, plan.type_v) == ("q8_0", "q8_0") and "-ctk q8_0 -ctv q8_0" in plan.flags
    assert plan.workload.type_k == "q8_0" and "attention is priced from the f16 timings" in result.stdout
    run = cli(["run", gemma_model, "--plan", out, "-p", "hello", "-n", "4", "--show-memory"])
    assert run.exit_code == 0, run.stderr
    assert "plan vs allocated" in run.stdout and " NO" not in run.stdout
    gpu = cli(["plan", qwen_header_model, "--vram", "3GiB", "--profile", profile, "-ctk", "q8_0", "-ctv", "q8_0",
               "--out", tmp_path / "gpu.json"])
    assert gpu.exit_code == 0, gpu.stderr
    baselines = read_json(Plan, tmp_path / "gpu.json").baselines
    assert all(b.flags.endswith("-ctk q8_0 -ctv q8_0 -fa on") for b in baselines if b.flags.startswith("-ngl")), \
        baselines


def test_a_cpu_profile_with_a_budget_plans_for_the_cpu(tiny_model, cli, tmp_path):
    out = tmp_path / "plan.json"
    result = cli(["plan", tiny_model, "--vram", "3GiB", "--profile", SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json",
                  "--out", out])
    assert result.exit_code == 0, result.stderr
    assert "has no GPU (the VRAM budget of 3.0 GiB is not used)" in result.stdout
    assert read_json(Plan, out).gpu_devices == ()
