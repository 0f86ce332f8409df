"""Decode calibration: the fit recovers known factors, calibrated predictions reproduce the measured decodes they
were fitted to, and a real CPU calibration on a tiny model runs end to end through llama.cpp."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from oatoplan import calibrate
from oatoplan.baselines import calibration_arms
from oatoplan.cost import DECODE_CLASSES, CostModel, predict
from oatoplan.inventory import read_inventory
from oatoplan.schema import CalibrationArm
from profiles import synthetic_profile

TRUE_FACTORS, TRUE_CROSSING_US = {"gpu": 0.7, "cpu": 1.15}, 95.0


def _arms_with(factors, crossing_us, inv, cost):
    arms = []
    for arm in calibration_arms(inv, cost.gpu, calibrate.SETTINGS):
        parts, n_crossings = calibrate.decode_components(cost, inv, arm.placement, calibrate.WORKLOAD, arm.settings)
        measured = parts["fixed"] + sum(factors[c] * parts[c] for c in DECODE_CLASSES) + n_crossings * crossing_us
        arms.append(CalibrationArm(arm.name, "", (measured * 0.99, measured, measured * 1.02), parts, n_crossings))
    return arms


def test_fit_recovers_the_factors_that_made_the_measurements(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    cost = CostModel(synthetic_profile())
    arms = _arms_with(TRUE_FACTORS, TRUE_CROSSING_US, inv, cost)
    assert [a.components_us["cpu"] > 0 for a in arms] == [False, True, True, True]
    assert arms[2].n_crossings > arms[1].n_crossings > arms[3].n_crossings == arms[0].n_crossings == 1
    factors, crossing_us = calibrate.fit(arms, gpu=True)
    assert factors == pytest.approx(TRUE_FACTORS, rel=1e-3) and crossing_us == pytest.approx(TRUE_CROSSING_US, rel=1e-2)


def test_calibrated_prediction_reproduces_the_calibration_decodes(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    profile = synthetic_profile()
    arms = _arms_with(TRUE_FACTORS, TRUE_CROSSING_US, inv, CostModel(profile))
    factors, crossing_us = calibrate.fit(arms, gpu=True)
    calibrated = CostModel(dataclasses.replace(profile, decode_factors=factors, decode_crossing_us=crossing_us))
    for arm, placed in zip(arms, calibration_arms(inv, calibrated.gpu, calibrate.SETTINGS)):
        predicted = predict(calibrated, inv, placed.placement, calibrate.WORKLOAD, placed.settings)
        assert predicted.decode_s_per_token * 1e6 == pytest.approx(statistics.median(arm.decode_us_per_token),
                                                                    rel=1e-3)


def test_cpu_calibration_decodes_a_real_model(tiny_model):
    profile = synthetic_profile(gpu=False)
    calibrated = calibrate.calibrate(tiny_model, profile, reps=2)
    (arm,) = calibrated.calibration
    assert arm.name == "all on CPU" and len(arm.decode_us_per_token) == calibrate.MIN_REPS
    assert set(calibrated.decode_factors) == {"cpu"} and calibrated.decode_factors["cpu"] > 0
    assert calibrated.calibration_model.startswith("tiny-llama.gguf")
    # the calibrated model predicts the decode it was fitted to
    inv = read_inventory(tiny_model)
    (placed,) = calibration_arms(inv, None, calibrate.SETTINGS)
    predicted = predict(CostModel(calibrated), inv, placed.placement, calibrate.WORKLOAD, placed.settings)
    assert predicted.decode_s_per_token * 1e6 == pytest.approx(statistics.median(arm.decode_us_per_token), rel=0.01)
