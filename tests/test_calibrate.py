"""Decode calibration: the fit recovers known factors, calibrated predictions reproduce the measured decodes they
were fitted to, and a real CPU calibration on a tiny model runs end to end through llama.cpp."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from oatoplan import calibrate
from oatoplan.cost import DECODE_CLASSES, CostModel, predict
from oatoplan.inventory import read_inventory
from oatoplan.schema import CalibrationArm
from profiles import synthetic_profile

TRUE_FACTORS = {"gpu": 0.9, "cpu_ffn": 1.15, "cpu_attn_weights": 1.6, "cpu_attention": 1.3}


def _arms_with(factors, inv, cost):
    arms = []
    for name, devices in calibrate.placements(inv, cost.gpu):
        parts = calibrate.decode_components(cost, inv, devices, calibrate.WORKLOAD, calibrate.SETTINGS)
        measured = parts["fixed"] + sum(factors[c] * parts[c] for c in DECODE_CLASSES)
        arms.append(CalibrationArm(name, "", (measured * 0.99, measured, measured * 1.02), parts))
    return arms


def test_fit_recovers_the_factors_that_made_the_measurements(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    cost = CostModel(synthetic_profile())
    arms = _arms_with(TRUE_FACTORS, inv, cost)
    assert [sorted(c for c in DECODE_CLASSES if a.components_us[c] > 0) for a in arms] == [
        ["gpu"], ["cpu_ffn", "gpu"], ["cpu_attn_weights", "gpu"], sorted(DECODE_CLASSES)]
    fitted = calibrate.fit(arms, gpu=True)
    assert fitted == pytest.approx(TRUE_FACTORS, rel=1e-3)


def test_calibrated_prediction_reproduces_the_calibration_decodes(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    profile = synthetic_profile()
    arms = _arms_with(TRUE_FACTORS, inv, CostModel(profile))
    calibrated = CostModel(dataclasses.replace(profile, decode_factors=calibrate.fit(arms, gpu=True)))
    for arm, (_, devices) in zip(arms, calibrate.placements(inv, calibrated.gpu)):
        predicted = predict(calibrated, inv, devices, calibrate.WORKLOAD, calibrate.SETTINGS)
        assert predicted.decode_s_per_token * 1e6 == pytest.approx(statistics.median(arm.decode_us_per_token),
                                                                    rel=1e-3)


def test_cpu_calibration_decodes_a_real_model(tiny_model):
    profile = synthetic_profile(gpu=False)
    calibrated = calibrate.calibrate(tiny_model, profile, reps=2)
    (arm,) = calibrated.calibration
    assert arm.name == "all on CPU" and len(arm.decode_us_per_token) == 2
    assert set(calibrated.decode_factors) == {"cpu_ffn", "cpu_attn_weights", "cpu_attention"}
    assert len(set(calibrated.decode_factors.values())) == 1 and min(calibrated.decode_factors.values()) > 0
    assert calibrated.calibration_model.startswith("tiny-llama.gguf")
    # the calibrated model predicts the decode it was fitted to
    inv = read_inventory(tiny_model)
    devices = dict(calibrate.placements(inv, None))["all on CPU"]
    predicted = predict(CostModel(calibrated), inv, devices, calibrate.WORKLOAD, calibrate.SETTINGS)
    assert predicted.decode_s_per_token * 1e6 == pytest.approx(statistics.median(arm.decode_us_per_token), rel=0.01)
