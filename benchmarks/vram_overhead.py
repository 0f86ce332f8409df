"""What a llama.cpp process uses on the GPU beyond the buffers llama.cpp reports (model, KV, compute): the CUDA
backend's pool, cuBLAS handles and workspace, kernel code loaded on first use. Each configuration runs in a fresh
process (as a user's would), and the first one also loads a second model in the same process to separate what is paid
once per process from what each llama context pays.

    python -m benchmarks.vram_overhead MODEL.gguf --out overhead.jsonl [--configs all-gpu-ub512,...]

Per configuration, JSON lines with device memory in use (bytes, from ggml's device registry) at each step:
after the CUDA context exists (`ctx`), after the load (`load`), after a warm-up prefill + 8 decode steps (`warm`),
after a full run (`run`), and llama.cpp's own GPU allocations (`allocated`); `overhead_*` = step - ctx - allocated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np

CONFIGS = {
    # name: (placement, n_ubatch, op_offload, use_mmap, n_prompt)
    "all-gpu-ub512": ("all-gpu", 512, True, False, 512),
    "all-gpu-ub2048": ("all-gpu", 2048, True, False, 2048),
    "ffn-cpu-ub512": ("ffn-cpu", 512, True, False, 512),
    "ffn-cpu-ub2048": ("ffn-cpu", 2048, True, False, 2048),
    "ngl-half-mmap-ub512": ("ngl-half", 512, True, True, 512),
    "all-cpu-offload-ub512": ("all-cpu", 512, True, False, 512),
    "all-cpu-offload-ub2048": ("all-cpu", 2048, True, False, 2048),
}


def _used(gpu: str) -> int:
    from oatoplan.machine import devices
    d = next(d for d in devices() if d.name == gpu)
    return d.total_bytes - d.free_bytes


def _plan(inv, placement: str, n_ubatch: int, op_offload: bool, use_mmap: bool, gpu: str):
    from oatoplan.baselines import layer_offload, n_cpu_ffn
    from oatoplan.graph import model_units
    from oatoplan.plan import make_plan, tensor_placement
    half = inv.hparams.n_layer // 2
    units = model_units(inv)
    unit_devices = {"all-gpu": {u.key: gpu for u in units}, "all-cpu": {u.key: "CPU" for u in units},
                    "ffn-cpu": n_cpu_ffn(inv, gpu, half), "ngl-half": layer_offload(inv, gpu, half + 1)}[placement]
    devices, ngl = tensor_placement(inv, unit_devices)
    return make_plan(inv, devices, n_gpu_layers=ngl, gpu_devices=(gpu,), n_ctx=4096, n_batch=n_ubatch,
                     n_ubatch=n_ubatch, use_mmap=use_mmap, op_offload=op_offload, n_outputs_max=1)


def one(model: str, name: str, second: str | None) -> list[dict]:
    from oatoplan.inventory import read_inventory
    from oatoplan.load import load
    from oatoplan.machine import gpu_devices
    from oatoplan.measure import measure_once
    from oatoplan.schema import Workload
    gpu = gpu_devices()[0].name
    inv = read_inventory(model)
    rows = []
    ctx = _used(gpu)
    keep = []
    for label in [name] + ([second] if second else []):
        placement, ub, offload, mmap, n_prompt = CONFIGS[label]
        plan = _plan(inv, placement, ub, offload, mmap, gpu)
        before = _used(gpu)
        llm = load(model, plan, verify=False)
        keep.append(llm)
        after_load = _used(gpu)
        allocated = sum(a.n_bytes for a in llm.oatoplan_memory.allocations if a.device == gpu)
        rng = np.random.default_rng(0)
        workload = Workload(n_prompt=n_prompt, n_gen=8)
        measure_once(llm, plan, workload, rng)
        warm = _used(gpu)
        measure_once(llm, plan, replace(workload, n_gen=32), rng)
        run = _used(gpu)
        rows.append(dict(config=label, second_in_process=label != name, ctx=ctx, before=before, load=after_load,
                         warm=warm, run=run, allocated=allocated,
                         by_kind={a.kind: a.n_bytes for a in llm.oatoplan_memory.allocations if a.device == gpu},
                         overhead_load=after_load - before - allocated, overhead_warm=warm - before - allocated,
                         overhead_run=run - before - allocated))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--one")
    parser.add_argument("--second")
    args = parser.parse_args(argv)
    if args.one:
        for row in one(args.model, args.one, args.second):
            print(json.dumps(row), flush=True)
        return 0
    names = args.configs.split(",")
    with open(args.out, "w") as out:
        out.write(json.dumps(dict(command=" ".join(["python -m benchmarks.vram_overhead"] + argv),
                                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                  host=platform.node())) + "\n")
        for i, name in enumerate(names):
            cmd = [sys.executable, "-m", "benchmarks.vram_overhead", args.model, "--out", "-", "--one", name]
            if i == 0 and len(names) > 1:
                cmd += ["--second", names[1]]
            run = subprocess.run(cmd, capture_output=True, text=True)
            for line in run.stdout.splitlines():
                if line.startswith("{"):
                    out.write(line + "\n")
                    row = json.loads(line)
                    print(f"{row['config']:24s} second={row['second_in_process']!s:5s} allocated "
                          f"{row['allocated'] / 2**20:8.1f} MiB  overhead load/warm/run "
                          f"{row['overhead_load'] / 2**20:6.1f} {row['overhead_warm'] / 2**20:6.1f} "
                          f"{row['overhead_run'] / 2**20:6.1f} MiB", flush=True)
            if run.returncode:
                print(name, "failed:", run.stderr[-800:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
