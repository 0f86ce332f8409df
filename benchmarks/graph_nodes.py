"""The nodes of one decode step's graph in the order llama.cpp's scheduler runs them (op and tensor name), all on the
CPU, through the scheduler's eval callback. Shows which node chains are adjacent and so fusable by
ggml_cpu_try_fuse_ops() (it only fuses consecutive nodes), e.g. ROPE -> VIEW -> SET_ROWS of the K cache (issue #8).

    python -m benchmarks.graph_nodes MODEL [--nodes 40] [--out nodes.json]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import sys


def decode_graph_nodes(model_path: str, n_threads: int = 2) -> list[tuple[str, str]]:
    """(op, tensor name) of every node of the graph that decodes one token after a 3-token prompt."""
    import llama_cpp
    from oatoplan import ggml
    g = ggml.lib()
    g.ggml_op_desc.restype, g.ggml_op_desc.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    seen: list[tuple[str, str]] = []

    @llama_cpp.ggml_backend_sched_eval_callback
    def on_node(tensor, ask, user_data):
        if ask:
            seen.append((g.ggml_op_desc(tensor).decode(), g.ggml_get_name(tensor).decode()))
        return True

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), model_params)
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx, ctx_params.n_threads, ctx_params.n_threads_batch = 64, n_threads, n_threads
    ctx_params.cb_eval = on_node
    ctx_params.flash_attn_type = 1   # on, as oatoplan's plans run
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    try:
        for tokens in ([2, 100, 200], [300]):
            seen.clear()
            array = (llama_cpp.llama_token * len(tokens))(*tokens)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) != 0:
                raise RuntimeError(f"llama_decode failed on {model_path}")
        return list(seen)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--nodes", type=int, default=40, help="print the first N nodes")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    nodes = decode_graph_nodes(args.model)
    for i, (op, name) in enumerate(nodes[:args.nodes]):
        print(i, op, name)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
                       "command": "python -m benchmarks.graph_nodes " + " ".join(argv),
                       "model": os.path.basename(args.model), "n_nodes": len(nodes),
                       "nodes": [list(n) for n in nodes[:args.nodes]]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
