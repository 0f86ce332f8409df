"""The bench harness on this machine's CPU with the tiny model: samples, report, chart; and the decode bound."""

import dataclasses
from types import SimpleNamespace

import pytest

from oatoplan import bench as bench_module
from oatoplan.baselines import Arm
from oatoplan.bench import PLAN_ARM, arm_plans
from oatoplan.cost import CostModel, decode_bound_tokens_per_s
from oatoplan.errors import BackendError
from oatoplan.graph import model_units
from oatoplan.inventory import read_inventory
from oatoplan.measure import run_bench
from oatoplan.plan import cpu_only_plan, make_plan, plan_model, plan_settings
from oatoplan.report import markdown, plot
from oatoplan.artifacts import read_json, write_json
from oatoplan.schema import BenchResult, Workload
from profiles import synthetic_profile


def test_bench_measures_every_arm(tiny_model, tmp_path):
    inv = read_inventory(tiny_model)
    w = Workload(48, 8)
    mapped = dataclasses.replace(cpu_only_plan(inv, n_ctx=64, n_threads=2), workload=w)
    pinned = dataclasses.replace(make_plan(inv, {}, n_gpu_layers=0, n_ctx=64, n_threads=2, use_mmap=False,
                                           n_batch=16, n_ubatch=16), workload=w)
    seen = []
    result = run_bench(tiny_model, [Arm("mapped", plan=mapped), Arm("copied", plan=pinned)], w, 2,
                       lambda *a: seen.append(a))
    assert [a.name for a in result.arms] == ["mapped", "copied"]
    for arm in result.arms:
        assert len(arm.prefill_tokens_per_s) == 2 and len(arm.decode_tokens_per_s) == 2
        assert all(v > 0 for v in arm.prefill_tokens_per_s + arm.decode_tokens_per_s)
        assert arm.allocated_bytes["CPU"] > 0 and set(arm.allocated_bytes) == {"CPU"}
    assert result.arms[1].plan.n_ubatch == 16 and seen[-1][1] == seen[-1][2]
    again = read_json(BenchResult, write_json(result, tmp_path / "b.json"))
    assert again == result
    table = markdown(again)
    assert "| mapped |" in table and "pp48 t/s" in table and "mapped / best other arm" in table
    assert plot([again], tmp_path / "b.png").stat().st_size > 1000


def test_decode_bound_adds_host_bytes_and_gpu_time(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    cost = CostModel(synthetic_profile())
    units = model_units(inv)
    all_cpu = decode_bound_tokens_per_s(cost, inv, {u.key: "CPU" for u in units})
    cpu_bytes = sum(u.n_bytes for u in units)
    assert all_cpu == pytest.approx(cost.profile.cpu_read_bytes_per_s / cpu_bytes)
    all_gpu = decode_bound_tokens_per_s(cost, inv, {u.key: "CUDA0" for u in units})
    assert all_gpu > all_cpu


def test_bench_arms_are_one_type_with_plans_and_predictions(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    profile = synthetic_profile()
    plan = plan_model(inv, profile, 3 << 30, Workload(512, 128))
    arms = arm_plans(inv, plan, profile)
    assert arms[0].name == PLAN_ARM and arms[0].plan is plan and len(arms) >= 4
    for arm in arms:
        assert isinstance(arm, Arm) and arm.prediction is not None and arm.plan.placement == arm.placement
        assert plan_settings(arm.plan) == arm.settings      # plan_for and plan_settings are inverses
        assert arm.plan.workload == plan.workload and "-ngl" in arm.plan.flags


def test_bench_refuses_a_budget_of_nothing(monkeypatch, tiny_model):
    """`bench --vram 0` (or auto with nothing free) would measure a CPU plan alone, with no baseline: one line instead."""
    monkeypatch.setattr(bench_module, "gpu_devices", lambda: [SimpleNamespace(name="CUDA0", type="GPU")])
    with pytest.raises(BackendError, match="--vram gave none"):
        bench_module.bench(tiny_model, synthetic_profile(), 0, Workload(8, 2))
