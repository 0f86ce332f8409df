"""GPU-only: an rpc-server serving the local GPU (CUDA0) on loopback as a second device next to CUDA0 itself (run on
the GPU machine after `oatoplan build --cuda`: pytest -m gpu tests/gpu/test_rpc_gpu.py)."""

import dataclasses
import socket
import subprocess
import time

import llama_cpp
import pytest

from oatoplan import rpc
from oatoplan.errors import RpcError
from oatoplan.inventory import read_inventory
from oatoplan.load import generate, load
from oatoplan.machine import gpu_devices
from oatoplan.plan import make_plan

pytestmark = pytest.mark.gpu
PROMPT = "The capital of France is a city called"


@pytest.fixture(scope="module")
def cuda_endpoint():
    if not gpu_devices() or not llama_cpp.llama_supports_rpc():
        pytest.skip("needs a CUDA build with the RPC backend (oatoplan build --cuda)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv, env = rpc.rpc_server_command("127.0.0.1", port, gpu_devices()[0].name, None)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                rpc.probe(f"127.0.0.1:{port}", timeout_s=1)
                break
            except RpcError:
                assert server.poll() is None, "rpc-server exited"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def _greedy(llm, n=32):
    text = "".join(generate(llm, PROMPT, n))
    llm.close()
    return text


def test_the_served_gpu_is_a_device_with_its_memory(cuda_endpoint):
    local = gpu_devices()[0]
    [remote] = rpc.register_rpc_servers([cuda_endpoint])
    assert remote.name == f"RPC[{cuda_endpoint}]" and remote.type == "RPC"
    assert remote.total_bytes == local.total_bytes
    assert remote.name not in {d.name for d in gpu_devices()}


def test_gemma_with_blocks_on_the_served_gpu_writes_the_local_tokens(gemma_model, cuda_endpoint):
    """Every block on CUDA0 (n_gpu_layers: all; its KV cache there), the weights of blocks 12-17 on the same GPU
    through RPC: the local all-CUDA0 run's tokens."""
    gpu, remote = gpu_devices()[0].name, f"RPC[{cuda_endpoint}]"
    inv = read_inventory(gemma_model)
    local = _greedy(load(gemma_model, make_plan(inv, {}, n_gpu_layers=-1, gpu_devices=(gpu,), n_ctx=256)))
    moved = {t.name: remote for t in inv.tensors if t.layer is not None and t.layer >= 12}
    plan = make_plan(inv, moved, n_gpu_layers=-1, gpu_devices=(gpu, remote), n_ctx=256)
    llm = load(gemma_model, dataclasses.replace(plan, rpc_servers=(cuda_endpoint,)))
    report = llm.oatoplan_memory
    assert not report.misplaced and all(c.ok for c in report.checks if c.kind != "compute")
    assert {a.buffer_type for a in report.allocations if a.device == remote} == {f"RPC0[{cuda_endpoint}]"}
    assert _greedy(llm) == local
