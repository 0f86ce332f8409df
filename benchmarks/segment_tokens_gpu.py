"""Greedy tokens of the segment KV cache against llama.cpp's own cache on a GPU, over several prompts: every layer on
CUDA0; the stock cache, both segments with the layer (OATO_SEGMENT_KV=16), and segment 1 in host memory with its
attention on the CPU (OATO_SEGMENT_KV_HOST=1); flash attention off and on; 64 tokens each (tests/test_segment_kv_host's
run). Where llama.cpp's own two runs (flash attention off and on) part, the prompt has near ties on this GPU, and a
segmented run parting from either is no evidence of an error; the first token where each pair parts is recorded.

    python -m benchmarks.segment_tokens_gpu gemma-3-270m-q4_k_m.gguf --out F.json

Needs a CUDA build of oatoplan's series with patches/0008.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from oatoplan import ggml
from oatoplan.machine import llama_cpp_build
from oatoplan.testing import PROMPT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_segment_kv_host import SEGMENT_CELLS, _run  # noqa: E402

PROMPTS = [PROMPT,
           "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Water boils at 100 degrees Celsius at sea level. At higher altitudes, the boiling point",
           "Once upon a time, in a small village at the foot of a mountain, there lived an old clockmaker who",
           "The quick brown fox jumps over the lazy dog. This sentence contains every letter of the English alphabet, "
           "which is why"]
RUNS = (("stock", None, None), ("device", SEGMENT_CELLS, None), ("host", SEGMENT_CELLS, 1))


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cuda = ggml.device_handle("CUDA0")
    result = {"command": " ".join(sys.argv), "machine": platform.node(), "cpu": platform.processor(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "llama_cpp_build": llama_cpp_build(), "segment_cells": SEGMENT_CELLS, "prompts": []}
    for prompt in PROMPTS:
        row = {"prompt": prompt}
        for fa in (False, True):
            for name, cells, host in RUNS:
                row[f"{name}-fa{int(fa)}"] = _run(args.model, cuda, fa, cells, host, prompt=prompt)["tokens"]
        row["first_difference"] = {
            "stock fa off / stock fa on": first_difference(row["stock-fa0"], row["stock-fa1"]),
            **{f"{name} / stock, fa {fa}": first_difference(row[f"{name}-fa{int(fa)}"], row[f"stock-fa{int(fa)}"])
               for name in ("device", "host") for fa in (False, True)}}
        print(repr(prompt[:30]), row["first_difference"], file=sys.stderr)
        result["prompts"].append(row)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
