"""VRAM: one budget rule for every arm, and one set of terms behind the solver, `fits`, `predict` and the plan's
memory prediction."""

import dataclasses

import pytest

from oatoplan.baselines import baseline_arms, greedy_arm, layer_offload
from oatoplan.cost import CostModel, predict
from oatoplan.graph import model_units
from oatoplan.inventory import read_inventory
from oatoplan.memory import (UNMEASURED_OVERHEAD_BYTES, VRAM_MARGIN, Settings, budget_for, fits, gpu_memory,
                             gpu_overhead_bytes, pool_bytes, usable_bytes, vram_terms)
from oatoplan.plan import plan_for, plan_model
from oatoplan.schema import GpuOverheadSample, Workload
from profiles import synthetic_profile

BUDGET = 3 << 30
OVERHEAD = 90 << 20


@pytest.fixture(scope="module")
def qwen(qwen_header_model):
    return read_inventory(qwen_header_model)


def test_usable_share_and_its_inverse():
    assert usable_bytes(100 << 20) == int((100 << 20) * (1 - VRAM_MARGIN)) < 100 << 20
    for need in (1, 12345, 3 << 30):
        assert usable_bytes(budget_for(need)) >= need and usable_bytes(budget_for(need) - 1) < need


def test_plan_greedy_and_baselines_keep_the_same_margin(qwen):
    plan = plan_model(qwen, synthetic_profile(), BUDGET, Workload(512, 128))
    used = {"this plan": sum(plan.prediction.gpu_bytes.values())}
    used |= {b.name: sum(b.prediction.gpu_bytes.values()) for b in plan.baselines if b.prediction}
    assert len(used) >= 5 and any(name.startswith("greedy") for name in used)
    for name, n_bytes in used.items():
        assert n_bytes <= usable_bytes(BUDGET), name


def test_layer_offload_baseline_is_the_largest_that_fits_the_usable_share(qwen):
    units, w = model_units(qwen), Workload(512, 128)
    arm = baseline_arms(qwen, "CUDA0", BUDGET, w, OVERHEAD)[0]
    ngl = int(arm.flags.split()[1])
    one_more = layer_offload(qwen, "CUDA0", ngl + 1)
    assert arm.placement == layer_offload(qwen, "CUDA0", ngl)
    assert not fits(qwen, units, one_more, arm.settings, BUDGET, OVERHEAD)
    assert sum(gpu_memory(qwen, units, arm.placement, arm.settings, OVERHEAD).values()) <= usable_bytes(BUDGET)


def test_greedy_arm_fits_the_usable_share(qwen):
    w, s = Workload(512, 128), Settings(512, True, True, 640, n_outputs_max=1)
    cost = CostModel(synthetic_profile())
    arm = greedy_arm(qwen, cost, BUDGET, w, s)
    assert 0 < sum(predict(cost, qwen, arm.placement, w, s).gpu_bytes.values()) <= usable_bytes(BUDGET)


def test_plan_memory_prediction_uses_the_same_terms(qwen):
    """The loader plan of a placement predicts the KV bytes and compute buffer that the solver's terms count."""
    units, s = model_units(qwen), Settings(1024, True, True, 1536, n_outputs_max=1)
    placement = layer_offload(qwen, "CUDA0", 15)
    plan = plan_for(qwen, placement, s, synthetic_profile(), "CUDA0")
    terms = vram_terms(qwen, units, s, OVERHEAD)
    on_gpu = [placement[u.key] != "CPU" for u in units]
    assert plan.memory.kv_bytes["CUDA0"] == terms.of(on_gpu)["kv"]
    assert plan.memory.compute_bytes["CUDA0"] == terms.of(on_gpu)["compute"]
    assert plan.memory.model_bytes["CUDA0"] == terms.of(on_gpu)["weights"]


def test_overhead_is_a_term_of_every_placement_and_moves_the_baselines(qwen):
    """The process's GPU overhead counts once per placement, and a larger one leaves room for fewer layers."""
    units, w = model_units(qwen), Workload(512, 128)
    s = Settings(512, True, True, 640, n_outputs_max=1)
    placement = layer_offload(qwen, "CUDA0", 10)
    without, with_overhead = (sum(gpu_memory(qwen, units, placement, s, o).values()) for o in (0, OVERHEAD))
    assert with_overhead - without == OVERHEAD
    small = int(baseline_arms(qwen, "CUDA0", BUDGET, w, 0)[0].flags.split()[1])
    large = int(baseline_arms(qwen, "CUDA0", BUDGET, w, 600 << 20)[0].flags.split()[1])
    assert large < small


def test_measured_overhead_is_used_and_an_unmeasured_one_is_assumed():
    sample = GpuOverheadSample(512, 90 << 20, 13 << 20)
    measured = dataclasses.replace(synthetic_profile(), gpu_overhead_bytes=77 << 20, gpu_overhead=(sample,))
    assert gpu_overhead_bytes(measured) == 77 << 20
    assert gpu_overhead_bytes(dataclasses.replace(measured, gpu_overhead_bytes=0)) == 0      # measured as nothing
    assert gpu_overhead_bytes(dataclasses.replace(measured, gpu_overhead=())) == UNMEASURED_OVERHEAD_BYTES


def test_pool_is_q8_1_activations_of_the_widest_matrix_input(qwen):
    """Qwen2-7B's widest matrix input is ffn_down's 18944 values: a q8_1 row of 21312 bytes per ubatch token, the
    slope measured on the H200 (benchmarks/results/2026-12-01-h200-vram-overhead-qwen2-7b.jsonl: about 21 KiB per
    token between ubatch 512 and 2048)."""
    assert pool_bytes(qwen, Settings(512, True, True, 4096)) == 512 * 18944 // 32 * 36
    assert pool_bytes(qwen, Settings(2048, True, True, 1024)) == 1024 * 18944 // 32 * 36   # capped at n_ctx


def test_pool_holds_the_f16_conversion_of_a_quantized_cache(qwen):
    """A q8_0 cache: CUDA's batched flash attention converts one layer's K and V view to f16 in the pool; Qwen2-7B's
    layers have 4 KV heads of 128: 2 x 512 values of 2 bytes a cell, over n_ctx 32768 (or the first segment's 8192)."""
    q8 = Settings(512, True, True, 32768, "q8_0", "q8_0")
    assert pool_bytes(qwen, q8) == 32768 * 2 * 512 * 2 > pool_bytes(qwen, Settings(512, True, True, 32768))
    assert pool_bytes(qwen, dataclasses.replace(q8, segment_cells=8192)) == 8192 * 2 * 512 * 2
    k_only = dataclasses.replace(q8, type_v="f16")        # V is f16 already: only K is converted
    assert pool_bytes(qwen, k_only) == 32768 * 512 * 2
    small = Settings(512, True, True, 512, "q8_0", "f16")     # smaller than the activations' conversion
    assert pool_bytes(qwen, small) == 512 * 18944 // 32 * 36


def test_layer_stage_matches_llama_cpps_compute_buffer(qwen):
    """All on the GPU with one logit row, n_ctx 4096: llama.cpp's compute buffer was 136.0 MiB at ubatch 512 and 544.0
    MiB at ubatch 2048 (H200, benchmarks/results/2026-12-01-h200-vram-overhead-qwen2-7b.jsonl, configs all-gpu-ub*);
    with the FFN of half the layers on the CPU, 36.4 MiB more (one Q4_K weight copy). The model counts the largest
    host matrix instead (a 53.1 MiB Q6_K ffn_down, whose copy llama.cpp places over dead gate/up activations): never
    under the allocation, at most that difference over."""
    units = model_units(qwen)
    for n_ubatch, measured_mib in ((512, 136.0), (2048, 544.0)):
        s = Settings(n_ubatch, True, True, 4096, n_outputs_max=1)
        all_gpu = {u.key: "CUDA0" for u in units}
        assert gpu_memory(qwen, units, all_gpu, s, 0)["compute"] / 2**20 == pytest.approx(measured_mib, abs=0.1)
        ffn_cpu = {u.key: "CPU" if u.layer is not None and u.layer < 14 and u.key.endswith(("ffn_gate", "ffn_up",
                                                                                            "ffn_down")) else "CUDA0"
                   for u in units}
        predicted = gpu_memory(qwen, units, ffn_cpu, s, 0)["compute"] / 2**20
        assert measured_mib + 36.4 <= predicted <= measured_mib + 53.2
