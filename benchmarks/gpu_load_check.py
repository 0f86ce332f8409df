"""GPU check of the loader (issue #3): load shape-faithful models with mixed CPU/GPU plans through a CUDA build of
llama-cpp-python, and record what llama.cpp allocated per device against the plan's prediction. Also records one
short completion's llama.cpp perf counters per plan (a smoke figure, not a benchmark: one run, no repetitions).

    python -m benchmarks.gpu_load_check MODEL.gguf [MODEL.gguf ...] --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from oatoplan.inventory import read_inventory
from oatoplan.graph import CPU
from oatoplan.load import generate, load, run_stats
from oatoplan.machine import gpu_devices, llama_cpp_build
from oatoplan.plan import TIED_OUTPUT, llama_cpp_flags, make_plan
from oatoplan.artifacts import to_jsonable

FFN_MATRICES = ("ffn_up", "ffn_gate", "ffn_down")


def mixed_plans(inv, gpu: str) -> dict:
    """Two placements at about half the weights on the GPU: llama.cpp's layer offload, and all layers (attention,
    KV cache) on the GPU with the FFN matrices of the first half of the layers and the output matrix on the CPU."""
    n_layer = inv.hparams.n_layer
    half = n_layer // 2
    settings = dict(gpu_devices=(gpu,), n_ctx=4096, n_batch=2048, n_ubatch=2048)
    cpu = {t.name: CPU for t in inv.tensors if t.layer is not None and t.layer < half and t.role in FFN_MATRICES}
    cpu[TIED_OUTPUT if inv.tied_output else "output.weight"] = CPU
    return {
        f"layer-offload-ngl{half + 1}": make_plan(inv, {}, n_gpu_layers=half + 1, **settings),
        f"attn-gpu-ffn0-{half - 1}-cpu": make_plan(inv, cpu, n_gpu_layers=-1, **settings),
    }


def machine() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "not available"
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"cpu": cpu_model, "gpu": run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pcie.link.gen.max,"
                                          "pcie.link.width.max", "--format=csv,noheader"]),
            "python": platform.python_version(), "llama_cpp_build": llama_cpp_build()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    gpus = gpu_devices()
    if not gpus:
        print("no GPU device in this llama.cpp build", file=sys.stderr)
        return 1
    record = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine(), "devices": to_jsonable(gpus), "runs": []}
    prompt = "The history of the printing press begins " * 40
    for model in args.models:
        inv = read_inventory(model)
        for name, plan in mixed_plans(inv, gpus[0].name).items():
            start = time.perf_counter()
            llm = load(model, plan, verify=False)
            load_s = time.perf_counter() - start
            text = "".join(generate(llm, prompt, 32))
            stats = run_stats(llm)
            report = llm.oatoplan_memory
            llm.close()
            run = {"model": model.name, "plan": name, "flags": llama_cpp_flags(plan), "load_s": round(load_s, 2),
                   "memory_checks": to_jsonable(report.checks), "allocations": to_jsonable(report.allocations),
                   "all_checks_ok": all(c.ok for c in report.checks), "perf": to_jsonable(stats),
                   "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 1),
                   "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1), "text_chars": len(text)}
            record["runs"].append(run)
            print(f"{model.name:28s} {name:28s} load {load_s:5.1f} s  checks ok: {run['all_checks_ok']}  "
                  f"pp {run['prefill_tokens_per_s']:8.1f} t/s  tg {run['decode_tokens_per_s']:6.1f} t/s")
            for c in report.checks:
                print(f"    {c.kind:8s} {c.device:6s} predicted {c.predicted_bytes / 2**20:9.2f} MiB  "
                      f"allocated {c.allocated_bytes / 2**20:9.2f} MiB  {'ok' if c.ok else 'MISMATCH'}")
            for a in report.allocations:
                print(f"    [{a.kind} {a.buffer_type} {a.n_bytes / 2**20:.2f} MiB]")
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(r["all_checks_ok"] for r in record["runs"]) else 2


if __name__ == "__main__":
    sys.exit(main())
