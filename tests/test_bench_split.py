"""`oatoplan bench` over several devices: the arms planned over CUDA0 + an RPC device (synthetic profile, nothing
loaded), then the whole command over the local CPU + two real rpc-servers on 127.0.0.1 (CPU backend) with Gemma 3
270M, and the one-line refusals of budgets it cannot bench."""

import dataclasses

import llama_cpp
import pytest
from typer.testing import CliRunner

from oatoplan.artifacts import read_json, write_json
from oatoplan.bench import ALL_GPU_ARM, PLAN_ARM
from oatoplan.bench_split import over_budget, split_arms
from oatoplan.cli import app
from oatoplan.graph import CPU
from oatoplan.inventory import read_inventory
from oatoplan.names import split_device
from oatoplan.report import markdown, summary
from oatoplan.schema import BenchResult, Workload
from oatoplan.split import BASELINE_NAMES, plan_split
from conftest import LOOPBACK, free_port, write_tiny_llama
from test_split import RPC, two_device_profile

needs_rpc = pytest.mark.skipif(not llama_cpp.llama_supports_rpc(), reason="this llama-cpp-python has no RPC backend "
                               "(`oatoplan build` builds one with -DGGML_RPC=ON)")


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return read_inventory(write_tiny_llama(tmp_path_factory.mktemp("four") / "four.gguf", n_layer=4))


def test_arms_over_a_gpu_and_an_rpc_device(four_layers):
    """The plan, llama.cpp's two splits as loader Plans over both devices (each layer where -ngl and -ts put it),
    then all on CUDA0 as a reference when its free memory holds it."""
    profile, budgets = two_device_profile(rpc=True), {"CUDA0": 1 << 20, RPC: 64 << 20}
    plan = plan_split(four_layers, profile, budgets, Workload(64, 8))
    arms = split_arms(four_layers, plan, profile, budgets, gpu_free_bytes=1 << 30)
    assert [a.name for a in arms] == [PLAN_ARM, *BASELINE_NAMES, ALL_GPU_ARM]
    assert arms[0].plan is plan and not any(a.reference for a in arms[:-1]) and arms[-1].reference
    n_layer = four_layers.hparams.n_layer
    for arm in arms[1:-1]:
        loaded = arm.plan
        assert loaded.gpu_devices == ("CUDA0", RPC) and loaded.rpc_servers == ("127.0.0.1:50052",)
        assert loaded.budgets_bytes == budgets and loaded.prediction == arm.prediction is not None
        assert "--rpc 127.0.0.1:50052" in arm.flags and "-dev CUDA0,RPC0" in arm.flags and "-ts " in arm.flags
        assert not loaded.tensor_overrides            # whole layers: -ngl and -ts say it all
        for u in range(n_layer + 1):
            where = split_device(u, n_layer, loaded.n_gpu_layers, loaded.gpu_devices, loaded.tensor_split)
            key = "output" if u == n_layer else f"blk.{u}.attn"
            assert arm.placement[key] == where
    assert "-ts 1,64 " in arms[1].flags               # the budgets' ratio, in MiB
    everything = arms[-1]
    assert set(everything.plan.placement.values()) == {"CUDA0"} and everything.plan.gpu_devices == ("CUDA0",)
    assert everything.plan.budgets_bytes == {}
    free = sum(everything.prediction.gpu_bytes.values())
    assert ALL_GPU_ARM not in [a.name for a in split_arms(four_layers, plan, profile, budgets, gpu_free_bytes=free)]
    assert ALL_GPU_ARM not in [a.name for a in split_arms(four_layers, plan, profile, budgets, reference=False,
                                                          gpu_free_bytes=1 << 30)]
    assert not any("-sm row" in a.flags for a in arms)        # no row split with an RPC device


# ---------------------------------------------------------------------------------------------------------------
# The command, over the CPU and two real rpc-servers

@pytest.fixture(scope="module")
def benched(gemma_model, rpc_profile_path, rpc_endpoints, tmp_path_factory):
    """One `oatoplan bench` over the two RPC devices (1 GiB each), for the tests below: (CLI result, bench.json)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    vram = ",".join(f"RPC[{e}]=1GiB" for e in rpc_endpoints)
    args = ["bench", gemma_model, "--vram", vram, "--profile", rpc_profile_path, "--prompt", "32", "--gen", "4",
            "--reps", "2", "-o", out]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result, out


@needs_rpc
def test_bench_measures_the_plan_and_llama_cpp_splits_over_rpc_devices(benched, rpc_endpoints, tmp_path):
    result, out = benched
    a, b = rpc_endpoints
    names = (f"RPC[{a}]", f"RPC[{b}]")
    bench = read_json(BenchResult, out)
    assert [arm.name for arm in bench.arms] == [PLAN_ARM, *BASELINE_NAMES]     # no local GPU: no reference arm
    for arm in bench.arms:
        assert len(arm.prefill_tokens_per_s) == 2 and len(arm.decode_tokens_per_s) == 2
        assert all(v > 0 for v in arm.prefill_tokens_per_s + arm.decode_tokens_per_s)
        assert arm.prediction is not None and arm.plan.budgets_bytes == dict.fromkeys(names, 1 << 30)
        assert not over_budget(arm)
    for arm in bench.arms[1:]:
        assert arm.flags.startswith(f"--rpc {a},{b} ") and "-dev RPC0,RPC1" in arm.flags
        assert arm.plan.rpc_servers == (a, b) and arm.plan.gpu_devices == names
        given = {d for d, n in zip(names, arm.plan.tensor_split) if n}
        assert given and {d for d, n in arm.allocated_bytes.items() if n > 0} >= given    # llama.cpp's buffers there
    assert "-ts 1024,1024 " in bench.arms[1].flags
    assert read_json(BenchResult, write_json(bench, tmp_path / "again.json")) == bench
    table = out.with_suffix(".md").read_text()
    assert "allocated / budget MiB" in table and f"{names[0]} " in table and "OVER" not in table
    assert "oatoplan plan / best other arm" in result.stdout and "wrote" in result.stdout


@needs_rpc
def test_an_arm_over_a_device_budget_is_flagged(benched):
    bench = read_json(BenchResult, benched[1])
    arm = bench.arms[1]
    device = arm.plan.gpu_devices[1]
    over = dataclasses.replace(arm, allocated_bytes={**arm.allocated_bytes, device: (1 << 30) + 1})
    flagged = dataclasses.replace(bench, arms=(bench.arms[0], over, *bench.arms[2:]))
    assert over_budget(over) == [device]
    assert f"{device} 1,024 / 1,024 OVER" in markdown(flagged)
    assert f"over budget: {arm.name} on {device}" in summary(flagged)


def _one_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@needs_rpc
def test_bench_refuses_budgets_it_cannot_bench_in_one_line(cli, gemma_model, rpc_profile_path, rpc_profile,
                                                           rpc_endpoints, tmp_path):
    unmeasured = f"RPC[{LOOPBACK}:{free_port()}]"
    bench = ["bench", gemma_model, "--prompt", "8", "--gen", "2", "--reps", "1", "-o", tmp_path / "b.json"]
    line = _one_line(cli(bench + ["--vram", f"RPC[{rpc_endpoints[0]}]=1GiB,{unmeasured}=1GiB",
                                  "--profile", rpc_profile_path]))
    assert f"no timings for {unmeasured}" in line and f"`oatoplan profile run --device '{unmeasured}'`" in line
    line = _one_line(cli(bench + ["--vram", f"CUDA0=1GiB,RPC[{rpc_endpoints[0]}]=1GiB", "--profile",
                                  rpc_profile_path]))
    assert "no timings for CUDA0" in line
    assert "give DEVICE=SIZE" in _one_line(cli(bench + ["--vram", "RPC[x]=1GiB", "--profile", rpc_profile_path]))
    # a device the profile measured whose server is gone: the probe's one line, before anything loads
    port = free_port()
    dead = f"RPC[{LOOPBACK}:{port}]"
    moved = {f"RPC[{rpc_endpoints[1]}]": dead}
    profile = dataclasses.replace(
        rpc_profile, ops=tuple(dataclasses.replace(o, device=moved.get(o.device, o.device)) for o in rpc_profile.ops),
        devices=tuple(dataclasses.replace(d, device=moved.get(d.device, d.device)) for d in rpc_profile.devices))
    path = write_json(profile, tmp_path / "dead.json")
    line = _one_line(cli(bench + ["--vram", f"RPC[{rpc_endpoints[0]}]=1GiB,{dead}=1GiB", "--profile", path]))
    assert line == (f"oatoplan: error: RPC server {LOOPBACK}:{port} does not answer: start it with "
                    f"`oatoplan rpc-server --port {port}` there")
    assert CPU not in line
