"""Decode calibration: the fit recovers known factors, calibrated predictions reproduce the measured decodes they
were fitted to, and a real CPU calibration on a tiny model runs end to end through llama.cpp."""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from oatoplan import calibrate
from oatoplan.baselines import calibration_arms
from oatoplan.cost import DECODE_CLASSES, CostModel, predict
from oatoplan.graph import CPU, model_units
from oatoplan.inventory import read_inventory
from oatoplan.schema import CalibrationArm, StreamSplitCalibration, StreamSplitSample
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
    assert calibrated.stream_split is None                  # no GPU: the streamed-upload cost is not measured


def test_stream_split_fit_recovers_the_cost_that_made_the_prefills(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    true = CostModel(dataclasses.replace(synthetic_profile(streaming=True), stream_split=StreamSplitCalibration(70.0)))
    samples = []
    for arm in calibrate.stream_split_arms(inv, true.gpu):
        units = [u for u in model_units(inv) if arm.placement[u.key] == CPU]
        n_uploads = sum(len(u.tensors) for u in units)
        t = predict(true, inv, arm.placement, calibrate.STREAM_SPLIT_WORKLOAD, arm.settings).prefill_s * 1e6
        samples.append(StreamSplitSample(arm.name, n_uploads, 512, (t * 1.01, t, t * 0.98)))
    assert [x.n_uploads for x in samples] == [0, 2 * 14, 2 * 27]       # the last block's norms stay on the GPU
    # (block 0's first norm upload has no earlier compute to hide under: a little more than 70 us per upload)
    assert calibrate.fit_stream_split(samples) == pytest.approx(70.0, rel=0.03)
    # a slope below zero (noise) is no cost at all; one upload count fits no line
    assert calibrate.fit_stream_split([dataclasses.replace(samples[0], prefill_us=(1e5,)), samples[2]]) == 0.0
    with pytest.raises(ValueError, match="two or more upload counts"):
        calibrate.fit_stream_split(samples[:1])


@pytest.mark.parametrize("profile", [synthetic_profile(gpu=False), synthetic_profile(streaming=False)])
def test_stream_split_is_not_measured_without_a_streaming_gpu_build(tiny_model, profile):
    assert calibrate.measure_stream_split(tiny_model, profile) is None
