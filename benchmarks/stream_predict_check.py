"""Re-predict the prefill of recorded weight-streaming bench arms with this cost model, against what they measured.

Each streamed arm of a bench JSON (`oatoplan bench ... --out F`) carries the plan it loaded; this predicts that plan
again with a profile, optionally with a fixed cost per streamed upload (`--stream-split-us`, what the profile's
`stream_split` holds once `oatoplan profile run --model` measured it), and prints predicted against measured prefill.
`--fit` also prints the per-upload cost that makes the arms' relative errors smallest (root mean square).
`--form compute` prices the cost on the compute stream alone (the model prices it on both streams), to compare forms.

A check of the model's form on runs already made, not a measurement of the constant: a value fitted here comes from
the same arms it is checked on. The constant is measured by `oatoplan profile run --model` (oatoplan/calibrate.py).

    python -m benchmarks.stream_predict_check B1.json B2.json ... --model qwen2-7b-sparse.gguf --profile P.json \
        [--stream-split-us 80] [--fit] [--form both|compute] [--out F.json]

--model: the bench's model or a header-only copy (`python -m benchmarks.make_model qwen2-7b M.gguf --sparse`); its
tensor table must be the bench's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys

from oatoplan.artifacts import read_json, to_jsonable
from oatoplan.cost import CostModel, predict, ubatches
from oatoplan.graph import CPU, model_units
from oatoplan.inventory import read_inventory
from oatoplan.plan import plan_settings
from oatoplan.schema import BenchResult, ModelInventory, Profile, StreamSplitCalibration


def streamed_arms(paths: list[str]) -> tuple[list[tuple[str, BenchResult, object]], list[str]]:
    """(file, bench, arm) of every arm whose plan streams, and the files with none."""
    found, without = [], []
    for path in paths:
        bench = read_json(BenchResult, path)
        arms = [(path, bench, a) for a in bench.arms if a.plan.stream_slots]
        found += arms
        if not arms:
            without.append(path)
    return found, without


class ComputeStreamOnly(CostModel):
    """The cost model with the per-upload cost on the compute stream only (each streamed tensor's upload, which the
    model charges stream_split_us on the copy stream too, without it)."""

    def stream_upload_us(self, n_bytes: int) -> float:
        return super().stream_upload_us(n_bytes) - self.stream_split_us


def check(inv: ModelInventory, profile: Profile, arms: list, split_us: float, form: str = "both") -> list[dict]:
    """One row per arm: uploads per ubatch (the plan's host tensors, and what the build counted), prefill tokens/s
    recorded in the bench, predicted now, measured (mean, sd, samples), and the error of each prediction."""
    model = ComputeStreamOnly if form == "compute" else CostModel
    cost = model(dataclasses.replace(profile, stream_split=StreamSplitCalibration(split_us) if split_us else None))
    units = model_units(inv)
    rows = []
    for path, bench, arm in arms:
        plan, w = arm.plan, bench.workload
        n_ub = len(ubatches(w.n_prompt, plan.n_ubatch))
        host_tensors = sum(len(u.tensors) for u in units if plan.placement[u.key] == CPU and not u.is_output
                           and not u.is_attention)
        now = predict(cost, inv, plan.placement, w, plan_settings(plan)).prefill_tokens_per_s
        measured = statistics.mean(arm.prefill_tokens_per_s)
        rows.append({"file": path.rsplit("/", 1)[-1], "arm": arm.name, "n_prompt": w.n_prompt, "n_ubatch": plan.n_ubatch,
                     "stream_slots": plan.stream_slots, "host_tensors_per_ubatch": host_tensors,
                     "uploads_per_ubatch_counted": round(arm.stream_stats[0] / (bench.reps * n_ub), 2)
                     if arm.stream_stats else None,
                     "predicted_recorded": round(arm.prediction.prefill_tokens_per_s) if arm.prediction else None,
                     "predicted": round(now), "measured_mean": round(measured),
                     "measured_sd": round(statistics.stdev(arm.prefill_tokens_per_s)) if len(
                         arm.prefill_tokens_per_s) > 1 else 0,
                     "measured_samples": list(arm.prefill_tokens_per_s),
                     "error_recorded": round(arm.prediction.prefill_tokens_per_s / measured - 1, 4)
                     if arm.prediction else None,
                     "error": round(now / measured - 1, 4)})
    return rows


def rms(rows: list[dict]) -> float:
    return math.sqrt(statistics.mean(r["error"] ** 2 for r in rows))


def fit(inv: ModelInventory, profile: Profile, arms: list, form: str, top_us: float = 300.0) -> float:
    """The per-upload cost up to top_us, to 0.5 us, with the smallest RMS relative prefill error (a 5 us grid, then
    0.5 us around its best)."""
    def error(x: float) -> float:
        return rms(check(inv, profile, arms, x, form))
    coarse = min((5.0 * i for i in range(int(top_us / 5) + 1)), key=error)
    return min((coarse + 0.5 * i for i in range(-10, 11) if coarse + 0.5 * i >= 0), key=error)


def table(rows: list[dict], split_us: float, form: str) -> str:
    lines = [f"stream_split_us {split_us:g} ({form}): prefill tokens/s, predicted / measured mean (error)",
             f"{'file':58} {'uploads/ub':>10} {'recorded':>16} {'now':>16} {'measured':>14}"]
    for r in rows:
        lines.append(f"{r['file']:58} {r['uploads_per_ubatch_counted']!s:>10} "
                     f"{r['predicted_recorded']:>8,} ({r['error_recorded']:+.1%}) {r['predicted']:>8,} "
                     f"({r['error']:+.1%}) {r['measured_mean']:>7,} ± {r['measured_sd']:,}")
    lines.append(f"RMS error now {rms(rows):.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--stream-split-us", type=float, action="append", default=None,
                    help="per-upload cost to predict with (repeat for several; default 0)")
    ap.add_argument("--fit", action="store_true", help="also the per-upload cost with the smallest RMS error")
    ap.add_argument("--form", choices=("both", "compute"), default="both",
                    help="the per-upload cost on both streams (the model's form) or on the compute stream only")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    inv = read_inventory(args.model)
    profile = read_json(Profile, args.profile)
    arms, without = streamed_arms(args.bench)
    for path, bench, _ in arms:
        if bench.model.tensor_table_sha256 != inv.identity.tensor_table_sha256:
            print(f"{path} was measured with another model than {args.model} (tensor tables differ)", file=sys.stderr)
            return 1
    for path in without:
        print(f"{path}: no arm streams (nothing to check)")
    values = list(args.stream_split_us or [0.0])
    fitted = fit(inv, profile, arms, args.form) if args.fit and arms else None
    if fitted is not None and fitted not in values:
        values.append(fitted)
    runs = []
    for x in values:
        rows = check(inv, profile, arms, x, args.form)
        print(table(rows, x, args.form) + "\n")
        runs.append({"stream_split_us": x, "form": args.form, "rms_error": round(rms(rows), 4), "rows": rows})
    if fitted is not None:
        print(f"smallest RMS error at stream_split_us {fitted:g} (fitted to these arms: a check of the form, not a "
              f"measurement)")
    if args.out:
        result = {"command": "python -m benchmarks.stream_predict_check " + " ".join(argv or sys.argv[1:]),
                  "created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
                  "profile_id": profile.profile_id, "model": to_jsonable(inv.identity),
                  "note": "predictions of the cost model only, on arms measured before; a stream_split_us fitted "
                          "here is a check of the model's form (a fixed cost per streamed upload, on both streams or "
                          "on the compute stream only), not a measurement of the constant: `oatoplan profile run "
                          "--model` measures that",
                  "benches_without_streamed_arms": without, "fitted_stream_split_us": fitted, "runs": runs}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
