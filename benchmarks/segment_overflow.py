"""A chat that outgrows the plan's first KV segment: decode speed and memory of the segmented plan and of the best
plan with llama.cpp's own cache, both solved for one workload in a large context (`--ctx`), each run at several
depths. Past the first segment the segmented plan's cells go to host memory and their attention runs on the CPU,
except for prompt batches while the host segment holds at most the plan's `offload_cells` (patches/0012: then its
K/V are copied to the GPU). This measures what that costs, and how far the GPU's memory grows with the chat (CUDA's
used bytes after the load and after each depth, against the budget; the KV cache's bytes per buffer type, from
oatoplan's patched build). With patches/0012 two more arms run the same segmented plan with prompt batches over
the host segment always on the CPU (offload 0), and always copied (offload = the whole host segment: the copy's
VRAM is then not held to the budget; it measures what the copy gains and costs).

    python -m benchmarks.segment_overflow MODEL --vram 2.5GiB --profile P --ctx 32768 --plan-depth 1024 \\
        --depths 1024 2048 4096 --out F.json

Needs a CUDA build of oatoplan's series with patches/0008.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

from oatoplan import ggml
from oatoplan.artifacts import read_json
from oatoplan.inventory import read_inventory
from oatoplan.load import load
from oatoplan.machine import llama_cpp_build
from oatoplan.measure import decode, gpu_used_bytes
from oatoplan.memory import budget_bytes
from oatoplan.plan import plan_model
from oatoplan.schema import Profile, Workload


def run_depths(llm, plan, depths: list[int], n_prompt: int, n_gen: int, reps: int, gpu: str,
               rows: list[dict], save) -> None:
    """Per depth, appended to `rows` (then `save()`, so that a run cut short keeps what it measured): decode
    tokens/s of each repetition (after filling the cache to that depth and a prompt), the prefill's tokens/s, the
    GPU's used bytes and the KV cache's bytes per buffer type afterwards."""
    rng = np.random.default_rng(0)
    n_vocab, memory = llm.n_vocab(), llama_cpp.llama_get_memory(llm._ctx.ctx)
    for depth in depths:
        samples, prefill = [], []
        for _ in range(reps):
            llama_cpp.llama_memory_clear(memory, True)
            tokens = rng.integers(0, n_vocab, depth + n_prompt).tolist()
            t0 = time.perf_counter()
            for start in range(0, len(tokens), plan.n_batch):
                decode(llm, tokens[start:start + plan.n_batch])
            prefill.append(len(tokens) / (time.perf_counter() - t0))
            token = int(rng.integers(0, n_vocab))
            t0 = time.perf_counter()
            for _ in range(n_gen):
                decode(llm, [token])
            samples.append(n_gen / (time.perf_counter() - t0))
        rows.append({"depth": depth, "decode_tokens_per_s": samples, "prefill_tokens_per_s": prefill,
                     "gpu_used_bytes": gpu_used_bytes(gpu),
                     "kv_bytes": ggml.memory_breakdown(llm._ctx.ctx, "context"),
                     "compute_bytes": ggml.memory_breakdown(llm._ctx.ctx, "compute")})
        print(f"  depth {depth}: {np.mean(samples):.1f} tokens/s, GPU {rows[-1]['gpu_used_bytes'] / 2**20:,.0f} MiB, "
              f"KV {rows[-1]['kv_bytes']}", file=sys.stderr)
        save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--vram", default="2.5GiB")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--plan-depth", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--depths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--arms", nargs="+", help="only the arms of these names (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    inv, profile = read_inventory(args.model), read_json(Profile, args.profile)
    budget = budget_bytes(args.vram, profile)
    workload = Workload(n_prompt=args.prompt, n_gen=args.gen, n_depth=args.plan_depth, n_ctx_asked=args.ctx)
    result = {"command": " ".join(sys.argv), "machine": platform.node(), "cpu": platform.processor(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "llama_cpp_build": llama_cpp_build(), "profile_id": profile.profile_id, "budget_bytes": budget,
              "workload": vars(args), "arms": []}

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1, default=list))

    segmented = plan_model(inv, profile, budget, workload)
    arms = [("segmented", segmented)]
    if segmented.kv_segments and "segment-kv-offload" in llama_cpp_build():
        host = segmented.kv_segments[-1]
        for name, cells in (("segmented, host segment on the CPU", 0),
                            ("segmented, host segment always copied (over budget)", host.end_cell - host.first_cell)):
            if cells != host.offload_cells:
                rest = dataclasses.replace(host, offload_cells=cells)
                arms.append((name, dataclasses.replace(segmented, kv_segments=segmented.kv_segments[:-1] + (rest,))))
    arms.append(("stock cache", None))
    for name, plan in arms:
        if args.arms and name not in args.arms:
            continue
        plan = plan or plan_model(inv, profile, budget, workload, segments=False)
        gpu = plan.gpu_devices[0]
        before = gpu_used_bytes(gpu)
        llm = load(args.model, plan)
        print(f"{name}: {plan.flags[:90]} segments {[(s.first_cell, s.end_cell, s.device) for s in plan.kv_segments]}",
              file=sys.stderr)
        loaded = gpu_used_bytes(gpu) - before
        rows: list[dict] = []
        result["arms"].append({"name": name, "flags": plan.flags, "kv_segments": [vars(s) for s in plan.kv_segments],
                               "predicted_decode_tokens_per_s": plan.prediction.decode_tokens_per_s,
                               "predicted_gpu_bytes": plan.prediction.gpu_bytes, "gpu_bytes_after_load": loaded,
                               "gpu_used_before_load": before, "depths": rows})
        run_depths(llm, plan, args.depths, args.prompt, args.gen, args.reps, gpu, rows, save)
        llm.close()
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
