"""Plan semantics: llama.cpp's placement rules, merged override patterns, memory prediction, flags."""

import dataclasses
import json
import random
import re
import shlex

import pytest

from oatoplan import plan as planner
from oatoplan.artifacts import dumps, from_jsonable, read_json
from oatoplan.errors import ArtifactError, PlanError
from oatoplan.graph import CPU
from oatoplan.inventory import read_inventory
from oatoplan.machine import default_threads
from oatoplan.names import OVERRIDE_PATTERN_SYNTAX
from oatoplan.plan import (CPU_DEFAULTS, TIED_OUTPUT, check_plan, default_device,
                           layer_devices, llama_cpp_flags, llama_server_command, make_plan, override_pattern,
                           predict_memory, tensor_devices)
from oatoplan.schema import Plan, TensorOverride, Workload
from oatoplan.solve import CPU_UBATCH_CANDIDATES
from profiles import shipped_cpu_profile, synthetic_profile


@pytest.fixture(scope="module")
def qwen(qwen_header_model):
    return read_inventory(qwen_header_model)


def test_ngl_counts_output_as_a_layer(qwen):
    # -ngl 1: output only; -ngl 15: output + blocks 14..27; input always on the CPU
    assert default_device(qwen, "output", None, 1, "CUDA0") == "CUDA0"
    assert default_device(qwen, "layer", 27, 1, "CUDA0") == CPU
    assert [default_device(qwen, "layer", il, 15, "CUDA0") for il in (13, 14, 27)] == [CPU, "CUDA0", "CUDA0"]
    assert default_device(qwen, "input", None, -1, "CUDA0") == CPU
    assert default_device(qwen, "layer", 0, -1, None) == CPU


def test_layer_offload_bytes_match_baselines(qwen):
    # baselines.md: -ngl 15 puts 2,314 MiB of weights on the GPU
    plan = make_plan(qwen, {}, n_gpu_layers=15, gpu_devices=("CUDA0",))
    assert plan.tensor_overrides == () and plan.use_mmap is False
    assert plan.memory.model_bytes["CUDA0"] // 2**20 == 2314
    assert sum(plan.memory.model_bytes.values()) == qwen.total_bytes
    assert layer_devices(qwen, plan).count("CUDA0") == 14


def test_ffn_on_cpu_placement_matches_baselines(qwen):
    # all layers on GPU, output + FFN of layers 0-13 on CPU (baselines.md's row; its 1,919 MiB does not follow from
    # the tensor table, which gives 2,112 MiB: checked here against a plain sum instead)
    cpu = {t.name: CPU for t in qwen.tensors if (t.layer is not None and t.layer < 14 and t.role.startswith("ffn_")
                                                 and t.role != "ffn_norm") or t.name == "output.weight"}
    plan = make_plan(qwen, cpu, n_gpu_layers=-1, gpu_devices=("CUDA0",))
    assert len(plan.tensor_overrides) == 1 and plan.tensor_overrides[0].device == CPU
    on_gpu = sum(t.n_bytes for t in qwen.tensors if t.name not in cpu and t.name != "token_embd.weight")
    assert plan.memory.model_bytes["CUDA0"] == on_gpu and on_gpu // 2**20 == 2111
    placed = tensor_devices(qwen, plan)
    assert all(placed[name] == CPU for name in cpu)
    assert sum(device == CPU for device in placed.values()) == len(cpu) + 1   # + token_embd


def test_override_pattern_matches_exactly_its_tensors(qwen):
    names = [t.name for t in qwen.tensors]
    chosen = ["blk.3.ffn_up.weight", "blk.3.ffn_gate.weight", "blk.7.ffn_up.weight", "blk.7.ffn_gate.weight",
              "blk.1.attn_q.bias", "blk.10.attn_q.bias", "output.weight"]
    pattern = re.compile(override_pattern(chosen))
    assert sorted(n for n in names if pattern.search(n)) == sorted(chosen)
    assert override_pattern(["blk.3.ffn_up.weight", "blk.7.ffn_up.weight"]) == \
        r"^(?:blk\.(?:3|7)\.(?:ffn_up\.weight))$"


def test_override_patterns_keep_to_the_subset_both_regex_dialects_read_alike(qwen):
    """Random subsets of a real tensor table: every pattern is in the subset (no classes, quantifiers, \\Z...) and
    matches exactly its names; what llama.cpp's std::regex does with it is checked on real loads (test_load)."""
    rng = random.Random(0)
    names = [t.name for t in qwen.tensors]
    for _ in range(50):
        chosen = rng.sample(names, rng.randint(1, 40))
        pattern = override_pattern(chosen)
        assert OVERRIDE_PATTERN_SYNTAX.fullmatch(pattern), pattern
        assert sorted(n for n in names if re.search(pattern, n)) == sorted(chosen)
    assert not OVERRIDE_PATTERN_SYNTAX.fullmatch(r"^(?:blk\.0\.ffn_up\.weight\Z)$")
    assert not OVERRIDE_PATTERN_SYNTAX.fullmatch(r"^(?:blk\.[[:digit:]]\.ffn_up\.weight)$")
    with pytest.raises(PlanError, match="characters"):
        override_pattern(["blk.0.ffn_up.weight", "odd name+"])


def test_check_plan_refuses_hand_edited_tensor_lists(qwen):
    plan = make_plan(qwen, {"blk.0.ffn_up.weight": CPU}, n_gpu_layers=-1, gpu_devices=("CUDA0",))
    unknown = dataclasses.replace(plan, tensor_overrides=(TensorOverride(CPU, ("blk.99.ffn_up.weight",)),))
    with pytest.raises(PlanError, match="does not have"):
        check_plan(qwen, unknown, "p.json")
    twice = dataclasses.replace(plan, tensor_overrides=(TensorOverride(CPU, ("blk.0.ffn_up.weight",)),
                                                         TensorOverride("CUDA0", ("blk.0.ffn_up.weight",))))
    with pytest.raises(PlanError, match="two overrides"):
        check_plan(qwen, twice, "p.json")


def test_a_plan_with_a_hand_written_pattern_is_refused(qwen, tmp_path):
    """Plans carry tensor lists; a pattern in the file (hand-written, or from an older oatoplan) is not applied."""
    plan = make_plan(qwen, {"blk.0.ffn_up.weight": CPU}, n_gpu_layers=-1, gpu_devices=("CUDA0",))
    data = json.loads(dumps(plan))
    data["tensor_overrides"] = [{"pattern": r"blk\.0\.ffn_up\.weight\Z", "device": "CPU"}]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="pattern"):
        read_json(Plan, path)


def test_tied_output_copy(tiny_tied_model):
    inv = read_inventory(tiny_tied_model)
    embd = inv.tensor("token_embd.weight").n_bytes
    plan = make_plan(inv, {}, n_gpu_layers=1, gpu_devices=("CUDA0",))
    placed = tensor_devices(inv, plan)
    assert placed["token_embd.weight"] == CPU and placed[TIED_OUTPUT] == "CUDA0"
    assert plan.memory.model_bytes["CUDA0"] == embd + inv.tensor("output_norm.weight").n_bytes
    # both copies to the CPU: one override, the output copy costs no VRAM
    plan = make_plan(inv, {TIED_OUTPUT: CPU}, n_gpu_layers=1, gpu_devices=("CUDA0",))
    assert tensor_devices(inv, plan)[TIED_OUTPUT] == CPU
    assert plan.memory.model_bytes.get("CUDA0", 0) == inv.tensor("output_norm.weight").n_bytes
    with pytest.raises(PlanError, match="tied embeddings"):
        make_plan(inv, {"token_embd.weight": "CUDA0", TIED_OUTPUT: CPU}, n_gpu_layers=1, gpu_devices=("CUDA0",))


def test_kv_cache_follows_layers(qwen):
    plan = make_plan(qwen, {}, n_gpu_layers=15, gpu_devices=("CUDA0",), n_ctx=4096)
    per_layer = 4096 * 4 * 128 * 2 * 2
    assert plan.memory.kv_bytes == {"CUDA0": 14 * per_layer, CPU: 14 * per_layer}


def test_plan_json_round_trip(qwen):
    plan = make_plan(qwen, {"blk.0.ffn_up.weight": "CUDA0"}, n_gpu_layers=0, gpu_devices=("CUDA0",))
    assert from_jsonable(Plan, json.loads(dumps(plan)), "test") == plan
    assert predict_memory(qwen, plan) == plan.memory


def test_flags(qwen):
    plan = make_plan(qwen, {"output.weight": CPU}, n_gpu_layers=-1, gpu_devices=("CUDA0",), n_ubatch=2048)
    flags = llama_cpp_flags(plan)
    assert "-ngl -1" in flags and "-ub 2048" in flags and "-b 2048" in flags and "-lm none" in flags
    assert r"-ot '^(?:output\.weight)$=CPU'" in flags


def test_llama_server_command(qwen):
    plan = make_plan(qwen, {"output.weight": CPU}, n_gpu_layers=-1, gpu_devices=("CUDA0",), n_ubatch=2048,
                     n_threads=6, n_outputs_max=1)
    argv = shlex.split(llama_server_command(plan, "/models/my model.gguf", port=8081))
    assert argv[0] == "OATO_STREAM=0"             # oatoplan's build streams by default; this plan does not
    argv = argv[1:]
    options, i = {}, 1
    while i < len(argv):                          # flags with one value each, but for the two switches
        switch = argv[i] in ("--swa-full", "--no-op-offload")
        options[argv[i]] = True if switch else argv[i + 1]
        i += 1 if switch else 2
    assert argv[0] == "llama-server" and options["-m"] == "/models/my model.gguf" and options["-a"] == "my model"
    assert options["-ngl"] == "-1" and options["-ub"] == options["-b"] == "2048" and options["-t"] == "6"
    assert options["-ot"] == r"^(?:output\.weight)$=CPU" and options["-fa"] == "on"
    # mmap off is --load-mode none in this llama.cpp; one slot with the whole context; no refitting
    assert options["-lm"] == "none" and "--no-mmap" not in argv
    assert options["-np"] == "1" and options["-fit"] == "off" and options["--swa-full"]
    assert (options["--host"], options["--port"]) == ("127.0.0.1", "8081")
    assert not any("output" in a and a.startswith("-") for a in argv)   # n_outputs_max: no flag
    mapped = shlex.split(llama_server_command(make_plan(qwen, {}, n_gpu_layers=0), "m.gguf"))
    assert "-lm" not in mapped and mapped[mapped.index("-ngl") + 1] == "0"


# ---------------------------------------------------------------------------------------------------------------
# CPU-only plans

def _assert_cpu_plan(plan: Plan, inv, workload: Workload) -> None:
    """Nothing on a GPU; this machine's cores; the ubatch the cost model predicts fastest among the candidates."""
    assert plan.gpu_devices == () and plan.n_gpu_layers == 0 and plan.tensor_overrides == ()
    assert not plan.op_offload and plan.use_mmap and plan.flash_attn and plan.n_outputs_max == 1
    assert plan.n_threads == default_threads() and f"-t {plan.n_threads}" in plan.flags
    assert "--no-op-offload" in plan.flags and "--no-mmap" not in plan.flags
    assert plan.n_ctx == workload.n_ctx and plan.workload == workload and plan.budget_bytes == 0
    assert set(plan.placement.values()) == {CPU} and plan.prediction.gpu_bytes == {}
    assert plan.memory.kv_bytes.keys() == {CPU} and plan.memory.compute_bytes == {}
    check_plan(inv, plan, "plan")
    # the notes list every candidate's predicted prefill; the chosen ubatch is their argmin
    note = next(n for n in plan.notes if n.startswith(f"ubatch {plan.n_ubatch}: the shortest predicted prefill"))
    times = {int(ub): float(ms) for ub, ms in re.findall(r"(\d+): ([0-9.]+) ms", note)}
    assert times and set(times) <= set(CPU_UBATCH_CANDIDATES) and plan.n_ubatch == plan.n_batch
    assert times[plan.n_ubatch] == min(times.values())
    assert round(plan.prediction.prefill_s * 1e3, 1) == times[plan.n_ubatch]
    assert any("CPU_REPACK" in n for n in plan.notes)


@pytest.mark.parametrize("model", ["tiny_model", "gemma_model"])
def test_cpu_plan_from_the_shipped_cpu_profile(model, request):
    inv = read_inventory(request.getfixturevalue(model))
    profile, workload = shipped_cpu_profile(), Workload(512, 128)
    plan = planner.plan_model(inv, profile, 0, workload)
    _assert_cpu_plan(plan, inv, workload)
    assert plan.profile_id == profile.profile_id and plan.llama_cpp_build == profile.machine.llama_cpp_build
    assert any(f"profile {profile.profile_id} has no GPU" in n for n in plan.notes)
    # a VRAM budget changes nothing without a GPU in the profile (and says so)
    budgeted = planner.plan_model(inv, profile, 3 << 30, workload)
    assert dataclasses.replace(budgeted, notes=()) == dataclasses.replace(plan, notes=())
    assert any("VRAM budget of 3.0 GiB is not used" in n for n in budgeted.notes)


def test_vram_0_with_a_gpu_profile_is_truly_cpu_only(tiny_model):
    inv, workload = read_inventory(tiny_model), Workload(2048, 64)
    plan = planner.plan_model(inv, synthetic_profile(), 0, workload)
    _assert_cpu_plan(plan, inv, workload)
    assert any("op offload off" in n and "CUDA0" in n for n in plan.notes)
    # predicted with the CPU side of the profile alone: no GPU launch, no VRAM, the same as a CPU-only profile
    assert plan.prediction == planner.plan_model(inv, synthetic_profile(gpu=False), 0, workload).prediction
    # the synthetic profile timed 16 threads: the plan says its times are for those, not this machine's
    assert any("the profile timed 16 threads" in n for n in plan.notes) == (default_threads() != 16)


def test_cpu_plan_write_lp_refused(tiny_model, tmp_path):
    with pytest.raises(PlanError, match="--write-lp"):
        planner.plan_model(read_inventory(tiny_model), shipped_cpu_profile(), 0, Workload(), tmp_path / "p.lp")


@pytest.mark.parametrize("logical, profile_threads, predicted", [
    (2, 2, False),     # decodes on 1 thread, prefills on 2: the profile timed 2 only
    (32, 16, False),   # 16 and 32
    (1, 1, True),      # llama-cpp-python runs 1 and 1: what the profile timed
])
def test_llama_cpp_python_defaults_predicted_only_at_the_profiles_threads(tiny_model, monkeypatch, logical,
                                                                          profile_threads, predicted):
    monkeypatch.setattr(planner, "logical_cpus", lambda: logical)
    profile = dataclasses.replace(shipped_cpu_profile(), n_threads=profile_threads)
    plan = planner.plan_model(read_inventory(tiny_model), profile, 0, Workload(512, 128))
    (baseline,) = plan.baselines
    assert baseline.name == CPU_DEFAULTS
    assert f"-t {max(logical // 2, 1)} -tb {logical}" in baseline.flags and "-ub 512" in baseline.flags
    assert (baseline.prediction is not None) == predicted
    if predicted:      # ubatch 512, the same threads: never faster than the plan, which chose among ubatches
        assert baseline.prediction.prefill_s >= plan.prediction.prefill_s
        assert baseline.prediction.decode_s_per_token == pytest.approx(plan.prediction.decode_s_per_token)
    else:
        assert baseline.note.startswith("not predicted") and f"timed {profile_threads} threads only" in baseline.note
