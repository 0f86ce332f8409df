"""The cost model: interpolation between measured points, and VRAM terms checked against llama.cpp's allocations."""

import dataclasses
import math

import pytest

from oatoplan.cost import CostModel, _loglog, predict, prefill_crossings, unit_ubatch_us
from oatoplan.graph import NORM, crossings, model_units, role, role_info
from oatoplan.memory import Settings, compute_stage_bytes, gpu_memory
from oatoplan.inventory import read_inventory
from oatoplan.schema import StreamSplitCalibration, Workload
from oatoplan.units import BYTES_PER_MIB
from profiles import synthetic_profile


def test_loglog_exact_at_points_between_and_beyond():
    xs, ys = [1.0, 4.0, 16.0], [10.0, 20.0, 80.0]
    assert _loglog(xs, ys, 4.0) == pytest.approx(20.0)
    assert _loglog(xs, ys, 2.0) == pytest.approx(math.sqrt(10.0 * 20.0))   # geometric mean halfway in log
    assert _loglog(xs, ys, 0.5) == 10.0                                      # latency floor
    assert _loglog(xs, ys, 32.0) == pytest.approx(160.0)                     # proportional beyond


def test_matmul_measured_point_and_scaled_shape():
    prof = synthetic_profile()
    cost = CostModel(prof)
    point = next(o for o in prof.ops if o.op == "MUL_MAT" and o.device == "CUDA0" and o.n_tokens == 512)
    assert cost.matmul_us("CUDA0", point.ggml_type, *point.shape, 512) == pytest.approx(point.t_us)
    k, n = point.shape
    # twice the output features of a measured shape costs twice as much when scaled from it
    assert cost.matmul_us("CUDA0", point.ggml_type, k, 2 * n, 512) == pytest.approx(
        2 * cost.matmul_us("CUDA0", point.ggml_type, k, n, 512), rel=0.05)
    # an unmeasured type at decode scales by bytes per weight from the nearest measured type
    assert cost.matmul_us("CPU", "Q8_0", 4096, 4096, 1) > cost.matmul_us("CPU", "Q4_K", 4096, 4096, 1)


def test_transfer_is_linear_between_small_and_big():
    cost = CostModel(synthetic_profile(pcie_bytes_per_s=50e9))
    small, big = cost.transfer_us(16 << 10), cost.transfer_us(256 << 20)
    assert big - small == pytest.approx(((256 << 20) - (16 << 10)) / 50e9 * 1e6, rel=1e-6)
    assert cost.transfer_us(1 << 30, pinned=False) > cost.transfer_us(1 << 30, pinned=True)


def test_all_gpu_beats_all_cpu_and_crossings_are_counted(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    cost = CostModel(synthetic_profile())
    units = model_units(inv)
    s, w = Settings(512, True, True, 1024), Workload(256, 32)
    all_gpu = predict(cost, inv, {u.key: "CUDA0" for u in units}, w, s)
    all_cpu = predict(cost, inv, {u.key: "CPU" for u in units}, w, s)
    assert all_gpu.total_s < all_cpu.total_s
    assert all_gpu.n_crossings == 1 and all_cpu.n_crossings == 0          # the input lookup runs on the CPU
    scattered = {u.key: "CUDA0" if i % 2 else "CPU" for i, u in enumerate(units)}
    assert predict(cost, inv, scattered, w, s).n_crossings == sum(
        1 for a, b in zip(["CPU"] + list(scattered.values()), list(scattered.values())) if a != b)


def test_compute_buffer_matches_llama_cpp_allocations(qwen_header_model):
    """llama.cpp's CUDA0 compute buffer for Qwen2-7B at ubatch 2048, measured on the H100 machine
    (benchmarks/results/2026-11-22-h100-load-check-qwen2-7b.json and gpu-workflow.md): 1,216 MiB with -ngl 15
    (output on the GPU) and 1,642 MiB with output and layers 0-13's FFN on the CPU (op offload copies the output
    matrix in)."""
    inv = read_inventory(qwen_header_model)
    units = model_units(inv)
    s = Settings(2048, True, False, 4096)
    ngl15 = {u.key: "CUDA0" if (u.layer if u.layer is not None else 28) >= 14 else "CPU" for u in units}
    ffn_cpu = {u.key: "CPU" if u.key == "output" or (u.layer is not None and u.layer < 14 and
                                                     u.key.split(".")[2] in ("ffn_gate", "ffn_up", "ffn_down"))
               else "CUDA0" for u in units}
    assert gpu_memory(inv, units, ngl15, s, 0)["compute"] / BYTES_PER_MIB == pytest.approx(1216, rel=0.03)
    assert gpu_memory(inv, units, ffn_cpu, s, 0)["compute"] / BYTES_PER_MIB == pytest.approx(1642, rel=0.03)
    output_stage, layer_stage = compute_stage_bytes(inv, s)
    assert output_stage > layer_stage


def test_deeper_context_slows_attention_not_weights(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    cost = CostModel(synthetic_profile())
    units = model_units(inv)
    devices = {u.key: "CUDA0" if (u.layer or 0) >= 14 else "CPU" for u in units}
    s = Settings(512, True, True, 40000)
    shallow = predict(cost, inv, devices, Workload(512, 64, 0), s)
    deep = predict(cost, inv, devices, Workload(512, 64, 32768), s)
    assert deep.decode_s_per_token > shallow.decode_s_per_token and deep.prefill_s > shallow.prefill_s
    assert deep.gpu_bytes["weights"] == shallow.gpu_bytes["weights"]


def test_decode_attention_over_a_timed_kv_type_uses_its_points(qwen_header_model):
    """One-token attention over q8_0 K/V comes from the profile's Q8_0 points where it has them (here: twice the f16
    time), else from the f16 points, and the plan's note says so."""
    from oatoplan.cost import kv_type_note
    from oatoplan.schema import OpTiming
    inv, base = read_inventory(qwen_header_model), synthetic_profile()
    doubled = tuple(OpTiming(o.device, o.op, "Q8_0", o.shape, 1, 2 * o.t_us, ()) for o in base.ops
                    if o.op == "FLASH_ATTN_EXT" and o.n_tokens == 1)
    devices = {u.key: "CPU" for u in model_units(inv)}
    f16, q8 = Settings(512, False, True, 8192), Settings(512, False, True, 8192, "q8_0", "q8_0")
    workload = Workload(128, 64, 4096)
    for profile, factor in ((base, 1.0), (dataclasses.replace(base, ops=base.ops + doubled), 2.0)):
        cost = CostModel(profile)
        one = [cost.attention_us("CPU", 128, 28, 4, 4096, 1, t) for t in ("F16", "Q8_0")]
        assert one[1] == pytest.approx(factor * one[0])
        assert cost.attention_us("CPU", 128, 28, 4, 4096, 512, "Q8_0") == cost.attention_us("CPU", 128, 28, 4, 4096,
                                                                                             512)
        slower = predict(cost, inv, devices, workload, q8).decode_s_per_token
        assert (slower > predict(cost, inv, devices, workload, f16).decode_s_per_token) == (factor > 1)
        assert bool(kv_type_note(cost, q8)) == (factor == 1.0) and not kv_type_note(cost, f16)


def test_one_logit_row_shrinks_the_output_stage(qwen_header_model):
    """n_outputs_max=1 (what plans set): llama.cpp reserves logits for one token per ubatch instead of all of them,
    and a host output matrix is no longer copied up for op offload (its batch is one row)."""
    inv = read_inventory(qwen_header_model)
    units = model_units(inv)
    every, one = Settings(2048, True, True, 4096), Settings(2048, True, True, 4096, n_outputs_max=1)
    assert compute_stage_bytes(inv, every)[0] - compute_stage_bytes(inv, one)[0] == 4 * 2047 * inv.hparams.n_vocab
    assert compute_stage_bytes(inv, every)[1] == compute_stage_bytes(inv, one)[1]
    output_on_cpu = {u.key: "CPU" if u.is_output else "CUDA0" for u in units}
    assert gpu_memory(inv, units, output_on_cpu, one, 0)["compute"] < gpu_memory(inv, units, output_on_cpu, every, 0)["compute"] / 3


def host_norms(inv, n_blocks):
    """All on the GPU but the norms of the first n_blocks blocks (each norm weight a streamed upload of its own)."""
    return {u.key: "CPU" if u.layer is not None and u.layer < n_blocks and role_info(role(u))[1] == NORM else "CUDA0"
            for u in model_units(inv)}


def with_split(profile, split_us):
    return dataclasses.replace(profile, stream_split=StreamSplitCalibration(split_us) if split_us is not None else None)


def test_each_streamed_upload_costs_the_profiles_split_on_both_streams(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    s = Settings(512, True, True, 2048, n_outputs_max=1, stream_slots=3)
    norm = next(u for u in model_units(inv) if role(u) == "attn_norm")
    q = next(u for u in model_units(inv) if role(u) == "attn_q")
    assert len(norm.tensors) == 1 and len(q.tensors) == 2                # a matrix and its bias: two uploads
    bare = CostModel(synthetic_profile(streaming=True))
    priced = CostModel(with_split(synthetic_profile(streaming=True), 80.0))
    assert bare.stream_split_us == 0.0 and priced.stream_split_us == 80.0
    for unit in (norm, q):
        (c0, u0), (c1, u1) = (unit_ubatch_us(c, inv, unit, "CPU", s, 512, 0) for c in (bare, priced))
        assert u0 > 0 and c1 - c0 == pytest.approx(80.0 * len(unit.tensors)) and u1 - u0 == pytest.approx(
            80.0 * len(unit.tensors))
    # the same unit on the GPU streams nothing and pays nothing
    assert unit_ubatch_us(priced, inv, q, "CUDA0", s, 512, 0) == unit_ubatch_us(bare, inv, q, "CUDA0", s, 512, 0)


def test_more_streamed_splits_predict_a_longer_prefill(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    w, s = Workload(512, 16), Settings(512, True, True, 1024, n_outputs_max=1, stream_slots=3)
    cost = CostModel(with_split(synthetic_profile(streaming=True), 80.0))
    prefill = [predict(cost, inv, host_norms(inv, k), w, s).prefill_s * 1e6 for k in (0, 4, 8, 16)]
    assert prefill == sorted(prefill) and len(set(prefill)) == 4
    # compute-bound: each host norm adds its split (two norms per block), and no crossings on top
    assert prefill[3] - prefill[2] == pytest.approx(8 * 2 * 80.0, rel=0.02)


def test_without_a_measured_split_prefill_is_priced_by_crossings_as_before(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    w, s = Workload(1024, 16), Settings(512, True, True, 2048, n_outputs_max=1, stream_slots=3)
    profile = synthetic_profile(streaming=True)
    units = model_units(inv)
    devices = host_norms(inv, 8)
    bare, zero = CostModel(profile), CostModel(with_split(profile, 0.0))
    assert predict(bare, inv, devices, w, s) == predict(zero, inv, devices, w, s)
    # each of the two ubatches: every alternation of units is a crossing; with a measured split, only the input's
    n_alternations = crossings(devices[u.key] for u in units)
    assert prefill_crossings(bare, units, devices, s, 512) == n_alternations > 1
    assert prefill_crossings(CostModel(with_split(profile, 50.0)), units, devices, s, 512) == 1
    # streaming off, or a ubatch too small for op offload: crossings as before whatever the profile
    off = dataclasses.replace(s, stream_slots=0)
    assert prefill_crossings(CostModel(with_split(profile, 50.0)), units, devices, off, 512) == n_alternations
    assert prefill_crossings(CostModel(with_split(profile, 50.0)), units, devices, s, 16) == n_alternations
