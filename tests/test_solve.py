"""The integer program: exact against brute force on small instances, monotone in VRAM, within budget,
deterministic, and workload-aware; the settings of a run all on the CPU."""

import itertools

import pytest

from oatoplan.cost import CostModel, cpu_cost_model, predict
from oatoplan.graph import model_units
from oatoplan.memory import Settings
from oatoplan.inventory import read_inventory
from oatoplan.schema import Workload
from oatoplan.solve import (CPU_UBATCH_CANDIDATES, GAP_REL, PlanInfeasibleError, greedy, instance, objective, solve,
                            solve_cpu, solve_instance, vram_mib)
from oatoplan.units import BYTES_PER_MIB
from conftest import write_tiny_llama
from profiles import shipped_cpu_profile, synthetic_profile


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return read_inventory(write_tiny_llama(tmp_path_factory.mktemp("one") / "one.gguf", n_layer=1))


def _brute_force(inst, budget_mib):
    best = None
    for chosen in itertools.product((0, 1), repeat=len(inst.units)):
        if vram_mib(inst, list(chosen)) <= budget_mib:
            value = objective(inst, list(chosen))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("workload", [Workload(512, 128), Workload(2048, 4), Workload(16, 256, objective="decode")])
@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_ilp_equals_brute_force(one_layer, offload, workload, share):
    cost = CostModel(synthetic_profile(crossing_us=5.0))
    inst = instance(cost, one_layer, workload, Settings(512, offload, True, workload.n_ctx))
    assert len(inst.units) <= 12
    low, high = vram_mib(inst, [0] * len(inst.units)), vram_mib(inst, [1] * len(inst.units))
    budget = low + share * (high - low)
    best = _brute_force(inst, budget)
    chosen, value = solve_instance(inst, budget, gap=0.0)          # proven optimal
    assert vram_mib(inst, chosen) <= budget + 1e-9
    assert value == pytest.approx(best, rel=1e-9)
    chosen, value = solve_instance(inst, budget)                   # what plan uses: within the accepted gap
    assert vram_mib(inst, chosen) <= budget + 1e-9 and value <= best * (1 + GAP_REL)


def test_objective_is_what_predict_says(one_layer):
    cost = CostModel(synthetic_profile())
    w, s = Workload(300, 40), Settings(512, True, True, 340)
    inst = instance(cost, one_layer, w, s)
    for pattern in ([0] * 12, [1] * 12, [i % 2 for i in range(12)]):
        devices = {u.key: "CUDA0" if c else "CPU" for u, c in zip(inst.units, pattern)}
        prediction = predict(cost, one_layer, devices, w, s)
        assert objective(inst, pattern) == pytest.approx(prediction.total_s * 1e6, rel=1e-9)
        assert vram_mib(inst, pattern) == pytest.approx(sum(prediction.gpu_bytes.values()) / BYTES_PER_MIB)


@pytest.fixture(scope="module")
def qwen(qwen_header_model):
    return read_inventory(qwen_header_model)


def test_more_vram_is_never_slower_and_budget_holds(qwen):
    cost = CostModel(synthetic_profile())
    w = Workload(512, 128)
    previous = None
    for gib in (1.0, 2.0, 3.0, 4.5):
        solution = solve(qwen, cost, int(gib * 2**30), w)
        assert sum(solution.prediction.gpu_bytes.values()) <= gib * 2**30
        if previous is not None:
            assert solution.objective_us <= previous * (1 + GAP_REL)     # within the solver's proven gap
        previous = solution.objective_us


def test_same_inputs_same_plan(qwen):
    cost = CostModel(synthetic_profile())
    a = solve(qwen, cost, 3 << 30, Workload(512, 128))
    b = solve(qwen, cost, 3 << 30, Workload(512, 128))
    assert a.devices == b.devices and a.settings == b.settings


def test_prefill_and_decode_heavy_workloads_differ(qwen):
    cost = CostModel(synthetic_profile())
    prefill = solve(qwen, cost, 3 << 30, Workload(4096, 1, objective="ttft"))
    decode = solve(qwen, cost, 3 << 30, Workload(16, 512, objective="decode"))
    assert (prefill.devices, prefill.settings) != (decode.devices, decode.settings)
    # prefill favours op offload and a large ubatch; decode has no use for the compute buffer's room
    assert prefill.settings.op_offload and prefill.settings.n_ubatch >= decode.settings.n_ubatch


def test_ilp_beats_greedy(qwen):
    cost = CostModel(synthetic_profile())
    w = Workload(512, 128)
    solution = solve(qwen, cost, int(2.5 * 2**30), w)
    g = greedy(qwen, cost, int(2.5 * 2**30), w, solution.settings)
    assert solution.prediction.total_s <= predict(cost, qwen, g, w, solution.settings).total_s


def test_infeasible_budget_names_the_smallest(qwen):
    with pytest.raises(PlanInfeasibleError, match=r"the smallest needs .* \(use --vram \d+MiB or more\)"):
        solve(qwen, CostModel(synthetic_profile()), 10 << 20, Workload(512, 128))


def test_units_cover_every_block_tensor_once(qwen):
    names = [n for u in model_units(qwen) for n in u.tensors]
    assert len(names) == len(set(names))
    assert set(names) == {t.name for t in qwen.tensors if t.group != "input"}


# ---------------------------------------------------------------------------------------------------------------
# All on the CPU

@pytest.mark.parametrize("n_prompt", [8, 512, 3000])
def test_cpu_ubatch_is_the_argmin_of_predicted_prefill(tiny_model, n_prompt):
    inv, cost = read_inventory(tiny_model), cpu_cost_model(shipped_cpu_profile())
    w = Workload(n_prompt, 16)
    solution = solve_cpu(inv, cost, w)
    ubatches = [s.n_ubatch for s, _ in solution.candidates]
    assert ubatches and set(ubatches) <= set(CPU_UBATCH_CANDIDATES)
    # the shipped CPU profile timed CPU batches up to 512 tokens: larger ubatches are not candidates
    assert max(ubatches) == 512 and all(ub > 512 for ub in solution.unmeasured)
    assert bool(solution.unmeasured) == (n_prompt > 512)
    best = min(p.prefill_s for _, p in solution.candidates)
    assert solution.prediction.prefill_s == best and solution.settings.n_ubatch in ubatches
    s = solution.settings
    assert not s.op_offload and not s.pinned and s.n_outputs_max == 1 and s.n_ctx == w.n_ctx
    # the prediction is cost.predict with every unit on the CPU
    all_cpu = {u.key: "CPU" for u in model_units(inv)}
    assert solution.prediction == predict(cost, inv, all_cpu, w, s)
    assert solution.prediction.gpu_bytes == {} and solution.prediction.n_crossings == 0
    if n_prompt <= 128:      # one ubatch whatever its size: a tie, the larger one wins
        assert len({p.prefill_s for _, p in solution.candidates}) == 1 and s.n_ubatch == 512


def test_cpu_settings_from_a_gpu_profile_ignore_the_gpu(tiny_model):
    inv, w = read_inventory(tiny_model), Workload(512, 16)
    with pytest.raises(ValueError):
        solve_cpu(inv, CostModel(synthetic_profile()), w)
    gpu_side, cpu_only = cpu_cost_model(synthetic_profile()), cpu_cost_model(synthetic_profile(gpu=False))
    assert gpu_side.gpu is None
    assert solve_cpu(inv, gpu_side, w).prediction == solve_cpu(inv, cpu_only, w).prediction
