"""Decode speed with oatoplan's CPU changes (issue #8) on and off, on one loaded model, interleaved rep by rep (the
order of the arms rotates), so that all arms see the same memory placement, clocks and caches. Arms: stock (ggml's
own nodes and kernels), fused (the fused ops of patches/0002), prefetch (the prefetching Q4_K/Q6_K dot products of
patches/0004), fused+prefetch (both: the default of the patched build). Records raw samples, the fusion counters
(proof that the fused paths ran), the command, machine and date.

    python -m benchmarks.fused_decode MODEL --placement all-cpu [--no-repack] --out results.json
    python -m benchmarks.fused_decode MODEL --placement ffn-cpu --profile P.json --out results.json   (GPU machine)

Placements: all-cpu (llama.cpp's CPU defaults; --no-repack keeps weights in plain buffers, where the fused mat-vecs
apply); ffn-cpu (every layer's attention and KV on the GPU, the FFN of the first half of the layers on the CPU);
layer-offload (the first half of the layers on the CPU). GPU placements load through oatoplan.load with pinned host
weights, ubatch 512, one logit row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np

from oatoplan import ggml
from oatoplan.baselines import calibration_arms
from oatoplan.calibrate import SETTINGS
from oatoplan.inventory import read_inventory
from oatoplan.load import load
from oatoplan.machine import default_threads, loaded_series, machine_identity
from oatoplan.measure import measure_once, stats
from oatoplan.plan import cpu_only_plan, plan_for
from oatoplan.profile import find_profile
from oatoplan.artifacts import to_jsonable
from oatoplan.schema import Workload
from oatoplan.testing import no_repack

WORKLOAD = Workload(n_prompt=32, n_gen=64)
# arm: (fused ops, prefetching dot products)
ARMS = {"stock": (False, False), "fused": (True, False), "prefetch": (False, True), "fused+prefetch": (True, True)}


def _load(model: str, placement: str, repack: bool, profile_path: str | None):
    inv = read_inventory(model)
    if placement == "all-cpu":
        plan = cpu_only_plan(inv, n_ctx=WORKLOAD.n_ctx, n_threads=default_threads())
        with no_repack(not repack):
            llm = llama_cpp.Llama(model, n_gpu_layers=0, n_ctx=plan.n_ctx, n_batch=plan.n_batch,
                                  n_threads=plan.n_threads, verbose=False)
        return llm, plan
    profile = find_profile(Path(profile_path) if profile_path else None)
    index = {"ffn-cpu": 1, "layer-offload": 3}[placement]      # calibration_arms' order
    devices = calibration_arms(inv, profile.gpu_device, SETTINGS)[index].placement
    plan = replace(plan_for(inv, devices, replace(SETTINGS, n_ctx=WORKLOAD.n_ctx), profile, profile.gpu_device),
                   workload=WORKLOAD)
    return load(model, plan), plan


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--placement", choices=("all-cpu", "ffn-cpu", "layer-offload"), default="all-cpu")
    ap.add_argument("--no-repack", action="store_true")
    ap.add_argument("--profile")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    llm, plan = _load(args.model, args.placement, not args.no_repack, args.profile)
    rng = np.random.default_rng(0)
    measure_once(llm, plan, replace(WORKLOAD, n_gen=8), rng)      # warm-up
    samples = {arm: [] for arm in ARMS}
    counts = {arm: np.zeros(3, np.int64) for arm in ARMS}
    for rep in range(args.reps):
        for i in range(len(ARMS)):
            arm = list(ARMS)[(i + rep) % len(ARMS)]
            fusion, prefetch = ARMS[arm]
            ggml.set_fusion(fusion)
            ggml.set_matvec(prefetch)
            before = np.array(ggml.fusion_counts())
            _, decode_s = measure_once(llm, plan, WORKLOAD, rng)
            counts[arm] += np.array(ggml.fusion_counts()) - before
            samples[arm].append(round(WORKLOAD.n_gen / decode_s, 3))
    ggml.set_fusion(True)
    ggml.set_matvec(True)
    llm.close()
    stock = statistics.median(samples["stock"])
    summary = {arm: "{:.2f} ± {:.2f}".format(*stats(tuple(samples[arm]))) for arm in ARMS}
    summary["speedup_vs_stock"] = {arm: round(statistics.median(samples[arm]) / stock, 4) for arm in ARMS}
    result = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": "python -m benchmarks.fused_decode " + " ".join(argv),
        "machine": to_jsonable(machine_identity(plan.gpu_devices[0] if plan.gpu_devices else None)),
        "llama_cpp_series": loaded_series(), "model": os.path.basename(args.model),
        "placement": args.placement, "repack": not args.no_repack, "flags": plan.flags, "n_threads": plan.n_threads,
        "workload": to_jsonable(WORKLOAD), "reps": args.reps,
        "arms": {arm: {"fusion": f, "prefetching_dot_products": p} for arm, (f, p) in ARMS.items()},
        "decode_tokens_per_s": samples,
        "fused_nodes_per_token": {k: (counts[k] / (args.reps * WORKLOAD.n_gen)).round(2).tolist() for k in counts},
        "summary": summary,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["summary"]), json.dumps(result["fused_nodes_per_token"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
