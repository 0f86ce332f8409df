"""How long the several-device planner (`split.plan_split`) takes: Qwen2-7B (28 layers) and an 80-layer model made of
its blocks repeated, pp512+tg128 and pp2048+tg128, over CUDA0 + CUDA1 where CUDA1 is the profile's GPU copied behind a
25 GB/s link (tests/test_split.py's two_device_profile pattern). Writes JSON with the machine, the command, raw times
and the predictions (so that two versions of the solver can be compared).

    python -m benchmarks.split_solve_speed QWEN2-7B.gguf PROFILE.json OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from benchmarks.solve_speed import repeat_blocks, write_runs
from oatoplan.artifacts import read_json
from oatoplan.inventory import read_inventory
from oatoplan.schema import DeviceLink, Profile, Workload
from oatoplan.split import plan_split

WORKLOADS = (Workload(512, 128), Workload(2048, 128))
CASES = ((28, {"CUDA0": 2 << 30, "CUDA1": 3 << 29}), (80, {"CUDA0": 5 << 30, "CUDA1": 4 << 30}))


def second_gpu(profile: Profile, rate_bytes_per_s: float = 25e9) -> Profile:
    """The profile with "CUDA1": its GPU's op timings, the profiled crossing, a link at rate_bytes_per_s."""
    ops = tuple(dataclasses.replace(o, device="CUDA1") for o in profile.ops if o.device == profile.gpu_device)
    link = DeviceLink("CUDA1", "a copy of " + profile.gpu_device, 140 << 30, profile.crossing_us,
                      profile.crossing_us, rate_bytes_per_s, rate_bytes_per_s)
    return dataclasses.replace(profile, ops=profile.ops + ops, devices=(link,))


def main(argv: list[str]) -> int:
    model, profile_path, out = argv[:3]
    base, profile = read_inventory(model), second_gpu(read_json(Profile, profile_path))
    runs = []
    for n_layer, budgets in CASES:
        inv = base if n_layer == base.hparams.n_layer else repeat_blocks(base, n_layer)
        for w in WORKLOADS:
            t0 = time.perf_counter()
            plan = plan_split(inv, profile, budgets, w)
            seconds = time.perf_counter() - t0
            runs.append({"n_layer": n_layer, "budgets_bytes": budgets, "workload": dataclasses.asdict(w),
                         "seconds": round(seconds, 2), "total_s": round(plan.prediction.total_s, 4),
                         "tensor_split": plan.tensor_split, "n_ubatch": plan.n_ubatch,
                         "baselines_total_s": {b.name: b.prediction and round(b.prediction.total_s, 4)
                                               for b in plan.baselines}})
            print(json.dumps(runs[-1]), flush=True)
    write_runs("benchmarks.split_solve_speed", argv, runs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
