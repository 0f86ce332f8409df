"""Weight streaming on and off (OATO_STREAM) with one placement: greedy tokens and logits must be identical, and the
prefill time of each, next to the same model all on the GPU. One JSON line per measurement to stdout (and --out).

    python -m benchmarks.stream_check MODEL --cpu-ffn 28 --ubatch 512 --prompt 512 2048 --slots 2 3 4 --out s.jsonl

--cpu-ffn N puts the FFN weights of N blocks in pinned host memory (op offload copies them to the GPU for large
batches, which is what streams): the first N, or N spread evenly with --spread; everything else is on the GPU. One
arm without streaming, one per --slots value, and the model all on the GPU; each with the cost model's prediction.
Needs a CUDA build of oatoplan's series.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

from oatoplan import ggml
from oatoplan.baselines import all_on, n_cpu_ffn
from oatoplan.cost import CostModel, predict
from oatoplan.inventory import read_inventory
from oatoplan.load import load
from oatoplan.machine import gpu_devices
from oatoplan.measure import decode, gpu_used_bytes
from oatoplan.memory import Settings
from oatoplan.plan import plan_for
from oatoplan.profile import find_profile
from oatoplan.schema import Workload
from oatoplan.streaming import spread


def last_logits(llm) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def greedy(llm, prompt: list[int], n_batch: int, n_gen: int) -> tuple[list[int], np.ndarray]:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    for start in range(0, len(prompt), n_batch):
        decode(llm, prompt[start:start + n_batch])
    first = last_logits(llm)
    tokens, logits = [], first
    for _ in range(n_gen):
        token = int(np.argmax(logits))
        tokens.append(token)
        decode(llm, [token])
        logits = last_logits(llm)
    return tokens, first


def prefill_s(llm, n_prompt: int, n_batch: int, rng) -> float:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    prompt = rng.integers(0, llm.n_vocab(), n_prompt).tolist()
    t0 = time.perf_counter()
    for start in range(0, n_prompt, n_batch):
        decode(llm, prompt[start:start + n_batch])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--cpu-ffn", type=int, required=True)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--prompt", type=int, nargs="+", default=[512])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-all-gpu", action="store_true", help="skip the all-GPU reference")
    ap.add_argument("--slots", type=int, nargs="+", default=[3])
    ap.add_argument("--spread", action="store_true", help="the host FFN blocks spread evenly, not the first N")
    ap.add_argument("--profile", help="the profile to predict with (default: find_profile())")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    inv = read_inventory(args.model)
    gpu = gpu_devices()[0].name
    profile = find_profile(Path(args.profile) if args.profile else None)
    n_ctx = max(args.prompt) + args.gen + 16
    s = Settings(args.ubatch, True, True, n_ctx, n_outputs_max=1)
    host = n_cpu_ffn(inv, gpu, args.cpu_ffn)
    if args.spread:
        host = spread(inv, host)
    arms = [("stream off", 0, host)] + [(f"stream on, {k} slots", k, host) for k in args.slots]
    if not args.no_all_gpu:
        arms.append(("all GPU", 0, all_on(inv, gpu)))
    cost = CostModel(profile)
    out = open(args.out, "a") if args.out else None
    meta = dict(model=os.path.basename(args.model), cpu_ffn=args.cpu_ffn, ubatch=args.ubatch, host=platform.node(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([sys.executable, "-m", "benchmarks.stream_check"] + (argv or sys.argv[1:])))
    rng0 = np.random.default_rng(0)
    prompt = rng0.integers(0, inv.hparams.n_vocab, 300).tolist()
    reference = None
    os.environ.pop("OATO_STREAM", None)
    for name, slots, placement in arms:
        arm_settings = dataclasses.replace(s, stream_slots=slots)
        # the profile names the build it measured; this check is of whatever build is installed
        plan = dataclasses.replace(plan_for(inv, placement, arm_settings, profile, gpu), llama_cpp_build="")
        ggml.reset_stream_stats()
        llm = load(args.model, plan, verify=False)
        tokens, logits = greedy(llm, prompt, plan.n_batch, args.gen)
        rec = dict(meta, arm=name, stream_slots=plan.stream_slots, spread=args.spread, tokens=tokens,
                   profile=profile.profile_id,
                   predicted_pp_tok_s={n: predict(cost, inv, placement, Workload(n, 1), dataclasses.replace(
                       arm_settings, n_ctx=n_ctx)).prefill_tokens_per_s for n in args.prompt},
                   predicted_stream_bytes=sum(plan.memory.stream_bytes.values()))
        if reference is None:
            reference = (tokens, logits)
        elif name != "all GPU":
            rec["tokens_identical"] = tokens == reference[0]
            # bitwise, NaN included (a synthetic model's logits can overflow to NaN: then only this says anything)
            rec["logits_identical"] = bool(np.array_equal(logits, reference[1], equal_nan=True))
            rec["logits_finite"] = int(np.isfinite(logits).sum())
            rec["logits_max_abs_diff"] = float(np.nanmax(np.abs(logits - reference[1]))) \
                if np.isfinite(logits).any() else None
        rng = np.random.default_rng(1)
        for n in args.prompt:
            prefill_s(llm, min(n, args.ubatch), plan.n_batch, rng)        # warm-up
            samples = [prefill_s(llm, n, plan.n_batch, rng) for _ in range(args.reps)]
            rec[f"pp{n}_s"] = samples
            rec[f"pp{n}_tok_s"] = n / statistics.median(samples)
        rec["stream_stats"] = ggml.stream_stats()
        rec["vram_used_bytes"] = gpu_used_bytes(gpu)
        llm.close()
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
