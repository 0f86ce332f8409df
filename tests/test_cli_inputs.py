"""Every number the CLI takes is checked, and every command that cannot run on this machine says so (issue 16, item
6): one line on stderr naming the option or value and what to do, exit 1, no traceback, no output file."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from oatoplan.artifacts import read_json, write_json
from oatoplan.errors import PlanError
from oatoplan.inventory import read_inventory
from oatoplan.plan import MAX_N_CTX, check_plan, cpu_only_plan
from oatoplan.schema import Plan, Workload
from profiles import synthetic_profile

HUGE = "1" + "0" * 400


@pytest.fixture
def work(tmp_path, tiny_model):
    """A model, a GPU and a CPU profile, an all-CPU plan with a small context, and an output path."""
    gpu = write_json(synthetic_profile(), tmp_path / "gpu.json")
    cpu = write_json(synthetic_profile(gpu=False), tmp_path / "cpu.json")
    plan = write_json(cpu_only_plan(read_inventory(tiny_model), n_ctx=64), tmp_path / "plan.json")
    return dict(model=tiny_model, gpu=gpu, cpu=cpu, plan=plan, out=tmp_path / "out.json", tmp=tmp_path)


def _one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oatoplan: error: ") and expected in lines[0], result.stderr


PLAN = ["plan", "{model}", "--vram", "1GiB", "--profile", "{gpu}", "-o", "{out}"]
BENCH = ["bench", "{model}", "--vram", "1GiB", "--profile", "{gpu}", "-o", "{out}"]
VALIDATE = ["profile", "validate", "{model}", "--profile", "{gpu}", "-o", "{out}"]
RUN = ["run", "{model}", "-p", "hello"]

CASES = [
    # commands that need a GPU, on this CPU-only build
    (BENCH + ["--prompt", "8", "--gen", "2", "--reps", "1"], "bench needs CUDA0 (profile synthetic-test), but this "
                                                             "llama-cpp-python has no GPU: a CPU-only build"),
    (VALIDATE[:4] + ["{cpu}"] + VALIDATE[5:], "profile validate measures GPU placements, but profile synthetic-test "
                                              "has no GPU"),
    (BENCH[:5] + ["{cpu}"] + BENCH[6:], "bench measures GPU placements, but profile synthetic-test has no GPU"),
    # repetitions
    (BENCH + ["--reps", "0"], "--reps 0 is out of range: give a number from 1 to 1000"),
    (VALIDATE + ["--reps", "0"], "--reps 0 is out of range"),
    (["profile", "run", "--reps", "0", "-o", "{out}"], "--reps 0 is out of range"),
    (["profile", "run", "--threads", "0", "-o", "{out}"], "--threads 0 is out of range: give a number from 1 to 4096"),
    # sizes
    (PLAN[:3] + [HUGE] + PLAN[4:], "(401 characters) is more than 1 PiB"),
    (PLAN[:3] + ["999999TiB"] + PLAN[4:], "size '999999TiB' is more than 1 PiB"),
    (PLAN[:3] + ["0.5"] + PLAN[4:], "size '0.5' is less than one byte: give a unit, e.g. 0.5GiB"),
    (PLAN[:3] + ["81GiB"] + PLAN[4:], "--vram 81GiB is 81.0 GiB, more than the 80.0 GiB of test GPU"),
    (BENCH[:3] + ["81GiB"] + BENCH[4:], "more than the 80.0 GiB of test GPU"),
    # workload numbers
    (PLAN + ["--prompt", "100000000000000000000"], f"--prompt 100000000000000000000 is out of range: give a number "
                                                   f"from 1 to {MAX_N_CTX}"),
    (PLAN + ["--prompt", "0"], "--prompt 0 is out of range"),
    (PLAN + ["--gen", "-1"], "--gen -1 is out of range"),
    (PLAN + ["--depth", "-1"], "--depth -1 is out of range"),
    (BENCH + ["--depth", str(1 << 40)], "--depth 1099511627776 is out of range"),
    (PLAN + ["--prompt", "4000", "--gen", "200"], "--depth + --prompt + --gen is 4200 tokens, more than the 4096 "
                                                  "tokens tiny-llama.gguf was trained on"),
    (VALIDATE + ["--prompt", "4000", "--gen", "200"], "add --ctx-over-train"),
    (PLAN + ["--prompt", "4000", "--gen", str(MAX_N_CTX), "--ctx-over-train"], "more than oatoplan's limit"),
    (PLAN + ["--prompt", "100", "--gen", "28", "--ctx", "64"], "--ctx 64 is less than --depth + --prompt + --gen "
                                                               "(128 tokens): give at least 128"),
    (PLAN + ["--ctx", "8192"], "--ctx is 8192 tokens, more than the 4096 tokens tiny-llama.gguf was trained on"),
    (BENCH + ["--ctx", "-1"], "--ctx -1 is out of range"),
    # run
    (RUN + ["-n", "0"], "--n-predict 0 is out of range: give a number of at least 1"),
    (RUN + ["-n", "-5"], "--n-predict -5 is out of range"),
    (RUN + ["--temp", "nan"], "--temp nan is out of range: give a number of at least 0"),
    (RUN + ["--temp", "-1"], "--temp -1.0 is out of range"),
    (RUN + ["--temp", "inf"], "--temp inf is out of range"),
    (RUN + ["--seed", "-1"], "--seed -1 is out of range: give a number from 0 to 4294967295"),
    (RUN + ["--seed", str(1 << 32)], "--seed 4294967296 is out of range"),
    # a prompt longer than the plan's context
    (RUN[:3] + [" the" * 100, "--plan", "{plan}"], "the prompt is 402 tokens, the plan's n_ctx is 64 (256 as "
                                                   "llama.cpp rounds it): plan again with --prompt 402 (or more)"),
    # serve
    (["serve", "{model}", "--port", "0"], "--port 0 is out of range: give a number from 1 to 65535"),
    (["serve", "{model}", "--n-ctx", str(1 << 40)], "--n-ctx 1099511627776 is out of range"),
    # inspect on a FIFO: refused without reading it
    (["inspect", "{tmp}/fifo"], "is a FIFO"),
]


@pytest.mark.parametrize("args, message", CASES, ids=lambda x: " ".join(x)[:70] if isinstance(x, list) else None)
def test_bad_numbers_and_wrong_machine_get_one_line(work, cli, args, message):
    os.mkfifo(work["tmp"] / "fifo")
    result = cli([a.format(**work) for a in args])
    _one_line_error(result, message)
    assert "Traceback" not in result.stderr and not work["out"].exists()


def test_ctx_over_train_plans_past_the_training_context(work, cli):
    result = cli([a.format(**work) for a in PLAN] + ["--prompt", "4000", "--gen", "200", "--ctx-over-train"])
    assert result.exit_code == 0, result.stderr
    plan = read_json(Plan, work["out"])
    assert plan.n_ctx == 4200
    check_plan(read_inventory(work["model"]), plan, "plan.json")     # the workload records that it was asked


def test_ctx_reserves_the_context_asked_and_its_kv_cache(work, cli):
    """--ctx 4096 for a 128-token workload: the plan's context and its KV cache are those of 4096 tokens, as
    llama.cpp reserves them for -c 4096 (the workload itself is unchanged)."""
    args = [a.format(**work) for a in PLAN] + ["--prompt", "100", "--gen", "28"]
    assert cli(args).exit_code == 0
    short = read_json(Plan, work["out"])
    result = cli(args + ["--ctx", "4096", "--force"])
    assert result.exit_code == 0, result.stderr
    plan = read_json(Plan, work["out"])
    assert plan.n_ctx == 4096 and short.n_ctx == 128 and "-c 4096" in plan.flags
    assert plan.workload.n_ctx_asked == 4096 and plan.workload.n_prompt == 100
    assert sum(plan.memory.kv_bytes.values()) > 8 * sum(short.memory.kv_bytes.values())
    check_plan(read_inventory(work["model"]), plan, "plan.json")


def _edited(work, **fields):
    """The plan on disk with `fields` changed, as a hand edit of the JSON would."""
    data = json.loads(work["plan"].read_text())
    data.update(fields)
    work["plan"].write_text(json.dumps(data))
    return work["plan"]


@pytest.mark.parametrize("fields, message", [
    (dict(type_k="q9_9"), "type_k 'q9_9' is not a KV cache type of llama.cpp: use one of f32, f16"),
    (dict(type_v="Q8_0"), "type_v 'Q8_0' is not a KV cache type"),
    (dict(type_k="q8_0"), "type_k q8_0: its blocks of 32 values do not divide tiny-llama.gguf's head size 16"),
    (dict(type_v="bf16", flash_attn=False), None),
    (dict(n_ctx=1 << 40), "n_ctx 1099511627776 is outside 1..4096 (tiny-llama.gguf was trained on 4096 tokens)"),
    (dict(n_ctx=0), "n_ctx 0 is outside 1..4096"),
    (dict(n_batch=0, n_ubatch=0), "n_ubatch 0 is outside 1.."),
    (dict(n_batch=1 << 40), "n_batch 1099511627776 is outside 1.."),
    (dict(n_threads=0), "n_threads 0 is outside 1..4096"),
    (dict(n_threads=1 << 20), "n_threads 1048576 is outside 1..4096"),
    (dict(n_gpu_layers=-2), "n_gpu_layers -2 is outside -1.."),
    (dict(n_gpu_layers=1 << 40), "n_gpu_layers 1099511627776 is outside -1..2147483647"),
    (dict(n_outputs_max=-1), "n_outputs_max -1 is outside 0.."),
])
def test_hand_edited_plan_numbers_are_refused(work, cli, fields, message):
    result = cli(["run", work["model"], "-p", "hello", "--plan", _edited(work, **fields)])
    if message is None:     # what llama.cpp takes runs (the loader checks the KV bytes of that type too)
        assert result.exit_code == 0, result.stderr
    else:
        _one_line_error(result, message)


def test_a_quantized_v_needs_flash_attention(gemma_model):
    inv = read_inventory(gemma_model)      # head size 256: q8_0's blocks divide it
    plan = dataclasses.replace(cpu_only_plan(inv), type_v="q8_0", flash_attn=False)
    with pytest.raises(PlanError, match="type_v q8_0 needs flash attention"):
        check_plan(inv, plan, "p.json")
    check_plan(inv, dataclasses.replace(plan, flash_attn=True), "p.json")


def test_plan_bounds_allow_what_the_workload_asked(tiny_model):
    inv = read_inventory(tiny_model)
    plan = cpu_only_plan(inv, n_ctx=8192)
    with pytest.raises(PlanError, match="n_ctx 8192 is outside 1..4096"):
        check_plan(inv, plan, "p.json")
    check_plan(inv, dataclasses.replace(plan, workload=Workload(n_prompt=8191, n_gen=1)), "p.json")
    with pytest.raises(PlanError, match=f"outside 1..{MAX_N_CTX}"):
        check_plan(inv, dataclasses.replace(plan, n_ctx=MAX_N_CTX + 1, workload=Workload(n_prompt=MAX_N_CTX, n_gen=1)),
                   "p.json")


def test_a_good_seed_and_temperature_run(work, cli):
    result = cli(["run", work["model"], "-p", "hello", "-n", "3", "--seed", str((1 << 32) - 1), "--temp", "0.7",
                  "--plan", work["plan"]])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("prefill ") and " decode " in result.stderr
