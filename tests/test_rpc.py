"""RPC devices through real rpc-server processes on 127.0.0.1 only (the binary `oatoplan build` compiled, CPU backend,
one thread each): registration and names, a dead endpoint, Gemma 3 270M over the CPU + two RPC devices with the
all-local run's tokens, and the `rpc-server` command."""

import dataclasses
import hashlib
import re
import socket
import subprocess
import sys

import llama_cpp
import pytest

from oatoplan import rpc
from oatoplan.artifacts import write_json
from oatoplan.errors import RpcError
from oatoplan.graph import CPU
from oatoplan.inventory import read_inventory
from oatoplan.load import generate, load, run_stats
from oatoplan.machine import buffer_device, buffer_type, devices, gpu_devices, rpc_devices
from oatoplan.plan import make_plan
from conftest import LOOPBACK, free_port, start_rpc_server

needs_rpc = pytest.mark.skipif(not llama_cpp.llama_supports_rpc(), reason="this llama-cpp-python has no RPC backend "
                               "(`oatoplan build` builds one with -DGGML_RPC=ON)")
PROMPT = "The capital of France is a city called"


@needs_rpc
def test_registered_servers_are_devices_named_by_endpoint(rpc_endpoints):
    a, b = rpc_endpoints
    registered = rpc.register_rpc_servers([a, b])
    assert [d.name for d in registered] == [f"RPC[{a}]", f"RPC[{b}]"]
    assert [d.description for d in registered] == [a, b] and {d.type for d in registered} == {"RPC"}
    assert all(0 < d.free_bytes <= d.total_bytes for d in registered)     # the server's CPU memory
    assert rpc.register_rpc_servers([b, a]) == registered[::-1]              # once per endpoint per process
    listed = [d.name for d in devices()]
    assert listed.count(f"RPC[{a}]") == 1 and listed.count(f"RPC[{b}]") == 1
    assert {d.name for d in rpc_devices()} >= {f"RPC[{a}]", f"RPC[{b}]"}
    assert not {d.name for d in gpu_devices()} & {f"RPC[{a}]", f"RPC[{b}]"}
    assert buffer_type(f"RPC[{a}]") and buffer_type(f"RPC[{a}]") != buffer_type(f"RPC[{b}]")


def test_buffer_names_map_to_rpc_devices():
    assert buffer_device("RPC0[127.0.0.1:50052]") == "RPC[127.0.0.1:50052]"
    assert buffer_device("CPU_REPACK") == CPU and buffer_device("CUDA0") == "CUDA0"


@pytest.mark.parametrize("endpoint", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "host:port", ":50052", ""])
def test_endpoints_must_be_host_and_port(endpoint):
    with pytest.raises(RpcError, match="is not host:port"):
        rpc.parse_endpoint(endpoint)


@needs_rpc
def test_a_dead_endpoint_is_refused_before_ggml_sees_it():
    """ggml's add_server aborts the process on a dead endpoint: the probe must refuse it first, in one line."""
    port = free_port()
    with pytest.raises(RpcError) as refused:
        rpc.register_rpc_servers([f"{LOOPBACK}:{port}"])
    assert str(refused.value) == (f"RPC server {LOOPBACK}:{port} does not answer: start it with "
                                  f"`oatoplan rpc-server --port {port}` there")


def test_something_else_on_the_port_is_not_an_rpc_server():
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(RpcError, match="does not answer .or it serves another client."):
            rpc.probe(f"{LOOPBACK}:{port}", timeout_s=0.5)      # accepted by the kernel, never answered


def _greedy(llm, n: int = 32) -> str:
    text = "".join(generate(llm, PROMPT, n))
    assert run_stats(llm).n_generated_tokens == n - 1       # the first token comes with the prompt's logits
    llm.close()
    return text


def _rpc_plan(inv, a: str, b: str):
    """Blocks 12-17 (weights and KV cache: n_gpu_layers 6) on RPC[a], then the weights of blocks 15-17 and of the
    sliding-window blocks 0-1 moved to RPC[b] by overrides; the rest of blocks 0-11, the embeddings and the (tied)
    output on the CPU. Flash attention on (make_plan's default): with it every placement we tried is bit-identical to
    the local run. With flash attention off (llama-cpp-python's default), blocks 0-11 on an RPC device change the
    first-step logits by up to ~1.0 (blocks 12-17 stay exact): the unfused attention ops (KQ mul_mat, soft_max, KQV
    mul_mat) then run on the server from copies of the CPU's KV-cache views; not SWA, repacking, thread count or fusion
    (docs/notes/2026-12-02-rpc-runtime.md)."""
    moved = {t.name: f"RPC[{b}]" for t in inv.tensors if t.layer is not None and (t.layer >= 15 or t.layer <= 1)}
    plan = make_plan(inv, moved, n_gpu_layers=6, gpu_devices=(f"RPC[{a}]", f"RPC[{b}]"), n_ctx=256,
                     use_mmap=False)
    assert plan.flash_attn
    return dataclasses.replace(plan, rpc_servers=(a, b))


@needs_rpc
def test_gemma_over_two_rpc_devices_writes_the_local_tokens(gemma_model, rpc_endpoints):
    a, b = rpc_endpoints
    inv = read_inventory(gemma_model)
    local = _greedy(load(gemma_model, make_plan(inv, {}, n_gpu_layers=0, n_ctx=256, use_mmap=False)))
    llm = load(gemma_model, _rpc_plan(inv, a, b))
    report = llm.oatoplan_memory
    assert not report.misplaced and all(c.ok for c in report.checks if c.kind != "compute")
    model = {c.device for c in report.checks if c.kind == "model" and c.allocated_bytes > 0}
    assert model >= {f"RPC[{a}]", f"RPC[{b}]"}
    kv = {a_.device: a_.n_bytes for a_ in report.allocations if a_.kind == "KV"}
    assert set(kv) == {CPU, f"RPC[{a}]"}                 # the KV of blocks 12-17 where n_gpu_layers put them
    assert {a_.buffer_type for a_ in report.allocations if a_.device == f"RPC[{b}]"} == {f"RPC0[{b}]"}
    assert _greedy(llm) == local


@needs_rpc
def test_run_with_an_rpc_plan(cli, gemma_model, rpc_endpoints, tmp_path):
    a, b = rpc_endpoints
    path = write_json(_rpc_plan(read_inventory(gemma_model), a, b), tmp_path / "plan.json")
    result = cli(["run", gemma_model, "--plan", path, "-p", PROMPT, "-n", "8", "--show-memory"])
    assert result.exit_code == 0, result.stderr
    assert f"RPC0[{b}]" in result.stdout and "Paris" in result.stdout


@needs_rpc
def test_run_with_a_dead_rpc_server_is_one_line(cli, gemma_model, tmp_path):
    port = free_port()
    plan = make_plan(read_inventory(gemma_model), {}, n_gpu_layers=2, gpu_devices=(f"RPC[{LOOPBACK}:{port}]",),
                     n_ctx=256)
    path = write_json(dataclasses.replace(plan, rpc_servers=(f"{LOOPBACK}:{port}",)), tmp_path / "plan.json")
    result = cli(["run", gemma_model, "--plan", path, "-p", PROMPT, "-n", "2"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"oatoplan: error: RPC server {LOOPBACK}:{port} does not answer: start it with `oatoplan rpc-server "
        f"--port {port}` there"]


def test_rpc_server_help(cli):
    result = cli(["rpc-server", "--help"])
    assert result.exit_code == 0 and "--port" in result.stdout and "--device" in result.stdout


def _installed_libs(tmp_path, monkeypatch, libs: dict[str, bytes]):
    lib_dir = tmp_path / "site" / "llama_cpp" / "lib"
    lib_dir.mkdir(parents=True)
    for name, data in libs.items():
        (lib_dir / name).write_bytes(data)
    monkeypatch.setattr(rpc, "installed_lib_dir", lambda: lib_dir)
    monkeypatch.setattr(rpc.llama_cpp, "llama_supports_rpc", lambda: True)
    monkeypatch.setenv("OATOPLAN_CACHE", str(tmp_path / "cache"))


def _cached_server(tmp_path, key: str, libs: dict[str, bytes]):
    directory = tmp_path / "cache" / "wheels" / key
    directory.mkdir(parents=True)
    (directory / "rpc-server").write_bytes(b"binary")
    rpc.write_server_record(directory, {n: hashlib.sha256(d).hexdigest() for n, d in libs.items()}, "now")
    return directory / "rpc-server"


def test_the_rpc_server_of_the_installed_build_is_found(tmp_path, monkeypatch):
    _installed_libs(tmp_path, monkeypatch, {"libggml.so.0": b"new", "libggml-base.so.0": b"base"})
    _cached_server(tmp_path, "aaaa", {"libggml.so.0": b"old", "libggml-base.so.0": b"base"})
    binary = _cached_server(tmp_path, "bbbb", {"libggml.so.0": b"new", "libggml-base.so.0": b"base"})
    argv, env = rpc.rpc_server_command(LOOPBACK, 50060, "CPU", 2)
    assert argv == [str(binary), "-H", LOOPBACK, "-p", "50060", "-d", "CPU", "-t", "2"]
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(rpc.installed_lib_dir())


@pytest.mark.parametrize("cached, message", [
    (False, "no rpc-server in .*; run `oatoplan build` to make one"),
    (True, "no rpc-server in .* was built with the installed llama-cpp-python .*; run `oatoplan build`"),
])
def test_rpc_server_cli_refuses_without_a_matching_build(cli, tmp_path, monkeypatch, cached, message):
    _installed_libs(tmp_path, monkeypatch, {"libggml.so.0": b"installed"})
    if cached:
        _cached_server(tmp_path, "aaaa", {"libggml.so.0": b"another build"})
    else:
        (tmp_path / "cache").mkdir()
    result = cli(["rpc-server", "--port", "50061"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr)


def test_rpc_server_cli_refuses_a_build_without_rpc(cli, monkeypatch):
    monkeypatch.setattr(rpc.llama_cpp, "llama_supports_rpc", lambda: False)
    result = cli(["rpc-server"])
    assert result.exit_code == 1 and result.stderr.strip() == (
        "oatoplan: error: the installed llama-cpp-python has no RPC backend; run `oatoplan build`")


@needs_rpc
def test_devices_survive_a_registered_server_that_went_away():
    # ggml's RPC client aborts the process when it asks a dead server for its memory, so this runs in a child
    server = start_rpc_server()
    endpoint = f"{LOOPBACK}:{server.args[server.args.index('-p') + 1]}"
    script = ("import sys; from oatoplan import rpc; from oatoplan.machine import devices\n"
              "rpc.register_rpc_servers([sys.argv[1]]); print('alive', sys.stdout.flush())\n"
              "sys.stdin.readline()\n"
              "print({d.name: d.total_bytes for d in devices()}[f'RPC[{sys.argv[1]}]'])\n")
    try:
        child = subprocess.Popen([sys.executable, "-c", script, endpoint], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().startswith("alive")
    finally:
        server.kill()
        server.wait()
    out, err = child.communicate("\n", timeout=60)
    assert child.returncode == 0, err[-2000:]
    assert out.split() == ["0"]
