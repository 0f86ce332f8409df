"""The bench harness on this machine's CPU with the tiny model: samples, report, chart; and the decode bound."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from oatoplan import bench as bench_module
from oatoplan import measure as measure_module
from oatoplan.baselines import Arm
from oatoplan.bench import ALL_GPU_ARM, PLAN_ARM, STREAM_OFF_ARM, arm_plans
from oatoplan.cost import CostModel, decode_bound_tokens_per_s, predict
from oatoplan.errors import BackendError
from oatoplan.graph import model_units
from oatoplan.inventory import read_inventory
from oatoplan.measure import run_bench
from oatoplan.plan import cpu_only_plan, make_plan, plan_model, plan_settings
from oatoplan.report import markdown, plot, rows, summary, table
from oatoplan.artifacts import read_json, write_json
from oatoplan.schema import SCHEMA_VERSION, BenchArm, BenchResult, Workload
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


# ---------------------------------------------------------------------------------------------------------------
# Reference arms: the plan with weight streaming off, all on the GPU (planned here; no GPU to load them on)

FREE = 80 << 30     # a GPU with room for every unit of the Qwen2-7B header model


def _streaming(plan):
    """`plan` as the planner writes one that streams (stream_slots > 0, staging slots in its memory prediction)."""
    memory = dataclasses.replace(plan.memory, stream_bytes={"CUDA0": 3 * (64 << 20)})
    return dataclasses.replace(plan, stream_slots=3, stream_slot_bytes=64 << 20, memory=memory)


@pytest.fixture(scope="module")
def qwen_plan(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    return inv, plan_model(inv, synthetic_profile(), 3 << 30, Workload(512, 128))


def test_stream_off_arm_only_when_the_plan_streams(qwen_plan):
    inv, plan = qwen_plan
    profile = synthetic_profile()
    still = dataclasses.replace(plan, stream_slots=0, stream_slot_bytes=0)
    assert STREAM_OFF_ARM not in [a.name for a in arm_plans(inv, still, profile, gpu_free_bytes=FREE)]
    streams = _streaming(plan)
    arms = arm_plans(inv, streams, profile, gpu_free_bytes=FREE)
    names = [a.name for a in arms]
    assert names[0] == PLAN_ARM and names[-2:] == [STREAM_OFF_ARM, ALL_GPU_ARM]
    assert names[1:-2] == [a.name for a in arm_plans(inv, still, profile, reference=False)[1:]]
    off = arms[-2]
    assert off.reference and not arms[0].reference and not any(a.reference for a in arms[1:-2])
    assert (off.plan.stream_slots, off.plan.stream_slot_bytes, off.plan.memory.stream_bytes) == (0, 0, {})
    assert off.plan.placement == streams.placement and off.plan.budget_bytes == streams.budget_bytes
    assert off.settings == dataclasses.replace(plan_settings(streams), stream_slots=0)
    cost = CostModel(profile)
    assert off.prediction == predict(cost, inv, streams.placement, streams.workload, off.settings)
    assert off.plan.prediction == off.prediction and "-ngl" in off.flags
    assert [a.name for a in arm_plans(inv, streams, profile, reference=False, gpu_free_bytes=FREE)] == names[:-2]


def test_all_gpu_reference_is_held_to_free_memory_not_the_budget(qwen_plan, caplog):
    inv, plan = qwen_plan
    profile = synthetic_profile()
    ref = arm_plans(inv, plan, profile, gpu_free_bytes=FREE)[-1]
    assert ref.name == ALL_GPU_ARM and ref.reference
    assert set(ref.plan.placement.values()) == {"CUDA0"} and ref.plan.stream_slots == 0
    assert sum(ref.prediction.gpu_bytes.values()) > plan.budget_bytes      # beyond the plan's budget: a reference
    assert ref.settings == dataclasses.replace(plan_settings(plan), stream_slots=0)
    with caplog.at_level("WARNING"):
        arms = arm_plans(inv, plan, profile, gpu_free_bytes=sum(ref.prediction.gpu_bytes.values()))
    assert ALL_GPU_ARM not in [a.name for a in arms]      # the free memory less the margin does not hold it
    assert ALL_GPU_ARM in caplog.text and "free memory" in caplog.text


def _measured(arm, pp: float, tg: float, stream: tuple[int, ...] = (0, 0, 0, 0)) -> BenchArm:
    return BenchArm(arm.name, arm.plan.flags, arm.plan, arm.prediction, 2 << 30, (pp * 0.99, pp * 1.01),
                    (tg * 0.99, tg * 1.01), {"CUDA0": 2 << 30}, arm.reference, stream)


def _result(inv, plan, arms) -> BenchResult:
    return BenchResult(SCHEMA_VERSION, "2026-12-01T00:00:00+00:00", synthetic_profile().machine, inv.identity,
                       plan.workload, plan.budget_bytes, 2, "interleaved", tuple(arms))


def test_report_leaves_references_out_of_the_comparison_and_shows_the_share(qwen_plan, tmp_path):
    inv, plan = qwen_plan
    arms = arm_plans(inv, _streaming(plan), synthetic_profile(), gpu_free_bytes=FREE)
    # the plan 5,000 / 30, the baselines 4,000 / 25 and slower, the references faster than all of them
    speeds = {PLAN_ARM: (5000, 30), STREAM_OFF_ARM: (6250, 40), ALL_GPU_ARM: (10000, 100)}
    streamed = {PLAN_ARM: (200, 2 << 30, 0, 3 * (64 << 20))}
    result = _result(inv, plan, [_measured(a, *speeds.get(a.name, (4001 - i, 26 - i)), streamed.get(a.name, (0,) * 4))
                                 for i, a in enumerate(arms)])
    line = summary(result)
    assert "best other arm: pp512 1.25x, tg128 1.20x, total time 0.83x" in line
    assert "streaming on / off: pp512 0.80x" in line and "pp512 50% of all on the GPU" in line
    shares = {r.arm.name: r.pp_share for r in rows(result)}
    assert shares[PLAN_ARM] == pytest.approx(0.5) and shares[ALL_GPU_ARM] == pytest.approx(1.0)
    md = markdown(result)
    assert "| pp / all-GPU |" in md.splitlines()[0] and "| streamed / rep |" in md.splitlines()[0]
    plan_row = next(r for r in md.splitlines() if r.startswith(f"| {PLAN_ARM} |"))
    assert "| 50% |" in plan_row and "| 1,024 MiB in 100 |" in plan_row
    assert "| 0 MiB in 0 |" in next(r for r in md.splitlines() if r.startswith(f"| {STREAM_OFF_ARM} |"))
    console = Console(width=400, record=True)
    console.print(table(result))
    text = console.export_text()
    assert "pp / all-GPU" in text and "50%" in text and "100%" in text
    assert plot([result], tmp_path / "r.png").stat().st_size > 1000


def test_new_bench_fields_round_trip_and_old_files_read(qwen_plan, tmp_path):
    inv, plan = qwen_plan
    arms = arm_plans(inv, _streaming(plan), synthetic_profile(), gpu_free_bytes=FREE)
    result = _result(inv, plan, [_measured(a, 1000 + i, 10 + i, (i, i << 20, 0, 0)) for i, a in enumerate(arms)])
    path = write_json(result, tmp_path / "new.json")
    assert read_json(BenchResult, path) == result
    data = json.loads(path.read_text())
    for arm in data["arms"]:        # as bench wrote it before reference arms and weight streaming
        del arm["reference"], arm["stream_stats"], arm["plan"]["stream_slots"], arm["plan"]["stream_slot_bytes"]
        del arm["plan"]["memory"]["stream_bytes"]
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(data))
    old = read_json(BenchResult, old_path)
    assert not any(a.reference or a.stream_stats for a in old.arms)
    assert all(r.pp_share is None for r in rows(old))
    md = markdown(old)
    assert "streamed" not in md and "%" not in md.split("\n\n")[0]     # the share column is there, empty
    assert summary(old).startswith(f"{PLAN_ARM} / best other arm") and "all on the GPU" not in summary(old)


def test_run_bench_records_stream_stats_of_the_timed_repetitions(monkeypatch, tiny_model):
    """The counters are process-wide: each arm gets what its own timed repetitions streamed (not its warm-up), and
    the staging-ring VRAM its load added."""
    counters = [0, 0, 0, 0]
    real_load, real_once = measure_module.load, measure_module.measure_once

    def load(model, plan):
        counters[3] += plan.n_ubatch * 1000
        return real_load(model, plan)

    def measure_once(llm, plan, workload, rng):
        counters[0], counters[1], counters[2] = counters[0] + 1, counters[1] + plan.n_ubatch, counters[2] + 7
        return real_once(llm, plan, workload, rng)

    monkeypatch.setattr(measure_module, "load", load)
    monkeypatch.setattr(measure_module, "measure_once", measure_once)
    monkeypatch.setattr(measure_module.ggml, "stream_stats", lambda: tuple(counters))
    inv = read_inventory(tiny_model)
    w = Workload(16, 2)
    arms = [Arm(f"ubatch {n}", plan=dataclasses.replace(
        make_plan(inv, {}, n_gpu_layers=0, n_ctx=32, n_threads=2, n_batch=n, n_ubatch=n), workload=w)) for n in (8, 16)]
    result = run_bench(tiny_model, arms, w, 3)
    assert [a.stream_stats for a in result.arms] == [(3, 24, 21, 8000), (3, 48, 21, 16000)]
    assert not any(a.reference for a in result.arms)


@pytest.mark.parametrize("flag", ["--reference", "--no-reference"])
def test_bench_command_measures_references_unless_told_not_to(monkeypatch, qwen_header_model, cli, tmp_path, flag):
    """The whole command on planned arms: the GPU's free memory admits the all-GPU reference; run_bench (which would
    load them on a GPU) gives each arm made-up speeds, the all-GPU arm twice the others'."""
    measured = []

    def run_bench(model, arms, workload, reps, progress):
        measured.extend(arms)
        inv = read_inventory(model)
        return _result(inv, arms[0].plan, [_measured(a, 2000 if a.name == ALL_GPU_ARM else 1000, 20) for a in arms])

    monkeypatch.setattr(bench_module, "gpu_devices", lambda: [SimpleNamespace(name="CUDA0", type="GPU",
                                                                              free_bytes=FREE)])
    monkeypatch.setattr(bench_module, "run_bench", run_bench)
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    result = cli(["bench", qwen_header_model, "--vram", "3GiB", "--profile", profile, "--reps", "2", flag,
                  "-o", tmp_path / "b.json"])
    assert result.exit_code == 0, result.stderr
    names = [a.name for a in measured]
    streams = measured[0].plan.stream_slots > 0
    if flag == "--reference":
        assert names[-1] == ALL_GPU_ARM and (STREAM_OFF_ARM in names) == streams
        assert "pp / all-GPU" in result.stdout and "pp512 50% of all on the GPU" in result.stdout
    else:
        assert not {ALL_GPU_ARM, STREAM_OFF_ARM} & set(names) and not any(a.reference for a in measured)
        assert "of all on the GPU" not in result.stdout
    assert [a.name for a in read_json(BenchResult, tmp_path / "b.json").arms] == names
