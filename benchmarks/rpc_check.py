"""Plans over RPC devices against reality, on one machine: two real rpc-server processes (CPU backend) on 127.0.0.1,
profiled through llama.cpp; then the model all on the local CPU, split over the two RPC devices by layers as
llama.cpp's `-ts` does it, and oatoplan's own plan for budgets on them, each predicted (split.predict_split) and
measured with the bench harness; and 32 greedy tokens of each placement against the all-local run.

    python -m benchmarks.rpc_check MODEL.gguf --profile PROFILE.json --out OUT.json [--reps 3] [--server-threads 1]

With --gpu (a CUDA build, the profile of this machine's GPU): one rpc-server serving the local GPU itself on
loopback, as a second device next to it; the arms are all on the local GPU, split by layers over the GPU and the
served GPU (-ts), and oatoplan's plan for --budget-mib on each of the two (the rest on the CPU).

Every process runs on this machine's cores: the servers' threads compete with the local ones, as two PCs' would not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from oatoplan import load as oato_load
from oatoplan.artifacts import read_json, to_jsonable, write_json
from oatoplan.baselines import Arm
from oatoplan.cost import CostModel
from oatoplan.files import Output
from oatoplan.graph import CPU, model_units
from oatoplan.inventory import read_inventory
from oatoplan.load import generate
from oatoplan.measure import run_bench
from oatoplan.memory import Settings
from oatoplan.names import is_rpc, rpc_endpoint, split_device
from oatoplan.machine import target_build
from oatoplan.plan import cpu_only_plan, llama_cpp_flags, make_plan, tensor_placement
from oatoplan.profile_devices import measure_devices
from oatoplan.report import markdown
from oatoplan.errors import RpcError
from oatoplan.rpc import probe, register_rpc_servers, rpc_server_command
from oatoplan.schema import Profile, Workload
from oatoplan.split import layer_counts, links, plan_split, predict_split

PROMPT = "The capital of France is a city called"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_servers(n: int, threads: int, device: str = "CPU") -> tuple[list[subprocess.Popen], list[str]]:
    """n rpc-servers of the installed build (serving `device`) on free loopback ports, answering the RPC handshake."""
    procs, endpoints = [], []
    for _ in range(n):
        port = _free_port()
        argv, env = rpc_server_command("127.0.0.1", port, device, threads)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        endpoints.append(f"127.0.0.1:{port}")
    deadline = time.time() + 30
    for e in endpoints:
        while True:
            try:
                probe(e, timeout_s=1)
                break
            except RpcError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
    return procs, endpoints


def layer_split_plan(inv, profile: Profile, devices: list[str], counts: tuple[int, ...], workload: Workload):
    """Every layer whole on the device llama.cpp's -ngl (all) -ts counts gives it; its prediction."""
    n_layer = inv.hparams.n_layer
    placement = {u.key: split_device(n_layer if u.layer is None else u.layer, n_layer, n_layer + 1, tuple(devices),
                                     counts) for u in model_units(inv)}
    s = Settings(512, False, False, workload.n_ctx, n_outputs_max=1)
    cost = CostModel(profile)
    prediction, memory = predict_split(cost, inv, placement, workload, s, links(cost, inv, devices, s))
    tensors, ngl = tensor_placement(inv, placement)
    plan = make_plan(inv, tensors, n_gpu_layers=ngl, gpu_devices=tuple(devices),
                     tensor_split=layer_counts(model_units(inv), placement, devices),
                     rpc_servers=tuple(rpc_endpoint(d) for d in devices if is_rpc(d)), n_ctx=workload.n_ctx, n_batch=512,
                     n_ubatch=512, use_mmap=True, op_offload=False, n_outputs_max=1, n_threads=profile.n_threads,
                     llama_cpp_build=target_build(profile), profile_id=profile.profile_id)
    plan = dataclasses.replace(plan, workload=workload, prediction=prediction, placement=placement)
    return dataclasses.replace(plan, flags=llama_cpp_flags(plan))


def _tokens(model: str, plan, n: int) -> list[str]:
    llm = oato_load(model, plan)
    try:
        return list(generate(llm, PROMPT, n))
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--budget-mib", type=int, default=96, help="oatoplan plan's budget on each RPC device")
    ap.add_argument("--budget-s", type=float, default=0.1, help="timing budget per profiled point")
    ap.add_argument("--copy-mib", type=int, default=64, help="weight MiB per timed graph of small matrices")
    ap.add_argument("--gpu", action="store_true", help="serve the local GPU on loopback, beside the GPU itself")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args(argv)
    inv, profile = read_inventory(args.model), read_json(Profile, args.profile)
    workload = Workload(args.prompt, args.gen)
    if args.gpu and not profile.gpu_device:
        sys.exit(f"rpc_check: --gpu needs a profile of this machine's GPU; {args.profile} has none")
    gpu = profile.gpu_device if args.gpu else None
    procs, endpoints = _start_servers(1, args.server_threads, gpu) if gpu else _start_servers(2, args.server_threads)
    try:
        register_rpc_servers(endpoints)
        remote = [f"RPC[{e}]" for e in endpoints]
        devices = ([gpu] if gpu else []) + remote
        profile = measure_devices(profile, inv, remote, budget_s=args.budget_s, copy_bytes=args.copy_mib << 20)
        n = inv.hparams.n_layer + 1
        cost, s = CostModel(profile), Settings(512, False, False, workload.n_ctx, n_outputs_max=1)
        home = gpu or CPU
        local_prediction, _ = predict_split(cost, inv, {u.key: home for u in model_units(inv)}, workload, s,
                                            links(cost, inv, [gpu], s) if gpu else [])
        local = make_plan(inv, {}, n_gpu_layers=-1, gpu_devices=(gpu,), n_ctx=workload.n_ctx, op_offload=False,
                          n_outputs_max=1, n_threads=profile.n_threads) if gpu else \
            cpu_only_plan(inv, n_ctx=workload.n_ctx, n_threads=profile.n_threads, n_outputs_max=1)
        local = dataclasses.replace(local, workload=workload, prediction=local_prediction)
        split = layer_split_plan(inv, profile, devices, (n // 2, n - n // 2), workload)
        budgets = {d: args.budget_mib << 20 for d in devices}
        planned = plan_split(inv, profile, budgets, workload)
        where = f"{gpu} and {remote[0]}" if gpu else "two RPC devices"
        arms = [Arm(f"all on the local {home}", plan=local, prediction=local.prediction),
                Arm(f"layer split over {where} (-ts {n // 2},{n - n // 2})", plan=split,
                    prediction=split.prediction),
                Arm(f"oatoplan plan ({args.budget_mib} MiB on each of {where})", plan=planned,
                    prediction=planned.prediction)]
        tokens = {a.name: _tokens(args.model, a.plan, 32) for a in arms}
        result = run_bench(args.model, arms, workload, args.reps)
        result = dataclasses.replace(result, command="python -m benchmarks.rpc_check " + " ".join(sys.argv[1:]))
        write_json(result, Output(Path(args.out), (args.model,), True, "--out"))
        extra = {"profile_devices": to_jsonable(profile.devices), "tokens": tokens,
                 "tokens_identical_to_local": {k: v == tokens[arms[0].name] for k, v in tokens.items()}}
        with open(args.out.replace(".json", "-extra.json"), "w") as f:
            json.dump(extra, f, indent=1)
        print(markdown(result))
        print(json.dumps(extra["tokens_identical_to_local"]))
    finally:
        for p in procs:
            p.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
