"""The segment KV cache in plans (oatoplan/segments.py, memory.kv_split_bytes, the planner's candidates, load's
refusal): for a context asked far longer than the workload, the plan keeps the workload's cells with each layer and
the rest in host memory, and says why; where it gains nothing, it is not used."""

import dataclasses
import importlib
import json
import os

import pytest

from oatoplan import segments
from oatoplan.artifacts import read_json, write_json
from oatoplan.errors import PlanError
from oatoplan.inventory import kv_bytes_per_token, read_inventory
from oatoplan.memory import (Settings, gpu_overhead_bytes, kv_split_bytes, segment_copy_bytes,
                             segment_kv_cells, usable_bytes, vram_terms)
from oatoplan.graph import CPU, model_units
from oatoplan.plan import check_plan, layer_devices, llama_server_command, plan_for, plan_model
from oatoplan.schema import Plan, Workload
from oatoplan.segments import KV_OFFLOAD_PATCH, KV_SEGMENT_PATCH, segment_cells_for, segment_env
from oatoplan.units import BYTES_PER_GIB as GIB
from profiles import synthetic_profile

CHAT = Workload(n_prompt=512, n_gen=128, n_ctx_asked=32768)


@pytest.fixture(scope="module")
def qwen(qwen_header_model):
    return read_inventory(qwen_header_model)


@pytest.fixture
def patched(monkeypatch):
    """Plans are made for a build that has the segment KV cache's placement patch (and its own types' patch)."""
    monkeypatch.setattr(segments, "target_build", lambda profile: f"oatoplan patches 0:0008-llama-oato-{KV_SEGMENT_PATCH},"
                                                                  f"0010-llama-oato-{segments.KV_TYPES_PATCH}")


def test_no_segments_for_a_k_type_cudas_segmented_attention_lacks(qwen, patched):
    plan = plan_model(qwen, synthetic_profile(), 3 * GIB, dataclasses.replace(CHAT, type_k="q4_0", type_v="q4_0"))
    assert not plan.kv_segments and plan.n_ctx == 32768
    assert any(n.startswith("segment KV cache: not used with K cache type q4_0") for n in plan.notes), plan.notes


@pytest.mark.parametrize("workload, cells", [
    (CHAT, 768),                                                   # 640 tokens used, rounded up to 256
    (Workload(n_prompt=512, n_gen=128), 0),                        # no context asked beyond the workload
    (Workload(n_depth=3000, n_prompt=900, n_gen=100, n_ctx_asked=4096), 0),     # 4000 used: rounds up to all of it
    (Workload(n_depth=4096, n_prompt=512, n_gen=128, n_ctx_asked=32768), 4864),
])
def test_first_segment_is_what_the_workload_fills(workload, cells):
    assert segment_cells_for(workload) == cells


def test_kv_bytes_split_between_the_layer_and_host_memory(qwen):
    hp = qwen.hparams
    per_cell = kv_bytes_per_token(hp, 0, "f16", "f16")
    stock = Settings(512, True, True, 32768)
    segmented = dataclasses.replace(stock, segment_cells=768)
    assert kv_split_bytes(hp, 0, stock) == (32768 * per_cell, 0)
    with_layer, host = kv_split_bytes(hp, 0, segmented)
    assert with_layer == 769 * per_cell                            # P cells and segment 0's spare
    assert with_layer + host == segment_kv_cells(hp, 0, 32768, 512, 768, 0) * per_cell
    assert 0 < host < 1024 * per_cell                              # segment 1 starts with one chunk, not 32k cells
    assert kv_split_bytes(hp, 0, dataclasses.replace(stock, segment_cells=32768)) == (32768 * per_cell, 0)


def test_plan_keeps_the_workloads_cells_in_vram_and_the_rest_on_the_host(qwen, patched):
    profile = synthetic_profile()
    plan = plan_model(qwen, profile, 3 * GIB, CHAT)
    stock = plan_model(qwen, profile, 3 * GIB, CHAT, segments=False)
    first, rest = plan.kv_segments
    assert (first.first_cell, first.end_cell, first.device) == (0, 768, "layer")
    assert (rest.first_cell, rest.end_cell, rest.device, rest.growth_cells) == (768, 32768, "CPU", 256)
    assert first.layers == rest.layers == tuple(range(qwen.hparams.n_layer))
    assert not stock.kv_segments and stock.n_ctx == plan.n_ctx == 32768
    # the whole 32k context's KV cache (1.75 GiB for this shape) no longer competes with weights for 3 GiB
    assert plan.prediction.gpu_bytes["kv"] < stock.prediction.gpu_bytes["kv"] / 10 or \
        plan.prediction.gpu_bytes["weights"] > stock.prediction.gpu_bytes["weights"]
    assert plan.prediction.total_s < stock.prediction.total_s
    assert plan.memory.kv_bytes.get("CPU", 0) > 0
    assert any(n.startswith("segment KV cache: cells 0-768") for n in plan.notes)
    assert segment_env(plan.kv_segments) == {"OATO_SEGMENT_KV": "768", "OATO_SEGMENT_KV_HOST": "1",
                                             "OATO_SEGMENT_KV_CHUNK": "256"}
    assert "OATO_SEGMENT_KV=768 OATO_SEGMENT_KV_HOST=1" in llama_server_command(plan, "m.gguf")
    check_plan(qwen, plan, "plan.json")


@pytest.mark.parametrize("budget_gib", [2.5, 3])
def test_a_prompt_batch_past_p_copies_the_host_segment_within_the_budget(qwen, monkeypatch, budget_gib):
    """With patches/0012 in the build, the host segment gets the cells whose copy (one layer's K/V on top of the
    layer stage, the mask columns on top of the layer stage and its weight copy) fits the VRAM the placement leaves
    under the budget, a multiple of 256; the environment and llama-server's command carry it; the note says how far a prompt batch runs on
    the GPU. Without the patch: 0, and the note says the batch runs on the CPU."""
    monkeypatch.setattr(segments, "target_build", lambda profile: f"oatoplan patches 0:0008-llama-oato-"
                        f"{KV_SEGMENT_PATCH} 0:0012-llama-oato-{KV_OFFLOAD_PATCH}")
    profile, budget = synthetic_profile(), int(budget_gib * GIB)
    plan = plan_model(qwen, profile, budget, CHAT)
    cells = plan.kv_segments[-1].offload_cells
    assert 0 < cells <= 32768 - 768 and cells % 256 == 0
    units = model_units(qwen)
    s = Settings(plan.n_ubatch, plan.op_offload, not plan.use_mmap, plan.n_ctx, plan.type_k, plan.type_v,
                 plan.n_outputs_max, plan.stream_slots, 768)
    terms = vram_terms(qwen, units, s, gpu_overhead_bytes(profile))
    on_gpu = [plan.placement[u.key] != CPU for u in units]
    vram = terms.of(on_gpu)
    assert vram == plan.prediction.gpu_bytes
    def past_p(n):          # the compute buffer while a batch attends to n host cells on the GPU
        kv, mask = segment_copy_bytes(qwen.hparams, s, n)
        layer = terms.layer_stage_bytes
        return max(vram["compute"], layer + terms.layer_copy(on_gpu) + mask, layer + kv + mask)
    assert sum(vram.values()) - vram["compute"] + past_p(cells) <= usable_bytes(budget)
    assert cells == 32768 - 768 or \
        sum(vram.values()) - vram["compute"] + past_p(cells + 256) > usable_bytes(budget)
    assert segment_env(plan.kv_segments)["OATO_SEGMENT_KV_OFFLOAD"] == str(cells)
    assert f"OATO_SEGMENT_KV_OFFLOAD={cells}" in llama_server_command(plan, "m.gguf")
    assert any(f"on the GPU, their K/V copied there one layer at a time, up to {cells} host cells" in n
               for n in plan.notes)
    check_plan(qwen, plan, "plan.json")
    monkeypatch.setattr(segments, "target_build", lambda profile: f"oatoplan patches 0:0008-llama-oato-{KV_SEGMENT_PATCH}")
    without = plan_model(qwen, profile, budget, CHAT)
    assert without.kv_segments[-1].offload_cells == 0 and "OATO_SEGMENT_KV_OFFLOAD" not in segment_env(without.kv_segments)
    assert any("much slower, since the host segment is not copied to the GPU" in n for n in without.notes)


def test_the_copy_of_host_cells_in_bytes(qwen):
    """Qwen2-7B (4 KV heads of 128): one layer's f16 K and V are 2 KiB a cell, the f16 mask column 2 bytes a ubatch
    token; a q8_0 cache's copy (2 x 4 x 136 bytes) comes with CUDA's f16 conversion of it (2 KiB)."""
    s = Settings(512, True, True, 32768, segment_cells=768)
    assert segment_copy_bytes(qwen.hparams, s, 256) == (256 * 2048, 256 * 1024)
    q8 = dataclasses.replace(s, type_k="q8_0", type_v="q8_0")
    assert segment_copy_bytes(qwen.hparams, q8, 256) == (256 * (1088 + 2048), 256 * 1024)
    # a q8_0 cache whose host segment is f16: the copy is of the host segment's f16 cells
    assert segment_copy_bytes(qwen.hparams, dataclasses.replace(q8, host_kv_types=("f16", "f16")), 256) == \
        (256 * 2048, 256 * 1024)


def _with_q8_attention(profile, factor: float):
    """`profile` with one-token attention over q8_0 K/V timed at `factor` x its f16 time on every device."""
    q8 = tuple(dataclasses.replace(o, ggml_type="Q8_0", t_us=factor * o.t_us) for o in profile.ops
               if o.op == "FLASH_ATTN_EXT" and o.n_tokens == 1)
    return dataclasses.replace(profile, ops=profile.ops + q8)


@pytest.mark.parametrize("factor, host", [(1.5, ("f16", "f16")), (0.6, ("q8_0", "q8_0")), (None, ("q8_0", "q8_0"))])
def test_the_host_segments_types_are_chosen_by_the_cpus_attention(qwen, patched, tmp_path, monkeypatch, factor,
                                                                  host):
    """-ctk q8_0 -ctv q8_0 with segments: the first segment (in VRAM) is q8_0; the host segment is f16 where the
    profile's CPU attends to one token over the whole context faster in f16 (factor: q8_0's time over f16's), else
    q8_0, as it is where the profile has no q8_0 timings. Bytes counted per segment; the environment and the
    plan file carry it; check_plan accepts it and refuses a type llama.cpp lacks."""
    profile = synthetic_profile() if factor is None else _with_q8_attention(synthetic_profile(), factor)
    workload = dataclasses.replace(CHAT, type_k="q8_0", type_v="q8_0")
    plan = plan_model(qwen, profile, 3 * GIB, workload)
    first, rest = plan.kv_segments
    assert (first.type_k, first.type_v) == ("q8_0", "q8_0") and (rest.type_k, rest.type_v) == host
    env = segment_env(plan.kv_segments)
    assert env.get("OATO_SEGMENT_KV_TYPES1") == ("f16,f16" if host[0] == "f16" else None)
    s = Settings(plan.n_ubatch, True, True, 32768, "q8_0", "q8_0", segment_cells=768, host_kv_types=host)
    split = [kv_split_bytes(qwen.hparams, il, s) for il in range(qwen.hparams.n_layer)]
    on_cpu = [d == CPU for d in layer_devices(qwen, plan)]
    assert plan.memory.kv_bytes["CPU"] == sum(h + (w if c else 0) for (w, h), c in zip(split, on_cpu))
    assert any("the host cells are f16/f16" in n for n in plan.notes) == (host[0] == "f16")
    # what load sets while llama.cpp makes the context: the plan's TYPES1, or none, whatever the shell has
    monkeypatch.setenv("OATO_SEGMENT_KV_TYPES1", "q4_0,q4_0")
    with importlib.import_module("oatoplan.load")._native_environment(plan):    # (oatoplan.load is the function)
        assert os.environ.get("OATO_SEGMENT_KV_TYPES1") == env.get("OATO_SEGMENT_KV_TYPES1")
    path = write_json(plan, tmp_path / "plan.json")
    check_plan(qwen, read_json(Plan, path), "plan.json")
    data = json.loads(path.read_text())
    data["kv_segments"][1]["type_k"] = "q4_k"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="host types"):
        check_plan(qwen, read_json(Plan, path), "plan.json")


def test_no_segments_where_they_save_nothing_or_the_build_lacks_them(qwen, patched, monkeypatch):
    profile = synthetic_profile()
    full = plan_model(qwen, profile, 3 * GIB, Workload(n_prompt=512, n_gen=128))
    assert not full.kv_segments and not any("segment KV" in n for n in full.notes)
    monkeypatch.setattr(segments, "target_build", lambda profile: "oatoplan patches 0:0007-llama-oato-segment-kv-cache")
    unpatched = plan_model(qwen, profile, 3 * GIB, CHAT)
    assert not unpatched.kv_segments
    assert any("segment KV cache: not available" in n for n in unpatched.notes)


def test_a_generous_budget_keeps_the_stock_cache(qwen, patched):
    """Everything fits with the whole 32k context's cache: segments would gain nothing, and are not used."""
    plan = plan_model(qwen, synthetic_profile(), 40 * GIB, CHAT)
    assert not plan.kv_segments
    assert any(n.startswith("segment KV cache considered") for n in plan.notes)


def test_hand_edited_segments_are_refused(qwen, patched, tmp_path):
    plan = plan_model(qwen, synthetic_profile(), 3 * GIB, CHAT)
    path = write_json(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["kv_segments"][0]["end_cell"] = 1024
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="kv_segments are not the two this llama.cpp sets up"):
        check_plan(qwen, read_json(Plan, path), "plan.json")
    data["kv_segments"][0]["end_cell"] = 768
    data["kv_segments"][1]["offload_cells"] = 40000
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="offload_cells 40000 is outside 0..32000"):
        check_plan(qwen, read_json(Plan, path), "plan.json")
    data["kv_segments"][1]["offload_cells"], data["flash_attn"] = 512, False
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="offload_cells 512 needs flash attention"):
        check_plan(qwen, read_json(Plan, path), "plan.json")


def test_run_refuses_a_segmented_plan_on_a_build_without_the_patch(tiny_model, cli, tmp_path, monkeypatch):
    """A build without the placement patch would reserve the whole n_ctx where the plan counted on segments: one
    line, exit 1, before anything is loaded (a plan made by hand, for any build)."""
    monkeypatch.setattr(importlib.import_module("oatoplan.load"), "llama_cpp_build",
                        lambda: "oatoplan patches 0:0007-llama-oato-segment-kv-cache")
    inv = read_inventory(tiny_model)
    on_cpu = {u.key: CPU for u in model_units(inv)}
    plan = plan_for(inv, on_cpu, Settings(512, False, False, 4096, segment_cells=256), synthetic_profile(gpu=False),
                    None)
    plan = dataclasses.replace(plan, llama_cpp_build="")
    assert plan.kv_segments
    path = write_json(plan, tmp_path / "plan.json")
    result = cli(["run", str(tiny_model), "--plan", str(path), "-p", "hello"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "uses the segment KV cache" in result.stderr and "oatoplan build" in result.stderr
