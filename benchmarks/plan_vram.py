"""A plan's GPU memory in a fresh process, as a user's would use it: solve the plan for a budget, load it, run its
workload once (prefill + decode), and compare device memory in use (less before the load) with the budget and with
the plan's predicted terms.

    python -m benchmarks.plan_vram MODEL.gguf --profile P.json --vram 1.4GiB [--prompt 512] --out result.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import replace

import numpy as np

from oatoplan.artifacts import read_json, to_jsonable
from oatoplan.inventory import read_inventory
from oatoplan.load import load
from oatoplan.measure import gpu_used_bytes, measure_once
from oatoplan.memory import budget_bytes
from oatoplan.plan import plan_model
from oatoplan.schema import Profile, Workload


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--vram", required=True)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    profile = read_json(Profile, args.profile)
    budget = budget_bytes(args.vram, profile)
    plan = plan_model(read_inventory(args.model), profile, budget, Workload(args.prompt, 128))
    gpu = plan.gpu_devices[0]
    before = gpu_used_bytes(gpu)
    llm = load(args.model, plan)
    measure_once(llm, plan, replace(plan.workload, n_gen=args.gen), np.random.default_rng(0))
    used = gpu_used_bytes(gpu) - before
    by_kind = {}
    for a in llm.oatoplan_memory.allocations:
        if a.device == gpu:
            by_kind[a.kind] = by_kind.get(a.kind, 0) + a.n_bytes
    row = dict(command=" ".join(["python -m benchmarks.plan_vram"] + argv), host=platform.node(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(), budget_bytes=budget,
               measured_bytes=used, allocated_bytes=by_kind, predicted_bytes=plan.prediction.gpu_bytes,
               within_budget=used <= budget, flags=plan.flags, misplaced=list(llm.oatoplan_memory.misplaced))
    with open(args.out, "w") as out:
        json.dump(to_jsonable(row), out, indent=1)
    mib = 2 ** 20
    print(f"{args.vram}: measured {used / mib:.1f} MiB of a {budget / mib:.1f} MiB budget "
          f"(predicted {sum(plan.prediction.gpu_bytes.values()) / mib:.1f}); allocated "
          + ", ".join(f"{k} {v / mib:.1f}" for k, v in by_kind.items())
          + "; predicted " + ", ".join(f"{k} {v / mib:.1f}" for k, v in plan.prediction.gpu_bytes.items()))
    return 0 if used <= budget else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
