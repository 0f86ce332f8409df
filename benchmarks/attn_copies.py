"""Does the profile time decode attention from the CPU's caches? The profiler (oatoplan/profile.py) times 8 copies of a
one-query FLASH_ATTN_EXT node per graph: 16 MiB of K/V at 1,024 cells, 64 MiB at 4,096 (Qwen2-7B heads), which a
large L3 may hold, while a real decode reads every layer's cache from memory. This times the node per copy with 8 and
with 64 copies (128-512 MiB) on the CPU backend: if the two differ, the profile prices attention at depth too cheap.

    python -m benchmarks.attn_copies --threads 16 --out F.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

from oatoplan import ggml
from oatoplan.ggml import Backend, graph_on, time_us
from oatoplan.machine import llama_cpp_build

HEAD_DIM, N_HEAD, N_HEAD_KV = 128, 28, 4


def per_node_us(backend: Backend, n_kv: int, copies: int, rng: np.random.Generator) -> list[float]:
    with graph_on(backend) as g:
        for _ in range(copies):
            q = g.tensor("F32", HEAD_DIM, 1, N_HEAD)
            k, v = (g.tensor("F16", HEAD_DIM, n_kv, N_HEAD_KV) for _ in range(2))
            g.output(g.op("ggml_flash_attn_ext", q, k, v, None, 1 / math.sqrt(HEAD_DIM), 0.0, 0.0))
        g.allocate(lambda t, ggml_type, n_bytes: ggml.random_bytes(ggml_type, n_bytes, rng) if ggml_type == "F16"
                   else bytes(n_bytes))
        return [t / copies for t in time_us(g.compute, min_samples=5, max_samples=15)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-kv", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--copies", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    backend = Backend("CPU", n_threads=args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for n_kv in args.n_kv:
        for copies in args.copies:
            samples = per_node_us(backend, n_kv, copies, rng)
            kv_mib = copies * 2 * n_kv * N_HEAD_KV * HEAD_DIM * 2 / 2**20
            rows.append({"n_kv": n_kv, "copies": copies, "kv_mib": kv_mib, "per_node_us": samples})
            print(f"n_kv {n_kv:6d} x {copies:3d} copies ({kv_mib:5.0f} MiB): {np.median(samples):7.0f} us a node",
                  file=sys.stderr)
    backend.close()
    Path(args.out).write_text(json.dumps({
        "command": " ".join(sys.argv), "machine": platform.node(), "cpu": platform.processor(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp_build": llama_cpp_build(), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
