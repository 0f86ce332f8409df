"""KV memory a context holds after a short chat when the user asks for a long n_ctx: llama.cpp's cache (reserved for
n_ctx up front) against oatoplan's segment KV cache (OATO_SEGMENT_KV=P, the prompt's cells, and the response
segment growing in chunks of OATO_SEGMENT_KV_CHUNK cells). CPU. Writes one JSON file.

    python -m benchmarks.segment_kv_memory MODEL --ctx 32768 --prompt 768 --gen 256 --out FILE

Bytes are the context memory's buffers after the chat (oatoplan.ggml.memory_bytes). A model with sliding-window
layers (Gemma 3) keeps their cache unsegmented and sized by the window, not n_ctx: two stock runs at n_ctx and
n_ctx / 2 split the stock bytes into a part proportional to n_ctx (the global layers) and a fixed part (the SWA
cache), so the global layers' share is reported on its own too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import llama_cpp
import numpy as np

from oatoplan import ggml
from oatoplan.machine import llama_cpp_build
from oatoplan.measure import decode


def chat_bytes(model: str, n_ctx: int, prompt: list[int], n_gen: int, segment_cells: int | None,
               chunk_cells: int, swa_full: bool) -> int:
    """KV bytes held after `prompt` (one batch per 512 tokens) and `n_gen` greedy tokens."""
    env = {"OATO_SEGMENT_KV": str(segment_cells), "OATO_SEGMENT_KV_CHUNK": str(chunk_cells)} if segment_cells else {}
    old = {k: os.environ.pop(k, None) for k in ("OATO_SEGMENT_KV", "OATO_SEGMENT_KV_CHUNK")}
    os.environ.update(env)
    try:
        llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=os.cpu_count(),
                              flash_attn=True, swa_full=swa_full, verbose=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    for start in range(0, len(prompt), 512):
        decode(llm, prompt[start:start + 512])
    for _ in range(n_gen):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        decode(llm, [int(np.argmax(logits))])
    n_bytes = ggml.memory_bytes(llm._ctx.ctx)
    llm.close()
    if n_bytes is None:
        raise SystemExit("this llama.cpp build has no oato_memory_bytes (patches/0007): run `oatoplan build --cpu`")
    return n_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=768, help="prompt tokens (random ids)")
    ap.add_argument("--gen", type=int, default=256, help="greedy tokens after the prompt")
    ap.add_argument("--chunk", type=int, default=256, help="cells the response segment grows by")
    ap.add_argument("--swa-full", action="store_true", help="full-size SWA cache (llama-cpp-python's default; "
                    "llama.cpp's is a window-sized one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    prompt = np.random.default_rng(0).integers(0, 200_000, args.prompt).tolist()
    stock = chat_bytes(args.model, args.ctx, prompt, args.gen, None, 0, args.swa_full)
    stock_half = chat_bytes(args.model, args.ctx // 2, prompt, args.gen, None, 0, args.swa_full)
    segmented = chat_bytes(args.model, args.ctx, prompt, args.gen, args.prompt, args.chunk, args.swa_full)
    per_cell = (stock - stock_half) / (args.ctx - args.ctx // 2)     # global layers' bytes per cell
    fixed = stock - per_cell * args.ctx                                # the SWA cache (0 without SWA layers)
    record = {
        "schema_version": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "n_cpu_threads": os.cpu_count(),
                    "llama_cpp_build": llama_cpp_build()},
        "model": Path(args.model).name,
        "n_ctx": args.ctx, "n_prompt": args.prompt, "n_gen": args.gen, "chunk_cells": args.chunk,
        "segment_cells": args.prompt, "flash_attn": True, "type_k": "f16", "type_v": "f16", "swa_full": args.swa_full,
        "stock_kv_bytes": stock, "stock_kv_bytes_half_ctx": stock_half, "segmented_kv_bytes": segmented,
        "fixed_kv_bytes": round(fixed), "per_cell_kv_bytes": per_cell,
        "segmented_over_stock": segmented / stock,
        "global_layers_segmented_over_stock": (segmented - fixed) / (stock - fixed),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
