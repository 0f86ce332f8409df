"""Where the CPU half of a partial-offload decode loses time (issue #8): decode tokens/s of one placement for
several CPU thread counts (switched at run time on one loaded model, interleaved rep by rep), with the host weights
in one kind of memory per process. Run it once per memory kind / OpenMP setting; each run appends a JSON line.

    python -m benchmarks.cpu_half_decode MODEL --placement ffn-cpu --memory pinned --profile P.json --out R.jsonl
    OMP_WAIT_POLICY=active python -m benchmarks.cpu_half_decode ...   (the environment is recorded)

Memory kinds: pinned (CUDA_Host, what plans use: page-locked, 4 KiB pages), pageable (GGML_CUDA_NO_PINNED=1: the
CPU backend's own buffer, weights not repacked), pageable-repack (the same, with llama.cpp's repacked CPU weights).
all-cpu (a CPU-only machine, llama.cpp's defaults) takes pinned to mean the defaults, pageable to mean no repack.
Besides tokens/s it records the host weight bytes read per token, so that tokens/s can be set against the
bandwidth bound, and with --trace (a build with patches/0003) where the CPU backend's time goes per token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np

from oatoplan import ggml
from oatoplan.baselines import calibration_arms
from oatoplan.calibrate import SETTINGS
from oatoplan.cost import CostModel, decode_bound_tokens_per_s
from oatoplan.graph import CPU, model_units
from oatoplan.inventory import read_inventory
from oatoplan.load import load
from oatoplan.machine import loaded_series, machine_identity
from oatoplan.measure import decode, measure_once, stats
from oatoplan.plan import cpu_only_plan, plan_for
from oatoplan.profile import find_profile
from oatoplan.artifacts import to_jsonable
from oatoplan.schema import CpuTrace, Workload
from oatoplan.testing import no_repack

WORKLOAD = Workload(n_prompt=32, n_gen=48)
ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES", "GGML_CUDA_NO_PINNED",
            "OATO_CPU_DISABLE_FUSION", "OATO_CPU_MATVEC")


def per_token(traces: list[CpuTrace], n_tokens: int) -> dict:
    """The median rep's CPU backend time per decoded token (ms): whole graphs, their thread-team start, each op
    (thread 0, node start to barrier end), and what the mat-vecs streamed (GB/s of weight bytes over their time)."""
    def median(values) -> float:
        return round(statistics.median(values) / n_tokens / 1e6, 4)
    ops = {op for t in traces for op in t.op_ns}
    out = {"graphs": round(statistics.median(t.n_graphs for t in traces) / n_tokens, 2),
           "graph_ms": median(t.graph_ns for t in traces), "start_ms": median(t.start_ns for t in traces),
           "op_ms": {op: median(t.op_ns.get(op, 0) for t in traces) for op in sorted(ops)},
           "op_nodes": {op: round(statistics.median(t.op_count.get(op, 0) for t in traces) / n_tokens, 2)
                        for op in sorted(ops)}}
    weight_ns = [(sum(t.op_weight_bytes.values()),
                  sum(t.op_ns[op] for op in t.op_weight_bytes if t.op_weight_bytes[op])) for t in traces]
    out["mat_vec_gb_per_s"] = round(statistics.median(b / ns for b, ns in weight_ns if ns), 2)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--placement", choices=("ffn-cpu", "layer-offload", "all-cpu"), default="ffn-cpu")
    ap.add_argument("--memory", choices=("pinned", "pageable", "pageable-repack"), default="pinned")
    ap.add_argument("--threads", default="16,15,12,8")
    ap.add_argument("--profile")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--trace", action="store_true", help="time the CPU backend's ops (patch 0003)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.memory != "pinned" and args.placement != "all-cpu":
        os.environ["GGML_CUDA_NO_PINNED"] = "1"       # read by ggml-cuda when it allocates host buffers

    inv = read_inventory(args.model)
    profile = find_profile(Path(args.profile) if args.profile else None)
    index = {"all-cpu": 0, "ffn-cpu": 1, "layer-offload": 3}[args.placement]      # calibration_arms' order
    arm = calibration_arms(inv, profile.gpu_device or None, SETTINGS)[index]
    name, devices = arm.name, arm.placement
    if args.placement == "all-cpu":      # the CPU machine's defaults (mmap, repacked weights unless --memory pageable)
        plan = replace(cpu_only_plan(inv, n_ctx=WORKLOAD.n_ctx, n_threads=profile.n_threads), workload=WORKLOAD)
    else:
        plan = replace(plan_for(inv, devices, replace(SETTINGS, n_ctx=WORKLOAD.n_ctx), profile, profile.gpu_device),
                       workload=WORKLOAD)
    host_bytes = sum(u.n_bytes for u in model_units(inv) if devices[u.key] == CPU and not u.is_attention)
    bound = decode_bound_tokens_per_s(CostModel(profile), inv, devices)
    repack = args.memory == "pageable-repack" or (args.placement == "all-cpu" and args.memory == "pinned")
    with no_repack(not repack):
        llm = load(args.model, plan, verify=False)
    threads = [int(n) for n in args.threads.split(",")]
    rng = np.random.default_rng(0)
    measure_once(llm, plan, replace(WORKLOAD, n_gen=8), rng)      # warm-up
    samples: dict[int, list[float]] = {n: [] for n in threads}
    traces: dict[int, list[CpuTrace]] = {n: [] for n in threads}
    tracing = args.trace and ggml.cpu_trace() is not None
    if tracing:
        ggml.set_cpu_trace(True)
    for rep in range(args.reps):
        for n in (threads if rep % 2 == 0 else threads[::-1]):
            llama_cpp.llama_set_n_threads(llm._ctx.ctx, n, plan.n_threads)
            measure_once(llm, plan, replace(WORKLOAD, n_gen=0), rng)     # empty cache, prompt: untimed
            ggml.cpu_trace(reset=True)
            token = int(rng.integers(0, llm.n_vocab()))
            t0 = time.perf_counter()
            for _ in range(WORKLOAD.n_gen):
                decode(llm, [token])
            samples[n].append(round(WORKLOAD.n_gen / (time.perf_counter() - t0), 3))
            if tracing:
                traces[n].append(ggml.cpu_trace(reset=True))
    llm.close()
    result = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": "python -m benchmarks.cpu_half_decode " + " ".join(argv),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "machine": to_jsonable(machine_identity(profile.gpu_device)),
        "llama_cpp_series": loaded_series(), "model": os.path.basename(args.model),
        "placement": name, "memory": args.memory, "flags": plan.flags, "workload": to_jsonable(WORKLOAD),
        "host_weight_bytes_per_token": host_bytes, "cpu_read_bytes_per_s_profile": profile.cpu_read_bytes_per_s,
        "decode_bound_tokens_per_s": round(bound, 2),
        "decode_tokens_per_s": {str(n): samples[n] for n in threads},
        "summary": {str(n): "%.2f ± %.2f" % stats(tuple(samples[n])) for n in threads},
        "median_ms_per_token": {str(n): round(1e3 / statistics.median(samples[n]), 3) for n in threads},
        "cpu_trace_per_token": {str(n): per_token(traces[n], WORKLOAD.n_gen) for n in threads if traces[n]},
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(args.placement, args.memory, result["env"], json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
