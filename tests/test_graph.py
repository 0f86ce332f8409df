"""Placement units, the role table and the crossing count: one definition each, used by every caller."""

import pytest

from oatoplan.baselines import calibration_arms, n_cpu_ffn
from oatoplan.calibrate import SETTINGS
from oatoplan.graph import CPU, LAYER_ORDER, crossings, is_expert, is_ffn, model_units, role, role_info
from oatoplan.inventory import read_inventory


@pytest.fixture(scope="module")
def units(tiny_model):
    return model_units(read_inventory(tiny_model))


def test_units_follow_the_role_table(units):
    block = [role(u) for u in units if u.layer == 0]
    assert block == [r for r in LAYER_ORDER if r in block]
    assert block == ["attn_norm", "attn_q", "attn_k", "attn_v", "attn", "attn_output", "ffn_norm", "ffn_gate",
                     "ffn_up", "ffn_down"]
    assert [u.key for u in units[-2:]] == ["output_norm", "output"] and units[-1].is_output


def test_an_ffn_unit_is_an_ffn_weight_not_a_norm(units):
    assert {role(u) for u in units if is_ffn(u)} == {"ffn_gate", "ffn_up", "ffn_down"}
    assert not any(is_expert(u) for u in units)
    assert role_info("ffn_up_exps") == ("ffn", "experts") and role_info("post_ffw_norm") == ("ffn", "norm")
    assert role_info("ffn_made_up") == ("ffn", "matrix")           # a role the table lacks: read from its name


def test_llama_cpp_ffn_override_and_calibration_move_the_same_units(tiny_model, units):
    inv = read_inventory(tiny_model)
    moved = {k for k, d in n_cpu_ffn(inv, "CUDA0", 2).items() if d == CPU}
    ffn_arm = calibration_arms(inv, "CUDA0", SETTINGS)[1]
    assert ffn_arm.name.startswith("FFN of layers 0-1")
    assert moved == {k for k, d in ffn_arm.placement.items() if d == CPU}
    assert moved == {u.key for u in units if is_ffn(u) and u.layer < 2}


def test_crossings_start_on_the_cpu():
    assert crossings([]) == 0
    assert crossings(["CUDA0"]) == 1
    assert crossings(["CPU", "CUDA0", "CUDA0", "CPU"]) == 2
    assert crossings([1, 1, 0, 1], start=0) == 3
