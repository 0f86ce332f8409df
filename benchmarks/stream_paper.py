"""Weight streaming on paper: what the planner would choose, and the prefill it predicts as a share of all-GPU, for
a profile as measured and with its PCIe copy rates scaled (e.g. a desktop PCIe 4.0 x16 link at ~25 GB/s, half the
H200 machine's). Predictions of the cost model only, nothing here is measured: the measured check of the same model
is `oatoplan bench` on the GPU machine.

    python -m benchmarks.stream_paper MODEL.gguf --profile P.json --vram 1.4GiB 2.5GiB --pcie-scale 1 0.5 \
        --out benchmarks/results/DATE-stream-paper.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys

from oatoplan.artifacts import read_json
from oatoplan.baselines import all_on
from oatoplan.cost import CostModel, predict
from oatoplan.graph import model_units
from oatoplan.inventory import read_inventory
from oatoplan.memory import Settings
from oatoplan.plan import plan_model
from oatoplan.schema import Profile, Workload
from oatoplan.units import parse_size_bytes


def scaled(profile: Profile, scale: float) -> Profile:
    """The profile with every host<->device copy `scale` times as fast (latencies kept)."""
    transfers = []
    for t in profile.transfers:
        latency = min(x.t_us for x in profile.transfers if (x.direction, x.memory) == (t.direction, t.memory))
        transfers.append(dataclasses.replace(t, t_us=latency + (t.t_us - latency) / scale, samples_us=()))
    return dataclasses.replace(profile, transfers=tuple(transfers))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--vram", nargs="+", default=["1.4GiB", "2.5GiB"])
    ap.add_argument("--pcie-scale", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--prompt", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    inv = read_inventory(args.model)
    base = read_json(Profile, args.profile)
    rows = []
    for scale in args.pcie_scale:
        profile = scaled(base, scale)
        cost = CostModel(profile)
        for vram in args.vram:
            for n in args.prompt:
                w = Workload(n, args.gen)
                plan = plan_model(inv, profile, parse_size_bytes(vram), w)
                ref = predict(cost, inv, all_on(inv, cost.gpu), w, Settings(plan.n_ubatch, True, True, w.n_ctx,
                                                                             n_outputs_max=1))
                off = predict(cost, inv, plan.placement, w, Settings(plan.n_ubatch, plan.op_offload, True, w.n_ctx,
                                                                     n_outputs_max=1))
                p = plan.prediction
                rows.append(dict(pcie_scale=scale, vram=vram, n_prompt=n, n_gen=args.gen, n_ubatch=plan.n_ubatch,
                                 stream_slots=plan.stream_slots, stream_slot_bytes=plan.stream_slot_bytes,
                                 host_weight_bytes=sum(u.n_bytes for u in model_units(inv)
                                                       if plan.placement[u.key] == "CPU" and not u.is_attention),
                                 pp_tok_s=round(p.prefill_tokens_per_s), tg_tok_s=round(p.decode_tokens_per_s, 2),
                                 total_s=round(p.total_s, 3),
                                 pp_without_streaming_tok_s=round(off.prefill_tokens_per_s),
                                 all_gpu_pp_tok_s=round(ref.prefill_tokens_per_s),
                                 pp_share_of_all_gpu=round(p.prefill_tokens_per_s / ref.prefill_tokens_per_s, 3)))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(kind="predictions (cost model), not measurements", profile=base.profile_id,
                           model=inv.identity.file_name, command=" ".join(["python -m benchmarks.stream_paper"] +
                                                                         (argv or sys.argv[1:])),
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
