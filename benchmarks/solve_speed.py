"""How long `solve` takes: Qwen2-7B (28 layers) and an 80-layer model made of Qwen2-7B's blocks repeated, three
workloads each, with the shipped H100 profile. Writes JSON with the machine, the command and raw times.

    python -m benchmarks.solve_speed QWEN2-7B.gguf PROFILE.json OUT.json
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time

from oatoplan.cost import CostModel
from oatoplan.inventory import read_inventory
from oatoplan.artifacts import read_json
from oatoplan.schema import ModelInventory, Profile, Workload
from oatoplan.solve import GAP_REL, solve

WORKLOADS = (Workload(512, 128), Workload(2048, 128), Workload(16, 256, objective="decode"))


def repeat_blocks(inv: ModelInventory, n_layer: int) -> ModelInventory:
    """The same model with n_layer blocks: block il is a copy of block il % inv's layers."""
    hp = inv.hparams
    tensors = [t for t in inv.tensors if t.layer is None]
    for il in range(n_layer):
        tensors += [dataclasses.replace(t, name=t.name.replace(f"blk.{t.layer}.", f"blk.{il}.", 1), layer=il)
                    for t in inv.tensors if t.layer == il % hp.n_layer]
    return dataclasses.replace(inv, tensors=tuple(tensors), hparams=dataclasses.replace(
        hp, n_layer=n_layer, n_head_kv=tuple(hp.n_head_kv[il % hp.n_layer] for il in range(n_layer))))


def main(argv: list[str]) -> int:
    model, profile, out = argv
    base = read_inventory(model)
    cost = CostModel(read_json(Profile, profile))
    runs = []
    for n_layer, budget_gib in ((base.hparams.n_layer, 2.5), (80, 6.0)):
        inv = base if n_layer == base.hparams.n_layer else repeat_blocks(base, n_layer)
        for w in WORKLOADS:
            t0 = time.perf_counter()
            solution = solve(inv, cost, int(budget_gib * 2**30), w)
            seconds = time.perf_counter() - t0
            runs.append({"n_layer": n_layer, "budget_gib": budget_gib, "workload": dataclasses.asdict(w),
                         "seconds": round(seconds, 3), "candidates_solved": len(solution.candidates),
                         "n_ubatch": solution.settings.n_ubatch, "op_offload": solution.settings.op_offload})
            print(f"{n_layer} layers, {w.objective} pp{w.n_prompt} tg{w.n_gen}: {seconds:.2f} s")
    write_runs("benchmarks.solve_speed", argv, runs, out, gap_rel=GAP_REL)
    return 0


def write_runs(module: str, argv: list[str], runs: list[dict], out: str, **extra) -> None:
    """The runs as JSON with the command, this machine and the date."""
    result = {"command": f"python -m {module} " + " ".join(argv), **extra,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
              "date": datetime.date.today().isoformat(), "runs": runs}
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
