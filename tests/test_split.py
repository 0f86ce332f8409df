"""Plans over several devices: the budgets' syntax, llama.cpp's layer split reproduced, the integer program against
brute force on a one-layer model, plans whose -ts/-ot express exactly the solved placement, and the CLI."""

import dataclasses
import itertools
import json

import pulp
import pytest

from oatoplan.cost import CostModel, combine, fixed_time_us
from oatoplan.errors import OatoError, ProfileError
from oatoplan.graph import CPU, NORM, model_units, role, role_info
from oatoplan.inventory import read_inventory
from oatoplan.memory import Settings, parse_budgets, usable_bytes
from oatoplan.names import split_device
from oatoplan.plan import check_plan, layer_devices, llama_cpp_flags, tensor_devices
from oatoplan.schema import DeviceLink, GpuOverheadSample, Workload
from oatoplan.split import _problem, layer_counts, links, plan_split, predict_split
from conftest import write_tiny_llama
from profiles import synthetic_profile

RPC = "RPC[127.0.0.1:50052]"


def two_device_profile(rpc: bool = False, crossing_us: float = 30.0):
    """The synthetic profile with a second accelerator: CUDA1 with CUDA0's timings, or an RPC device with the CPU's
    timings behind a slow link."""
    p = synthetic_profile(crossing_us=crossing_us)
    # GPU ops 5x faster than the roofline's (whose per-op overhead would keep tiny models on the CPU)
    p = dataclasses.replace(p, ops=tuple(dataclasses.replace(o, t_us=o.t_us / 5) if o.device == "CUDA0" else o
                                         for o in p.ops))
    name, source = (RPC, "CPU") if rpc else ("CUDA1", p.gpu_device)
    ops = tuple(dataclasses.replace(o, device=name) for o in p.ops if o.device == source)
    link = DeviceLink(name, "test device", 8 << 30, 500.0 if rpc else crossing_us, 500.0 if rpc else crossing_us,
                      1.25e9 if rpc else 25e9, 1.25e9 if rpc else 25e9)
    # a measured process overhead of 0, so that tiny models' budgets are about their tensors
    return dataclasses.replace(p, ops=p.ops + ops, devices=(link,), gpu_overhead_bytes=0,
                               gpu_overhead=(GpuOverheadSample(512, 0, 0),))


def test_budgets_parse_in_order_and_refuse_bad_items():
    assert parse_budgets("6GiB") is None and parse_budgets("auto") is None
    budgets = parse_budgets(f"CUDA1=1GiB, CUDA0=512MiB,{RPC}=2GiB")
    assert list(budgets) == ["CUDA1", "CUDA0", RPC]
    assert budgets["CUDA0"] == 512 << 20 and budgets[RPC] == 2 << 30
    for bad in ("CUDA0=1GiB,CUDA0=2GiB", "CPU=1GiB", "CUDA0=", "RPC[x y:1]=1GiB", "CUDA0=lots"):
        with pytest.raises(OatoError):
            parse_budgets(bad)


@pytest.mark.parametrize("counts", [(3, 4), (0, 7), (7, 0), (1, 2, 4), (5, 1, 1)])
def test_split_device_gives_each_device_its_count(counts):
    """llama.cpp's float32 upper_bound over cumulative shares: layer counts as -ts give each device exactly that
    many of the n_gpu_layers layers, in device order."""
    gpus = tuple(f"CUDA{i}" for i in range(len(counts)))
    n_layer, ngl = 9, sum(counts)
    got = [split_device(il, n_layer, ngl, gpus, counts) for il in range(n_layer + 1)]
    assert got[:n_layer + 1 - ngl] == [CPU] * (n_layer + 1 - ngl)
    assert got[n_layer + 1 - ngl:] == [g for g, c in zip(gpus, counts) for _ in range(c)]


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return read_inventory(write_tiny_llama(tmp_path_factory.mktemp("one") / "one.gguf", n_layer=1))


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return read_inventory(write_tiny_llama(tmp_path_factory.mktemp("four") / "four.gguf", n_layer=4))


def _norms_with_consumers(units, placement) -> bool:
    """Every norm where the unit after it in its layer (its consumer) is."""
    return all(placement[u.key] == placement[v.key] for u, v in zip(units, units[1:])
               if role_info(role(u))[1] == NORM and v.layer == u.layer)


def _placements(inv, devices):
    """Every placement the program allows on a one-layer model: the layer (its KV) on a device or the CPU, its
    weights there or on the CPU, output_norm and output anywhere; each norm with its consumer."""
    units = model_units(inv)
    layer = [u for u in units if u.layer is not None]
    free = [u for u in units if u.layer is None]
    for home in [CPU] + devices:
        weights = [u for u in layer if not u.is_attention]
        for on in itertools.product((False, True), repeat=len(weights) if home != CPU else 0):
            base = {u.key: home for u in layer if u.is_attention}
            base.update({u.key: (home if o else CPU) for u, o in itertools.zip_longest(weights, on, fillvalue=False)})
            for rest in itertools.product([CPU] + devices, repeat=len(free)):
                placement = {**base, **{u.key: d for u, d in zip(free, rest)}}
                if _norms_with_consumers(units, placement):
                    yield placement


def best_exists(inv, devices, cost, w, s, device_links, budgets) -> bool:
    _, memory = predict_split(cost, inv, {u.key: CPU for u in model_units(inv)}, w, s, device_links)
    return all(sum(memory[d].values()) <= usable_bytes(b) for d, b in budgets.items())


@pytest.mark.parametrize("rpc", [False, True])
@pytest.mark.parametrize("share", [0.3, 0.7])
def test_program_equals_brute_force(one_layer, rpc, share):
    profile = two_device_profile(rpc)
    cost, w = CostModel(profile), Workload(256, 32)
    devices = ["CUDA0", RPC if rpc else "CUDA1"]
    s = Settings(512, True, True, w.n_ctx, n_outputs_max=1)
    device_links = links(cost, one_layer, devices, s)
    budgets = {}
    for d in devices:     # between nothing and everything on d (op offload alone uses CUDA0)
        _, low = predict_split(cost, one_layer, {u.key: CPU for u in model_units(one_layer)}, w, s, device_links)
        _, high = predict_split(cost, one_layer, {u.key: d for u in model_units(one_layer)}, w, s, device_links)
        low_bytes, high_bytes = sum(low[d].values()), sum(high[d].values())
        budgets[d] = int((low_bytes + share * (high_bytes - low_bytes)) / 0.97) + 1
    assert best_exists(one_layer, devices, cost, w, s, device_links, budgets)
    best = None
    for placement in _placements(one_layer, devices):
        prediction, memory = predict_split(cost, one_layer, placement, w, s, device_links)
        if all(sum(memory[d].values()) <= usable_bytes(b) for d, b in budgets.items()):
            t = combine(prediction.prefill_s, prediction.decode_s_per_token, w)
            best = t if best is None else min(best, t)
    prob, x, _ = _problem(cost, one_layer, budgets, w, s, device_links)
    assert pulp.LpStatus[prob.solve(pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=0))] == "Optimal"
    units = model_units(one_layer)
    chosen = {u.key: next((d for d in devices if x[i, d].value() > 0.5), CPU) for i, u in enumerate(units)}
    prediction, memory = predict_split(cost, one_layer, chosen, w, s, device_links)
    assert all(sum(memory[d].values()) <= usable_bytes(b) for d, b in budgets.items())
    assert combine(prediction.prefill_s, prediction.decode_s_per_token, w) == pytest.approx(best, rel=1e-6)
    # the program's objective is the prediction's time less what no placement changes
    fixed = combine(*fixed_time_us(cost, one_layer, w, s, True), w)
    assert (pulp.value(prob.objective) + fixed) * 1e-6 == pytest.approx(best, rel=1e-6)


def test_plan_expresses_the_solved_placement(four_layers):
    """The plan's -ngl, -ts and overrides put every tensor and KV cache where the solution said (llama.cpp's rules
    replayed), within every device's budget."""
    profile = two_device_profile(crossing_us=0.5)
    cost, w = CostModel(profile), Workload(256, 64)
    s = Settings(512, True, True, w.n_ctx, n_outputs_max=1)
    _, full = predict_split(cost, four_layers, {u.key: "CUDA0" for u in model_units(four_layers)}, w, s,
                            links(cost, four_layers, ["CUDA0", "CUDA1"], s))
    _, empty = predict_split(cost, four_layers, {u.key: CPU for u in model_units(four_layers)}, w, s,
                             links(cost, four_layers, ["CUDA0", "CUDA1"], s))
    need, low = sum(full["CUDA0"].values()), sum(empty["CUDA0"].values())      # op offload alone: a compute buffer
    budgets = {"CUDA0": int((low + 0.5 * (need - low)) / 0.97), "CUDA1": int((low + 0.4 * (need - low)) / 0.97)}
    plan = plan_split(four_layers, profile, budgets, w)
    assert 0 < sum(plan.tensor_split) and all(plan.tensor_split)      # both devices hold layers
    check_plan(four_layers, plan, "plan")
    units = model_units(four_layers)
    placed = tensor_devices(four_layers, plan)
    for u in units:
        if u.is_attention:
            assert layer_devices(four_layers, plan)[u.layer] == plan.placement[u.key], u.key
        elif not (u.is_output and four_layers.tied_output):
            assert {placed[t] for t in u.tensors} == {plan.placement[u.key]}, u.key
    assert plan.tensor_split == layer_counts(units, plan.placement, list(budgets))
    assert _norms_with_consumers(units, plan.placement)
    assert "-dev CUDA0,CUDA1" in plan.flags and f"-ts {','.join(map(str, plan.tensor_split))}" in plan.flags
    for d, b in budgets.items():
        assert plan.memory.model_bytes.get(d, 0) + plan.memory.kv_bytes.get(d, 0) <= usable_bytes(b)
    assert {b.name for b in plan.baselines} == {"llama.cpp layer split (-ts by memory)", "--fit-style fill"}


def test_rpc_plan_flags_name_the_server(four_layers):
    profile = two_device_profile(rpc=True)
    plan = plan_split(four_layers, profile, {"CUDA0": 1 << 20, RPC: 64 << 20}, Workload(64, 8))
    assert plan.rpc_servers == ("127.0.0.1:50052",)
    flags = llama_cpp_flags(plan)
    assert "--rpc 127.0.0.1:50052" in flags and "-dev CUDA0,RPC0" in flags
    moved = [o for o in plan.tensor_overrides if o.device == RPC]
    assert all("=RPC0[127.0.0.1:50052]'" in flags for _ in moved)


def test_device_missing_from_the_profile_says_how_to_profile_it(four_layers):
    with pytest.raises(ProfileError, match="no timings for CUDA7"):
        plan_split(four_layers, two_device_profile(), {"CUDA0": 1 << 20, "CUDA7": 1 << 20}, Workload(64, 8))


def test_cli_plans_over_two_devices(cli, tiny_model, tmp_path):
    from oatoplan.artifacts import write_json
    from oatoplan.files import Output
    profile = write_json(two_device_profile(), Output(tmp_path / "two.json", (), False, "-o"))
    out = tmp_path / "plan.json"
    result = cli(["plan", tiny_model, "--vram", "CUDA0=64MiB,CUDA1=64MiB", "--profile", profile, "-o", out])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["gpu_devices"] == ["CUDA0", "CUDA1"] and len(plan["tensor_split"]) == 2
    assert plan["budgets_bytes"] == {"CUDA0": 64 << 20, "CUDA1": 64 << 20}
    bad = cli(["plan", tiny_model, "--vram", "CUDA0=64MiB,CUDA9=1MiB", "--profile", profile,
               "-o", tmp_path / "p2.json"])
    assert bad.exit_code == 1 and "no timings for CUDA9" in bad.output and "Traceback" not in bad.output


def test_search_split_walks_to_the_best_counts():
    """The pattern search from a far start reaches the minimum of a separable convex time, and never a split that
    does not fit (evaluate: inf)."""
    from oatoplan.split_search import search_split, split_neighbours
    assert all(min(c) >= 0 and sum(c) <= 10 for c in split_neighbours((0, 10), 2, 10))

    def evaluate(counts):
        return float("inf") if counts[1] > 9 else (counts[0] - 7) ** 2 + (counts[1] - 9) ** 2 + 0.1 * sum(counts)
    assert search_split(evaluate, (0, 0), 40) == (7, 9)


def test_llama_3_70b_shape_is_a_real_q4_k_m_70b(tmp_path):
    """The dense 70B header: Llama-3-70B's shapes and llama-quant.cpp's Q4_K_M mix, 42.5 GB like the real file."""
    from oatoplan.testing import moe_header, write_sparse
    inv = read_inventory(write_sparse(moe_header("llama-3-70b"), tmp_path / "l70.gguf"))
    hp = inv.hparams
    assert (hp.architecture, hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv[0], hp.n_vocab, hp.n_expert) == \
        ("llama", 80, 8192, 64, 8, 128256, 0)
    assert len(inv.tensors) == 1 + 80 * 9 + 2
    assert abs(inv.total_bytes / 42.5e9 - 1) < 0.01
    assert inv.tensor("blk.0.ffn_down.weight").ggml_type == "Q6_K"       # use_more_bits layers
    assert inv.tensor("blk.10.ffn_down.weight").ggml_type == "Q4_K"
    assert inv.tensor("blk.10.attn_v.weight").ggml_type == "Q5_K"        # the 70B rule
    assert inv.tensor("blk.10.ffn_up.weight").shape == (8192, 28672)
    assert inv.tensor("output.weight").ggml_type == "Q6_K" and inv.tensor("token_embd.weight").ggml_type == "Q4_K"


def test_split_paper_plans_a_cut_of_the_70b(tmp_path):
    """benchmarks/split_paper's planning on 4 of the 70B's blocks with the shipped H200 profile: both setups, each
    with oatoplan's plan no slower than llama.cpp's splits and flags that name the devices."""
    from benchmarks.split_paper import RPC as PAPER_RPC, paper_rows
    from oatoplan.artifacts import read_json
    from oatoplan.paths import SHIPPED_PROFILES_DIR
    from oatoplan.schema import Profile
    from oatoplan.testing import moe_header, write_sparse
    inv = read_inventory(write_sparse(moe_header("llama-3-70b", 4), tmp_path / "l70-4.gguf"))
    profile = read_json(Profile, SHIPPED_PROFILES_DIR / "h200-qwen2-7b.json")
    rows = paper_rows(inv, profile, prompts=(512,), n_gen=16)
    assert len(rows) == 2 and all(len(r["arms"]) == 3 for r in rows)
    for row in rows:
        ours, *theirs = row["arms"]
        assert all(ours["predicted"]["total_s"] <= t["predicted"]["total_s"] * 1.001 for t in theirs
                   if t["predicted"])
    assert "-dev CUDA0,CUDA1" in rows[0]["arms"][0]["flags"]
    assert f"--rpc {PAPER_RPC[4:-1]}" in rows[1]["arms"][0]["flags"]
