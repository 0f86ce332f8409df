"""Decode threads on a CPU-only machine: the CPU plan (this machine's physical cores, machine.default_threads) against
the same plan with llama-cpp-python's default decode threads (logical CPUs // 2), measured interleaved with the bench
harness on one model. Prefill runs on the plan's threads in both arms (load() sets n_threads_batch = n_threads), so
only the decode column compares the defaults.

    python -m benchmarks.cpu_threads MODEL.gguf PROFILE.json OUT.json [REPS]
"""

from __future__ import annotations

import dataclasses
import os
import sys

from oatoplan.artifacts import read_json, write_json
from oatoplan.baselines import Arm
from oatoplan.inventory import read_inventory
from oatoplan.measure import run_bench
from oatoplan.plan import llama_cpp_flags, plan_model
from oatoplan.report import markdown
from oatoplan.schema import Profile, Workload


def main(argv: list[str]) -> int:
    model, profile_path, out, *rest = argv
    reps = int(rest[0]) if rest else 6
    inv, prof = read_inventory(model), read_json(Profile, profile_path)
    workload = Workload(64, 64)
    plan = plan_model(inv, prof, 0, workload)
    default = dataclasses.replace(plan, n_threads=max((os.cpu_count() or 2) // 2, 1))
    default = dataclasses.replace(default, flags=llama_cpp_flags(default))
    arms = [Arm(f"CPU plan ({plan.n_threads} threads: physical cores)", plan=plan, flags=plan.flags,
                prediction=plan.prediction),
            Arm(f"{default.n_threads} thread(s): llama-cpp-python's default decode threads", plan=default,
                flags=default.flags)]
    result = run_bench(model, arms, workload, reps)
    result = dataclasses.replace(result, command="python -m benchmarks.cpu_threads " + " ".join(argv))
    write_json(result, out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
