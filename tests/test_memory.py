"""VRAM: one budget rule for every arm, and one set of terms behind the solver, `fits`, `predict` and the plan's
memory prediction."""

import pytest

from oatoplan.baselines import baseline_arms, greedy_arm, layer_offload
from oatoplan.cost import CostModel, predict
from oatoplan.graph import model_units
from oatoplan.inventory import read_inventory
from oatoplan.memory import (VRAM_MARGIN, Settings, budget_for, fits, gpu_memory, usable_bytes, vram_terms)
from oatoplan.plan import plan_for, plan_model
from oatoplan.schema import Workload
from profiles import synthetic_profile

BUDGET = 3 << 30


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
    arm = baseline_arms(qwen, "CUDA0", BUDGET, w)[0]
    ngl = int(arm.flags.split()[1])
    one_more = layer_offload(qwen, "CUDA0", ngl + 1)
    assert arm.placement == layer_offload(qwen, "CUDA0", ngl)
    assert not fits(qwen, units, one_more, arm.settings, BUDGET)
    assert sum(gpu_memory(qwen, units, arm.placement, arm.settings).values()) <= usable_bytes(BUDGET)


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
    terms = vram_terms(qwen, units, s)
    on_gpu = [placement[u.key] != "CPU" for u in units]
    assert plan.memory.kv_bytes["CUDA0"] == terms.of(on_gpu)["kv"]
    assert plan.memory.compute_bytes["CUDA0"] == terms.of(on_gpu)["compute"]
    assert plan.memory.model_bytes["CUDA0"] == terms.of(on_gpu)["weights"]
