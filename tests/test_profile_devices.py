"""More accelerators in a profile, measured through real rpc-server processes on 127.0.0.1 (CPU backend): their ops
and links, then plans over the CPU and two RPC devices that load and write the all-local run's tokens."""

import llama_cpp
import pytest

from oatoplan.artifacts import PROFILE_OPS
from oatoplan.errors import ProfileError
from oatoplan.inventory import read_inventory
from oatoplan.load import generate, load
from oatoplan.plan import check_plan, make_plan
from oatoplan.profile_devices import measure_devices
from oatoplan.schema import Workload
from oatoplan.split import plan_split
from oatoplan.testing import no_repack

pytestmark = pytest.mark.skipif(not llama_cpp.llama_supports_rpc(), reason="this llama-cpp-python has no RPC "
                                "backend (`oatoplan build` builds one with -DGGML_RPC=ON)")
PROMPT = "The capital of France is a city called"


def test_rpc_devices_are_profiled_like_a_gpu(rpc_profile, rpc_endpoints):
    names = [f"RPC[{e}]" for e in rpc_endpoints]
    assert [d.device for d in rpc_profile.devices] == names
    for link in rpc_profile.devices:
        assert link.description == link.device[len("RPC["):-1]      # ggml's description of an RPC device
        assert link.total_bytes > 0 and link.crossing_us > 0
        assert link.decode_class == "cpu"                          # a CPU behind RPC decodes like the CPU
        assert 1e7 < link.h2d_bytes_per_s < 1e12 and 1e7 < link.d2h_bytes_per_s < 1e12
        measured = {o.op for o in rpc_profile.ops if o.device == link.device}
        assert set(PROFILE_OPS) <= measured
    with pytest.raises(ProfileError, match="already has it"):
        measure_devices(rpc_profile, None, names[:1])


def _tokens(model, plan) -> str:
    """24 greedy tokens with llama.cpp's CPU weight repacking off (--no-repack): the server's CPU backend keeps RPC
    buffers plain, and the repacked Q4_K kernels' sums differ from the plain ones in the last bits, which moves near
    ties (all of Gemma on RPC writes the local tokens exactly when the local run does not repack either)."""
    with no_repack(True):
        llm = load(model, plan)
        try:
            return "".join(generate(llm, PROMPT, 24))
        finally:
            llm.close()


def test_plans_over_cpu_and_two_rpc_devices_write_the_local_tokens(gemma_model, rpc_profile, rpc_endpoints):
    """oatoplan's plan for budgets on both RPC devices, and llama.cpp's layer split over them (-ngl all, -ts): each
    loads as planned and writes the all-local tokens (flash attention on, as plans have it)."""
    inv = read_inventory(gemma_model)
    names = [f"RPC[{e}]" for e in rpc_endpoints]
    workload = Workload(64, 24)
    local = _tokens(gemma_model, make_plan(inv, {}, n_gpu_layers=0, n_ctx=workload.n_ctx))
    planned = plan_split(inv, rpc_profile, {d: 256 << 20 for d in names}, workload)
    check_plan(inv, planned, "plan")
    # a CPU behind RPC on the same cores gains nothing and every crossing costs a round trip: the plan keeps all on
    # the local CPU and leaves the unused devices out (no server to reach at load time)
    assert set(planned.placement.values()) == {"CPU"}
    assert planned.gpu_devices == () and planned.rpc_servers == () and not planned.op_offload
    assert _tokens(gemma_model, planned) == local
    n = inv.hparams.n_layer + 1
    split = make_plan(inv, {}, n_gpu_layers=n, gpu_devices=tuple(names), tensor_split=(n // 2, n - n // 2),
                      rpc_servers=tuple(rpc_endpoints), n_ctx=workload.n_ctx)
    with no_repack(True):
        llm = load(gemma_model, split)
        try:
            report = llm.oatoplan_memory
            assert not report.misplaced
            kv = {a.device for a in report.allocations if a.kind == "KV"}
            assert kv == set(names)                           # each device its half of the layers' KV cache
            assert "".join(generate(llm, PROMPT, 24)) == local
        finally:
            llm.close()
