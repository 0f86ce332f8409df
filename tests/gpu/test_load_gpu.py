"""GPU-only: the loader against a CUDA build of llama-cpp-python (run on the GPU machine: pytest -m gpu tests/gpu)."""

import pytest

from oatoplan.inventory import read_inventory
from oatoplan.graph import CPU
from oatoplan.load import generate, load
from oatoplan.machine import gpu_devices
from oatoplan.plan import TIED_OUTPUT, make_plan

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    found = gpu_devices()
    if not found:
        pytest.skip("no GPU in this llama.cpp build")
    return found[0].name


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_plan_allocates_what_it_predicts(tiny_model, tiny_tied_model, gpu, tied):
    model = tiny_tied_model if tied else tiny_model
    inv = read_inventory(model)
    cpu = {t.name: CPU for t in inv.tensors if t.layer in (0, 1) and t.role in ("ffn_up", "ffn_gate", "ffn_down")}
    if tied:
        cpu[TIED_OUTPUT] = CPU
    plan = make_plan(inv, cpu, n_gpu_layers=3, gpu_devices=(gpu,), n_ctx=256)
    llm = load(model, plan)
    report = llm.oatoplan_memory
    assert all(c.ok for c in report.checks), report.checks
    assert report.misplaced == ()                        # every overridden tensor where llama.cpp's log puts it
    buffers = {(a.kind, a.buffer_type) for a in report.allocations}
    assert ("model", gpu) in buffers and ("KV", gpu) in buffers and ("KV", CPU) in buffers
    assert ("model", "CUDA_Host") in buffers            # mmap off: CPU weights pinned
    assert "".join(generate(llm, "Hello", 8))
    llm.close()


def test_cpu_override_keeps_weights_off_the_gpu(tiny_model, gpu):
    inv = read_inventory(tiny_model)
    everything_on_cpu = {t.name: CPU for t in inv.tensors}
    plan = make_plan(inv, everything_on_cpu, n_gpu_layers=-1, gpu_devices=(gpu,), n_ctx=256)
    llm = load(tiny_model, plan)
    gpu_model = sum(a.n_bytes for a in llm.oatoplan_memory.allocations if a.kind == "model" and a.device == gpu)
    assert gpu_model == 0
    assert all(c.ok for c in llm.oatoplan_memory.checks)
    llm.close()
