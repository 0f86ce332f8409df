"""Several devices on paper (issue #19): the plan for a 70B-class dense model over (a) one box with a 24 GiB and a
12 GiB GPU, the second behind a PCIe 4.0 x16 link, and (b) two PCs, the local 24 GiB GPU and a 24 GiB GPU behind
llama.cpp's RPC over 10 GbE, against llama.cpp's default split (-ts by memory) and a --fit-style fill. Every GPU gets
the shipped H200 profile's operator timings (H200 timings, not a 24 GB consumer card's); the links' rates are
assumptions. Predictions of the cost model only, nothing here is measured.

    python -m benchmarks.make_model llama-3-70b /tmp/llama-3-70b.gguf --sparse
    python -m benchmarks.split_paper /tmp/llama-3-70b.gguf --profile oatoplan/profiles/h200-qwen2-7b.json \
        --out benchmarks/results/DATE-devbox-split-paper-llama-3-70b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

from oatoplan.artifacts import read_json
from oatoplan.inventory import read_inventory
from oatoplan.schema import DeviceLink, ModelInventory, Profile, Workload
from oatoplan.split import plan_split

GIB = 1 << 30
RPC = "RPC[192.0.2.10:50052]"       # a documentation address (RFC 5737): nothing is contacted
# (name, second device, its budget, link bytes/s one way, fixed cost of one crossing in us: None = the profile's)
SETUPS = (("one box: 24 GiB + 12 GiB GPU, PCIe 4.0 x16", "CUDA1", 12 * GIB, 25e9, None),
          ("two PCs: 24 GiB GPU + RPC 24 GiB GPU, 10 GbE", RPC, 24 * GIB, 1.25e9, 200.0))
LOCAL_BUDGET = 24 * GIB


def with_device(profile: Profile, device: str, rate_bytes_per_s: float, crossing_us: float | None) -> Profile:
    """The profile with `device`: its GPU's operator timings, a link at rate_bytes_per_s each way and a fixed
    crossing cost (None: the profile's own)."""
    ops = tuple(dataclasses.replace(o, device=device) for o in profile.ops if o.device == profile.gpu_device)
    fixed = profile.crossing_us if crossing_us is None else crossing_us
    link = DeviceLink(device, f"{profile.gpu_device}'s timings, assumed link", 24 * GIB, fixed, fixed,
                      rate_bytes_per_s, rate_bytes_per_s)
    return dataclasses.replace(profile, ops=profile.ops + ops, devices=(link,))


def _arm(name: str, flags: str, prediction, memory: dict | None = None) -> dict:
    p = prediction
    return dict(arm=name, flags=flags, predicted=None if p is None else dict(
        pp_tok_s=round(p.prefill_tokens_per_s, 1), tg_tok_s=round(p.decode_tokens_per_s, 2),
        prefill_s=round(p.prefill_s, 3), total_s=round(p.total_s, 3)), device_bytes=memory)


def paper_rows(inv: ModelInventory, profile: Profile, prompts: tuple[int, ...] = (512, 2048),
               n_gen: int = 128) -> list[dict]:
    """Every setup x workload: oatoplan's plan and llama.cpp's two splits, predicted."""
    rows = []
    for name, device, budget, rate, crossing in SETUPS:
        p = with_device(profile, device, rate, crossing)
        budgets = {p.gpu_device: LOCAL_BUDGET, device: budget}
        for n_prompt in prompts:
            t0 = time.perf_counter()
            plan = plan_split(inv, p, budgets, Workload(n_prompt, n_gen))
            m = plan.memory
            memory = {d: {"weights": m.model_bytes.get(d, 0), "kv": m.kv_bytes.get(d, 0),
                          "compute": m.compute_bytes.get(d, 0)} for d in [*budgets, "CPU"]}
            arms = [_arm("oatoplan", plan.flags, plan.prediction, memory)]
            arms += [_arm(b.name, b.flags, b.prediction) for b in plan.baselines]
            rows.append(dict(setup=name, budgets_bytes=budgets, link_bytes_per_s=rate,
                             crossing_us=p.devices[0].crossing_us, n_prompt=n_prompt, n_gen=n_gen,
                             tensor_split=list(plan.tensor_split), n_ubatch=plan.n_ubatch,
                             solve_s=round(time.perf_counter() - t0, 1), notes=list(plan.notes), arms=arms))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    inv, profile = read_inventory(args.model), read_json(Profile, args.profile)
    rows = paper_rows(inv, profile, n_gen=args.gen)
    for row in rows:
        print(row["setup"], f"pp{row['n_prompt']}+tg{row['n_gen']}", row["tensor_split"], flush=True)
        for arm in row["arms"]:
            print("   ", arm["arm"], json.dumps(arm["predicted"]), arm["flags"][:160])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(kind="predictions (cost model), not measurements", machine="devbox, predictions only",
                           profile=profile.profile_id, model=inv.identity.file_name,
                           command=" ".join(["python -m benchmarks.split_paper"] + (argv or sys.argv[1:])),
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           assumptions=["every GPU has the H200 profile's operator timings (not a consumer card's)",
                                        "CUDA0's host link is the profile's (the H200 machine's PCIe gen 5)",
                                        "CUDA1: PCIe 4.0 x16 at 25 GB/s each way, the profile's fixed crossing cost",
                                        "RPC: 10 GbE at 1.25 GB/s, 200 us fixed per crossing (a round trip)",
                                        "the host RAM holds the rest"],
                           rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
