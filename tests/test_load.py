"""Loading through the real llama.cpp (llama-cpp-python, CPU build here): placements, verification, errors."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from oatoplan.errors import ArtifactError, BackendError, LoadError, PlanError, PlanMismatchError
from oatoplan.graph import CPU
from oatoplan.inventory import read_inventory
from oatoplan.artifacts import write_json
from oatoplan.load import generate, load, misplaced_tensors, run_stats
from oatoplan.machine import default_threads, devices, gpu_devices
from oatoplan.plan import cpu_only_plan, make_plan
from oatoplan.schema import TensorOverride

needs_cpu_only_build = pytest.mark.skipif(bool(gpu_devices()), reason="needs a CPU-only llama.cpp build")


def _greedy(llm, n=32) -> list[int]:
    text = "".join(generate(llm, "The quick brown fox", n))
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.close()
    return tokens


def _ffn_plan(inv, **settings):
    """Every FFN weight routed through a CPU override, mmap off: another placement than cpu_only_plan's
    (plain/repacked CPU buffers instead of the mapped file), reached through tensor_buft_overrides."""
    plan = make_plan(inv, {}, n_gpu_layers=0, use_mmap=False, **settings)
    ffn = [t.name for t in inv.tensors if t.role in ("ffn_up", "ffn_gate", "ffn_down")]
    return dataclasses.replace(plan, tensor_overrides=(TensorOverride(CPU, tuple(ffn)),))


def test_devices_include_the_cpu():
    assert devices()[0].name == "CPU" and devices()[0].total_bytes > 0


def test_tiny_model_two_placements_same_greedy_output(tiny_model):
    inv = read_inventory(tiny_model)
    mapped = load(tiny_model, cpu_only_plan(inv, n_ctx=256))
    overridden = load(tiny_model, _ffn_plan(inv, n_ctx=256))
    assert {a.buffer_type for a in mapped.oatoplan_memory.allocations if a.kind == "model"} == {"CPU_Mapped"}
    assert "CPU_Mapped" not in {a.buffer_type for a in overridden.oatoplan_memory.allocations if a.kind == "model"}
    assert _greedy(mapped) == _greedy(overridden)


def test_gemma_two_placements_same_greedy_output(gemma_model):
    inv = read_inventory(gemma_model)
    first = load(gemma_model, cpu_only_plan(inv, n_ctx=512))
    stats_tokens = _greedy(first)
    second = load(gemma_model, _ffn_plan(inv, n_ctx=512))
    assert all(c.ok for c in second.oatoplan_memory.checks)
    assert {c.kind for c in second.oatoplan_memory.checks} == {"model", "KV"}
    assert stats_tokens == _greedy(second)


def test_memory_is_checked_against_the_plan(tiny_model):
    inv = read_inventory(tiny_model)
    plan = _ffn_plan(inv, n_ctx=256)
    llm = load(tiny_model, plan)
    model_check = next(c for c in llm.oatoplan_memory.checks if c.kind == "model")
    assert model_check.ok and model_check.device == CPU
    llm.close()
    wrong = dataclasses.replace(plan, memory=dataclasses.replace(plan.memory, kv_bytes={CPU: 10 * 2**20}))
    with pytest.raises(LoadError, match="MiB of KV on CPU, the plan predicted 10.0 MiB"):
        load(tiny_model, wrong)


def test_run_stats(tiny_model):
    llm = load(tiny_model, cpu_only_plan(read_inventory(tiny_model), n_ctx=256))
    "".join(generate(llm, "Hello there", 8))
    stats = run_stats(llm)
    assert stats.n_prompt_tokens > 0 and stats.n_generated_tokens > 0 and stats.decode_tokens_per_s > 0
    llm.close()


# --- refusals ------------------------------------------------------------------------------------------------------

def test_plan_for_another_model(tiny_model, tiny_tied_model):
    plan = cpu_only_plan(read_inventory(tiny_tied_model))
    with pytest.raises(PlanMismatchError, match="was made for tiny-llama-tied.gguf"):
        load(tiny_model, plan)


def test_plan_for_another_build(tiny_model):
    plan = dataclasses.replace(cpu_only_plan(read_inventory(tiny_model)), llama_cpp_build="llama-cpp-python 0.0.1")
    with pytest.raises(PlanMismatchError, match="was solved for llama-cpp-python 0.0.1"):
        load(tiny_model, plan)


def test_tensor_the_model_lacks(tiny_model):
    plan = dataclasses.replace(cpu_only_plan(read_inventory(tiny_model)),
                               tensor_overrides=(TensorOverride(CPU, ("blk.9.ffn_up.weight",)),))
    with pytest.raises(PlanError, match="does not have"):
        load(tiny_model, plan)


def test_llama_cpp_places_exactly_the_listed_tensors(tiny_model):
    """The loader's pattern goes through llama.cpp's std::regex: its load log names every listed tensor, on the
    plan's device, and no other tensor."""
    inv = read_inventory(tiny_model)
    plan = _ffn_plan(inv)
    llm = load(tiny_model, plan)
    try:
        assert llm.oatoplan_memory.misplaced == ()
        assert len(plan.tensor_overrides[0].tensors) == 3 * inv.hparams.n_layer
    finally:
        llm.close()


def test_misplaced_tensors_from_the_load_log():
    plan = SimpleNamespace(tensor_overrides=(TensorOverride(CPU, ("blk.0.ffn_up.weight", "blk.1.ffn_up.weight")),))
    lines = ["tensor blk.0.ffn_up.weight (0 MiB f16) buffer type overridden to CUDA_Host",
             "tensor blk.2.ffn_up.weight (0 MiB f16) buffer type overridden to CPU",
             "tensor blk.3.ffn_up.weight (0 MiB f16) buffer type overridden to CUDA0"]
    found = misplaced_tensors(lines, plan)
    assert any(p.startswith("blk.1.ffn_up.weight: not overridden") for p in found)
    assert any(p.startswith("blk.2.ffn_up.weight: overridden to CPU") for p in found)
    assert any(p.startswith("blk.3.ffn_up.weight") for p in found)
    assert not any(p.startswith("blk.0.") for p in found)      # CUDA_Host is host memory: the CPU
    repacked = "tensor blk.1.ffn_up.weight (0 MiB f16) buffer type overridden to CPU_REPACK"
    assert misplaced_tensors(lines[:1] + [repacked], plan) == []


def test_unknown_device(tiny_model):
    plan = make_plan(read_inventory(tiny_model), {"output.weight": "NPU3"}, n_gpu_layers=0, gpu_devices=("NPU3",))
    with pytest.raises(BackendError, match="NPU3"):
        load(tiny_model, plan)


def test_placement_arguments_belong_in_the_plan(tiny_model):
    with pytest.raises(LoadError, match="n_gpu_layers must be set in the plan"):
        load(tiny_model, None, n_gpu_layers=3)


@needs_cpu_only_build
def test_gpu_plan_on_a_cpu_build(tiny_model, tmp_path, cli):
    inv = read_inventory(tiny_model)
    plan = make_plan(inv, {}, n_gpu_layers=-1, gpu_devices=("CUDA0",), n_ctx=256)
    with pytest.raises(BackendError, match="places tensors on CUDA0, but this llama-cpp-python has no GPU"):
        load(tiny_model, plan)
    llm = load(tiny_model, plan, cpu_only=True)   # explicitly all on the CPU
    assert {a.device for a in llm.oatoplan_memory.allocations} == {CPU}
    assert not llm.oatoplan_plan.op_offload and not llm.oatoplan_plan.gpu_devices   # nothing for a GPU to run
    llm.close()
    assert not cpu_only_plan(inv).op_offload      # the no-plan default too
    path = write_json(plan, tmp_path / "plan.json")
    result = cli(["run", tiny_model, "--plan", path, "-p", "Hi", "-n", "4"])
    assert result.exit_code == 1 and "--cpu-only" in result.stderr
    result = cli(["run", tiny_model, "--plan", path, "-p", "Hi", "-n", "4", "--cpu-only"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({"schema_version": 99}), "schema_version 99 is not supported"),
    (json.dumps([1, 2]), "not a plan"),
])
def test_bad_plan_files(tiny_model, tmp_path, cli, content, expected):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ArtifactError, match=expected):
        load(tiny_model, path)
    result = cli(["run", tiny_model, "--plan", path, "-p", "Hi"])
    assert result.exit_code == 1 and expected in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plan_with_a_missing_field(tiny_model, tmp_path):
    data = json.loads(json.dumps(dataclasses.asdict(cpu_only_plan(read_inventory(tiny_model)))))
    del data["n_ubatch"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="missing field 'n_ubatch'"):
        load(tiny_model, path)


def test_run_cli_streams_and_reports(tiny_model, tmp_path, cli):
    path = write_json(_ffn_plan(read_inventory(tiny_model), n_ctx=256), tmp_path / "plan.json")
    result = cli(["run", tiny_model, "--plan", path, "-p", "Hello", "-n", "8", "--show-memory"])
    assert result.exit_code == 0, result.stderr
    assert "plan vs allocated" in result.stdout and " NO" not in result.stdout
    assert "prefill" in result.stderr and "tokens/s" in result.stderr


def test_sliding_window_cache_sizes(gemma_model):
    # swa_full off: Gemma's 15 sliding-window layers keep n_swa + n_ubatch cells instead of the whole context
    inv = read_inventory(gemma_model)
    for swa_full in (True, False):
        plan = make_plan(inv, {}, n_gpu_layers=0, n_ctx=4096, swa_full=swa_full)
        llm = load(gemma_model, plan)
        kv = next(c for c in llm.oatoplan_memory.checks if c.kind == "KV")
        assert kv.ok and kv.allocated_bytes == (72 if swa_full else 27) * 2**20
        llm.close()


def test_package_entry_point(tiny_model):
    import oatoplan
    llm = oatoplan.load(tiny_model)
    assert llm.tokenize(b"hello")
    llm.close()


def _compute_mib(llm) -> float:
    return sum(a.n_bytes for a in llm.oatoplan_memory.allocations if a.kind == "compute") / 2**20


def test_one_logit_row_per_ubatch_is_applied(gemma_model):
    """A plan's n_outputs_max reaches llama.cpp (Gemma's 262k-entry vocabulary: 512 MiB of logits per 512-token
    ubatch leave the compute buffer; generation unchanged), and logits for every token, which it rules out, are
    refused up front."""
    inv = read_inventory(gemma_model)
    every = cpu_only_plan(inv, n_ctx=512, n_batch=512, n_ubatch=512)
    one = dataclasses.replace(every, n_outputs_max=1)
    texts, compute = [], []
    for plan in (every, one):
        llm = load(gemma_model, plan)
        compute.append(_compute_mib(llm))
        texts.append("".join(generate(llm, "the cat", 8)))
        llm.close()
    assert texts[0] == texts[1]
    assert compute[0] - compute[1] >= 450          # MiB (514.5 -> 18.8 measured here)
    with pytest.raises(LoadError, match="n_outputs_max"):
        load(gemma_model, one, logits_all=True)


def test_threads_decode_and_prefill_alike(tiny_model):
    # no plan: this machine's physical cores for both (llama-cpp-python would prefill on all logical CPUs and
    # decode on half of them)
    llm = load(tiny_model)
    assert llm.context_params.n_threads == llm.context_params.n_threads_batch == default_threads()
    llm.close()
    # a plan's thread count is what runs, prefill included
    llm = load(tiny_model, cpu_only_plan(read_inventory(tiny_model), n_ctx=256, n_threads=1))
    assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (1, 1)
    llm.close()
    with pytest.raises(LoadError, match="n_threads_batch must be set in the plan"):
        load(tiny_model, n_threads_batch=2)
