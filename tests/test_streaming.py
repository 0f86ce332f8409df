"""Weight streaming (patches/0005) in the planner: the staging ring in the VRAM terms, the two-stream prefill in the
cost model, the integer program's excess term against brute force, the spread placement and slot choice, the plan's
fields and environment. The native side's differential test (tokens and logits identical on/off) needs a GPU:
tests/gpu/test_stream_gpu.py."""

import dataclasses
import itertools
import os
from pathlib import Path

import pytest

from oatoplan.artifacts import read_json
from oatoplan.cost import CostModel, predict, stream_prefill_us
from oatoplan.graph import CPU, NORM, is_ffn, model_units, role, role_info
from oatoplan.inventory import read_inventory
from oatoplan.load import _native_environment
from oatoplan.machine import llama_cpp_build
from oatoplan.memory import STREAM_SLOT_ALIGN, Settings, fits, gpu_overhead_bytes, tensor_alloc_bytes, vram_terms
from oatoplan.plan import check_plan_numbers, llama_server_command, plan_for, plan_model, stream_env
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.schema import Profile, StreamSplitCalibration, Workload
from oatoplan.serve import serving_plan
from oatoplan.solve import (candidate_settings, instance, objective, solve, solve_instance, streaming_available,
                            vram_mib)
from oatoplan.streaming import refine, spread
from conftest import write_tiny_llama
from profiles import synthetic_profile

GPU = "CUDA0"


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return read_inventory(write_tiny_llama(tmp_path_factory.mktemp("one") / "one.gguf", n_layer=1))


@pytest.fixture(scope="module")
def qwen(qwen_header_model):
    return read_inventory(qwen_header_model)


def host_ffn(inv, layers):
    return {u.key: CPU if is_ffn(u) and u.layer in layers else GPU for u in model_units(inv)}


def test_two_streams_overlap_and_slots_bound_the_lead():
    # (compute, upload) in graph order: uploads longer than compute are the bound, GPU-only units let the copy catch up
    assert stream_prefill_us([(1.0, 0.0), (2.0, 0.0)], 2) == 3.0
    assert stream_prefill_us([(1.0, 3.0), (1.0, 3.0)], 2) == 7.0           # copy-bound: 3 + 3 + the last compute
    assert stream_prefill_us([(5.0, 0.0), (1.0, 3.0)], 2) == 6.0           # the upload hides under earlier compute
    many = [(2.0, 1.0)] * 10
    assert stream_prefill_us(many, 2) == pytest.approx(1.0 + 20.0)        # compute-bound: one upload shows
    # one slot: an upload waits for the previous reader, so nothing overlaps
    assert stream_prefill_us([(1.0, 1.0)] * 4, 1) == 8.0
    # a slot's reader is the whole split: the GPU-resident unit after a streamed one keeps its slot busy
    assert stream_prefill_us([(1.0, 2.0), (3.0, 0.0), (1.0, 2.0), (3.0, 0.0)], 1) == 12.0
    assert stream_prefill_us([(1.0, 2.0), (3.0, 0.0), (1.0, 2.0), (3.0, 0.0)], 2) == 10.0


def test_ring_replaces_the_copy_in_the_compute_buffer(qwen):
    units = model_units(qwen)
    devices = host_ffn(qwen, range(10))
    off = Settings(512, True, True, 1024, n_outputs_max=1)
    on = dataclasses.replace(off, stream_slots=3)
    t_off, t_on = vram_terms(qwen, units, off, 0), vram_terms(qwen, units, on, 0)
    on_gpu = [devices[u.key] != CPU for u in units]
    biggest = max(qwen.tensor(n).n_bytes for u in units if devices[u.key] == CPU and u.matrices for n in u.tensors)
    assert t_on.slot(on_gpu) == -(-biggest // STREAM_SLOT_ALIGN) * STREAM_SLOT_ALIGN
    assert t_on.of(on_gpu)["stream"] == 3 * t_on.slot(on_gpu)
    assert t_on.of(on_gpu)["compute"] < t_off.of(on_gpu)["compute"] and t_off.of(on_gpu)["stream"] == 0
    assert t_on.of([True] * len(units))["stream"] == 0                     # nothing on the host: no ring


def test_cuda_pads_quantized_rows_that_are_not_a_multiple_of_512():
    assert tensor_alloc_bytes("Q4_K", (4096, 10), 100) == 100
    assert tensor_alloc_bytes("Q4_K", (640, 10), 100) == 100 + 144 * (384 // 256)   # 384 values: 1.5 Q4_K blocks
    assert tensor_alloc_bytes("F16", (640, 10), 100) == 100


def test_streaming_prefill_is_faster_and_never_below_either_stream(qwen):
    cost = CostModel(synthetic_profile(pcie_bytes_per_s=25e9, streaming=True))
    w = Workload(2048, 64)
    devices = host_ffn(qwen, range(18))
    off = Settings(512, True, True, w.n_ctx, n_outputs_max=1)
    p_off = predict(cost, qwen, devices, w, off)
    p_on = predict(cost, qwen, devices, w, dataclasses.replace(off, stream_slots=4))
    p_gpu = predict(cost, qwen, {u.key: GPU for u in model_units(qwen)}, w, off)
    assert p_gpu.prefill_s < p_on.prefill_s < p_off.prefill_s
    assert p_on.decode_s_per_token == p_off.decode_s_per_token            # decode batches are never op-offloaded


@pytest.mark.parametrize("workload", [Workload(512, 128), Workload(2048, 4)])
@pytest.mark.parametrize("share", [0.2, 0.6])
@pytest.mark.parametrize("split_us", [None, 40.0])
def test_ilp_with_streaming_equals_brute_force(one_layer, workload, share, split_us):
    profile = synthetic_profile(crossing_us=5.0, pcie_bytes_per_s=5e9, streaming=True)
    cost = CostModel(dataclasses.replace(profile, stream_split=split_us and StreamSplitCalibration(split_us)))
    inst = instance(cost, one_layer, workload, Settings(512, True, True, workload.n_ctx, stream_slots=3))
    assert inst.upload_cpu and max(inst.upload_cpu) > 0
    low, high = vram_mib(inst, [0] * len(inst.units)), vram_mib(inst, [1] * len(inst.units))
    budget = low + share * (high - low)
    best = min(objective(inst, list(c)) for c in itertools.product((0, 1), repeat=len(inst.units))
               if vram_mib(inst, list(c)) <= budget)
    chosen, value = solve_instance(inst, budget, gap=0.0)
    assert vram_mib(inst, chosen) <= budget + 1e-9 and value == pytest.approx(best, rel=1e-9)


def test_streaming_is_a_candidate_only_for_builds_that_have_it():
    assert streaming_available(synthetic_profile(streaming=True))
    assert not streaming_available(synthetic_profile())
    slots = {s.stream_slots for s in candidate_settings(Workload(512, 8), 4)}
    assert slots == {0, 4} and {s.stream_slots for s in candidate_settings(Workload(512, 8))} == {0}


def test_spread_keeps_each_roles_count_and_the_kv_suffix(qwen):
    devices = host_ffn(qwen, range(12))
    out = spread(qwen, devices)
    units = model_units(qwen)
    for name in {role(u) for u in units if u.layer is not None}:
        keys = [u.key for u in units if u.layer is not None and role(u) == name]
        assert sum(out[k] == CPU for k in keys) == sum(devices[k] == CPU for k in keys)
    assert all(out[u.key] == devices[u.key] for u in units if u.is_attention)
    host_layers = sorted(u.layer for u in units if role(u) == "ffn_up" and out[u.key] == CPU)
    assert max(b - a for a, b in zip(host_layers, host_layers[1:])) <= 3     # 12 of 28: spread, not a block


# the H200 profile shipped until series 95ae1f77 (the ttft case below was found with it)
H200_6CF41B44 = Path(__file__).parent.parent / "benchmarks/results/archive/2026-12-01-h200-profile-shipped-6cf41b44.json"


def h200(streaming: bool = True, path: Path = SHIPPED_PROFILES_DIR / "h200-qwen2-7b.json"):
    """The shipped H200 profile (or the one at `path`), its build with weight streaming or without."""
    profile = read_json(Profile, path)
    build = profile.machine.llama_cpp_build.replace(",0005-ggml-oato-weight-streaming", "")
    build += ",0005-ggml-oato-weight-streaming" if streaming else ""
    return dataclasses.replace(profile, machine=dataclasses.replace(profile.machine, llama_cpp_build=build))


def test_plan_streams_within_budget_and_says_so(qwen):
    profile = h200()
    w = Workload(2048, 128)
    budget = int(2.5 * (1 << 30))
    plan = plan_model(qwen, profile, budget, w)
    assert plan.stream_slots > 0 and plan.stream_slot_bytes > 0
    assert sum(plan.prediction.gpu_bytes.values()) <= int(budget * 0.97)
    assert plan.memory.stream_bytes == {GPU: plan.stream_slots * plan.stream_slot_bytes}
    assert any(n.startswith("weight streaming:") for n in plan.notes)
    assert llama_server_command(plan, "m.gguf").startswith(f"OATO_STREAM=1 OATO_STREAM_SLOTS={plan.stream_slots} ")
    # the same model without the patch in the profile's build: no streaming, and a slower predicted prefill
    stock = plan_model(qwen, h200(streaming=False), budget, w)
    assert stock.stream_slots == 0 and stock.prediction.prefill_s > plan.prediction.prefill_s
    # oatoplan's build streams by default: a plan without streaming says so to llama-server too
    assert llama_server_command(stock, "m.gguf").startswith("OATO_STREAM=0 llama-server ")


def test_a_measured_split_cost_keeps_norms_off_the_host_when_streaming(qwen):
    """pp512 with --objective ttft at 2.5 GiB: with a per-upload cost, no norm stays on the host; a profile without
    the calibration says its prediction leaves that cost out, one that measured it (0 us included) does not."""
    w, budget = Workload(512, 128, objective="ttft"), int(2.5 * (1 << 30))

    def host_norms(profile, says_unmeasured):
        plan = plan_model(qwen, profile, budget, w)
        assert plan.stream_slots > 0
        assert any("did not measure the fixed cost of a streamed upload" in n for n in plan.notes) == says_unmeasured
        return [u.key for u in model_units(qwen) if plan.placement[u.key] == CPU and role_info(role(u))[1] == NORM]
    host_norms(dataclasses.replace(h200(), stream_split=None), True)
    host_norms(dataclasses.replace(h200(), stream_split=StreamSplitCalibration(0.0)), False)     # measured: 0 us
    assert host_norms(dataclasses.replace(h200(), stream_split=StreamSplitCalibration(80.0)), False) == []


def test_refine_never_leaves_the_budget_nor_gets_slower(qwen):
    cost = CostModel(h200())
    w = Workload(2048, 128)
    budget = int(1.4 * (1 << 30))
    solved = solve(qwen, cost, budget, w)
    refined = refine(qwen, cost, solved, budget, w)
    assert solved.settings.stream_slots and refined.settings.stream_slots
    assert fits(qwen, model_units(qwen), refined.devices, refined.settings, budget, gpu_overhead_bytes(cost.profile))
    assert refined.prediction.total_s <= solved.prediction.total_s


def test_plan_for_records_slots_only_when_something_streams(qwen):
    profile = synthetic_profile(streaming=True)
    s = Settings(512, True, True, 1024, n_outputs_max=1, stream_slots=3)
    plan = plan_for(qwen, host_ffn(qwen, range(4)), s, profile, GPU)
    assert plan.stream_slots == 3 and plan.stream_slot_bytes > 0
    assert plan_for(qwen, host_ffn(qwen, ()), s, profile, GPU).stream_slots == 0
    with pytest.raises(Exception, match="stream_slots 99"):
        check_plan_numbers(qwen, dataclasses.replace(plan, stream_slots=99), "plan.json")
    with pytest.raises(Exception, match="stream_slots 1 is not a ring"):
        check_plan_numbers(qwen, dataclasses.replace(plan, stream_slots=1), "plan.json")
    with pytest.raises(Exception, match="stream_slot_bytes 0"):
        check_plan_numbers(qwen, dataclasses.replace(plan, stream_slot_bytes=0), "plan.json")


def test_loader_environment_is_the_plans_and_is_restored(qwen, monkeypatch):
    plan = plan_for(qwen, host_ffn(qwen, range(4)), Settings(512, True, True, 1024, stream_slots=3),
                    synthetic_profile(streaming=True), GPU)
    monkeypatch.delenv("OATO_STREAM", raising=False)
    monkeypatch.setenv("OATO_STREAM_SLOTS", "7")
    with _native_environment(plan):
        assert {k: os.environ.get(k) for k in stream_env(plan)} == stream_env(plan)
    assert os.environ.get("OATO_STREAM") is None and os.environ["OATO_STREAM_SLOTS"] == "7"
    monkeypatch.setenv("OATO_STREAM", "0")                 # the user's A/B switch wins
    with _native_environment(plan):
        assert os.environ["OATO_STREAM"] == "0" and "OATO_STREAM_SLOTS" not in os.environ
    assert os.environ["OATO_STREAM"] == "0"


def test_serving_a_smaller_context_keeps_the_ring(qwen, qwen_header_model):
    plan = plan_for(qwen, host_ffn(qwen, range(4)), Settings(512, True, True, 2048, stream_slots=3),
                    synthetic_profile(streaming=True), GPU)
    served = serving_plan(qwen_header_model, plan, 1024)
    assert served.n_ctx == 1024 and served.memory.stream_bytes == plan.memory.stream_bytes != {}


def test_a_plan_is_for_the_build_at_hand_and_says_when_its_profile_is_not(qwen):
    profile = h200(streaming=False)
    old = dataclasses.replace(profile, machine=dataclasses.replace(profile.machine, llama_cpp_build="an older build"))
    plan = plan_model(qwen, old, int(2.5 * (1 << 30)), Workload(512, 64))
    assert plan.llama_cpp_build == llama_cpp_build()           # what load will compare against
    assert any("was measured with an older build" in n for n in plan.notes)


def test_ttft_plan_judges_the_whole_workload_optimum_too(qwen):
    """pp512 --objective ttft at 2.5 GiB: the program's ideal overlap ties many placements for prefill; the one it
    returns for ttft alone (many small host tensors) simulates slower than the whole workload's optimum (FFN gate and
    up on the host), which refine now also judges: the plan is the faster of the two under the slot simulation. With
    the H200 profile of then (the one shipped now finds the faster placement for ttft alone already)."""
    profile, budget = h200(path=H200_6CF41B44), int(2.5 * (1 << 30))
    cost, w = CostModel(profile), Workload(512, 128, objective="ttft")
    alone = refine(qwen, cost, solve(qwen, cost, budget, w), budget, w)
    plan = plan_model(qwen, profile, budget, w)
    assert plan.stream_slots > 0
    assert plan.prediction.prefill_s < alone.prediction.prefill_s * 0.95
    assert sum(plan.prediction.gpu_bytes.values()) <= int(budget * 0.97)
