"""Measure weight streaming's fixed cost per streamed upload on the GPU machine, as `oatoplan profile run --model`
does (oatoplan/calibrate.py measure_stream_split), without profiling everything again: the samples and the fitted
cost go to a JSON file of their own; the profile given is not changed (--profile-out writes a copy of it that holds
the measured cost, for benches that should price it).

    python -m benchmarks.stream_split qwen2-7b.gguf --profile P.json [--reps 10] --out F.json [--profile-out P2.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from oatoplan.artifacts import read_json, to_jsonable, write_json
from oatoplan.calibrate import measure_stream_split
from oatoplan.files import Output
from oatoplan.schema import Profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile-out", help="write the profile with the measured cost here (a new file)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    profile = read_json(Profile, args.profile)
    found = measure_stream_split(args.model, profile, args.reps)
    if found is None:
        print("not measured (no GPU in the profile, no weight streaming in its build, or nothing streamed)",
              file=sys.stderr)
        return 1
    print(f"stream_split_us {found.split_us}")
    for x in found.samples:
        print(f"  {x.name}: {x.n_uploads:g} uploads per ubatch, prefill us {list(x.prefill_us)}")
    with open(args.out, "w") as f:
        json.dump({"command": "python -m benchmarks.stream_split " + " ".join(argv or sys.argv[1:]),
                   "profile_id": profile.profile_id, "build": profile.machine.llama_cpp_build,
                   "stream_split": to_jsonable(found)}, f, indent=1)
        f.write("\n")
    if args.profile_out:
        out = Output(Path(args.profile_out), (Path(args.profile),), False, "--profile-out")
        write_json(dataclasses.replace(profile, stream_split=found), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
