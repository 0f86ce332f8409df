"""The CPU's flash-attention node that also writes its rows' log-sum-exp (oato_flash_attn_ext_lse, patches/0006 and
0011) against the stock FLASH_ATTN_EXT node on the same inputs: one query (decode) over n_kv cached tokens, Qwen2-7B's
attention shape (28 query heads, 4 KV heads, head size 128, f16 K/V), wall time of the one-node graph on the CPU
backend; `--queries N` for a prompt batch of N queries instead. Run it with the build to measure (`oatoplan build --cpu`); records the build, raw samples and the machine.

    python -m benchmarks.fa_lse_cpu --n-kv 1024 3072 --threads 2 --out F.json
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
from oatoplan.ggml import Backend, graph_on, lib, time_us
from oatoplan.machine import llama_cpp_build

HEAD_DIM, N_HEAD, N_HEAD_KV = 128, 28, 4


def node_us(backend: Backend, lse: bool, n_kv: int, n_q: int = 1) -> list[float]:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((N_HEAD, n_q, HEAD_DIM), dtype=np.float32)
    k = rng.standard_normal((N_HEAD_KV, n_kv, HEAD_DIM), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((N_HEAD_KV, n_kv, HEAD_DIM), dtype=np.float32).astype(np.float16)
    mask = np.zeros((n_q, n_kv), np.float16)
    with graph_on(backend) as gr:

        args = (gr.ctx, gr.array(q, "F32"), gr.array(k, "F16"), gr.array(v, "F16"), gr.array(mask, "F16"),
                1 / math.sqrt(HEAD_DIM), 0.0, 0.0)
        node = ggml.flash_attn_lse()(*args) if lse else lib().ggml_flash_attn_ext(*args)
        gr.output(node)
        gr.allocate()
        return time_us(gr.compute, min_samples=5, max_samples=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-kv", type=int, nargs="+", default=[1024, 3072])
    ap.add_argument("--queries", type=int, default=1, help="queries a node: 1 (decode) or a prompt batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if ggml.flash_attn_lse() is None:
        sys.exit("this llama.cpp build has no oato_flash_attn_ext_lse (patches/0006): run `oatoplan build --cpu`")
    backend = Backend("CPU", n_threads=args.threads)
    rows = []
    for n_kv in args.n_kv:
        for name, lse in (("stock", False), ("log-sum-exp", True)):
            samples = node_us(backend, lse, n_kv, args.queries)
            rows.append({"node": name, "n_kv": n_kv, "n_q": args.queries, "samples_us": samples})
            print(f"{name:12s} n_kv {n_kv:6d}: {np.median(samples):8.0f} us (median of {len(samples)})",
                  file=sys.stderr)
    backend.close()
    result = {"command": " ".join(sys.argv), "machine": platform.node(), "cpu": platform.processor(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "llama_cpp_build": llama_cpp_build(), "threads": args.threads,
              "shape": {"head_dim": HEAD_DIM, "n_head": N_HEAD, "n_head_kv": N_HEAD_KV}, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
