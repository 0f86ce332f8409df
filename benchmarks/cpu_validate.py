"""The cost model against reality on a CPU-only machine: predict all-CPU prefill and decode of a model from a CPU
profile, then measure them with the bench harness (llama-bench style, 3 repetitions).

    python -m benchmarks.cpu_validate MODEL.gguf PROFILE.json OUT.json
"""

from __future__ import annotations

import dataclasses
import sys

from oatoplan.baselines import Arm, all_on
from oatoplan.cost import CostModel, predict
from oatoplan.graph import CPU
from oatoplan.inventory import read_inventory
from oatoplan.measure import run_bench
from oatoplan.memory import Settings
from oatoplan.plan import cpu_only_plan
from oatoplan.report import markdown
from oatoplan.artifacts import read_json, write_json
from oatoplan.schema import Profile, Workload


def main(argv: list[str]) -> int:
    model, profile_path, out = argv
    inv, prof = read_inventory(model), read_json(Profile, profile_path)
    workload = Workload(128, 32)
    prediction = predict(CostModel(prof), inv, all_on(inv, CPU), workload, Settings(512, False, False, workload.n_ctx))
    plan = dataclasses.replace(cpu_only_plan(inv, n_ctx=workload.n_ctx, n_threads=prof.n_threads),
                               workload=workload)
    result = run_bench(model, [Arm("all on the CPU (mmap, llama.cpp's default)", plan=plan, prediction=prediction)],
                       workload, 3)
    result = dataclasses.replace(result, command="python -m benchmarks.cpu_validate " + " ".join(argv))
    write_json(result, out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
