"""How a mixture-of-experts file's router spreads a batch over its experts, read from llama.cpp's own graph: the
expert ids each layer's top-k picks (the `ffn_moe_argsort-N` tensors, through llama.cpp's eval callback) for one
batch of random tokens, against uniform routing's expected count of distinct experts, E * (1 - (1 - k/E)^T).

    python -m benchmarks.moe_routing MODEL.gguf --tokens 512 [--tokens 64 ...] --out R.json

Per layer and batch: distinct experts touched, and the load per touched expert (tokens routed to it): max and mean.
The last block is left out: llama.cpp runs its FFN on the output rows only.
CPU only (n_gpu_layers 0); the routing does not depend on where it runs.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import sys

import numpy as np

import llama_cpp
from oatoplan.inventory import read_inventory
from oatoplan.machine import machine_identity

_SCHED_EVAL = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


def expected_distinct(n_expert: int, n_used: int, n_tokens: int) -> float:
    """Distinct experts that n_tokens tokens touch when each picks n_used of n_expert uniformly at random."""
    return n_expert * (1 - (1 - n_used / n_expert) ** n_tokens)


def routing(model: str, n_tokens: int, seed: int, n_threads: int) -> dict[int, np.ndarray]:
    """layer -> (n_tokens, n_used) expert ids of one batch of random tokens."""
    inv = read_inventory(model)
    n_expert, n_used = inv.hparams.n_expert, inv.hparams.n_expert_used
    g = llama_cpp.llama_cpp
    lib = llama_cpp._ggml.libggml
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    seen: dict[int, np.ndarray] = {}

    def callback(tensor, ask, _):
        name = lib.ggml_get_name(tensor).decode()
        if not name.startswith("ffn_moe_argsort-"):
            return False if ask else True
        if ask:
            return True
        out = np.empty(lib.ggml_nbytes(tensor) // 4, np.int32)
        lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        # argsort of the router probabilities, descending: [n_expert, n_tokens]; the top-k is its first n_used
        seen[int(name.rsplit("-", 1)[1])] = out.reshape(-1, n_expert)[:, :n_used].copy()
        return True

    keep = _SCHED_EVAL(callback)
    mparams = g.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model_ptr = g.llama_model_load_from_file(model.encode(), mparams)
    cparams = g.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(n_tokens, 32)
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.cb_eval = keep
    ctx = g.llama_init_from_model(model_ptr, cparams)
    n_vocab = g.llama_vocab_n_tokens(g.llama_model_get_vocab(model_ptr))
    tokens = np.random.default_rng(seed).integers(0, n_vocab, n_tokens).tolist()
    array = (g.llama_token * n_tokens)(*tokens)
    rc = g.llama_decode(ctx, g.llama_batch_get_one(array, n_tokens))
    g.llama_free(ctx)
    g.llama_model_free(model_ptr)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    return seen


def summarize(ids: np.ndarray, n_expert: int) -> dict:
    load = np.bincount(ids.ravel(), minlength=n_expert)
    touched = load[load > 0]
    return {"distinct": int(len(touched)), "load_max": int(touched.max()), "load_mean": round(float(touched.mean()), 2)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, action="append", help="batch sizes (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    inv = read_inventory(args.model)
    e, k = inv.hparams.n_expert, inv.hparams.n_expert_used
    machine = machine_identity(None)
    result = {"created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
              "command": "python -m benchmarks.moe_routing " + " ".join(argv), "node": platform.node(),
              "cpu": machine.cpu_model, "llama_cpp_build": machine.llama_cpp_build,
              "model": inv.identity.file_name,
              "architecture": inv.hparams.architecture, "n_layer": inv.hparams.n_layer, "n_expert": e, "n_used": k,
              "batches": []}
    for n in args.tokens or [512]:
        # the last block's FFN sees only the output rows (llama.cpp drops the other tokens before it): left out
        routed = routing(args.model, n, args.seed, args.threads)
        per_layer = {il: summarize(ids, e) for il, ids in sorted(routed.items()) if il < inv.hparams.n_layer - 1}
        distinct = [s["distinct"] for s in per_layer.values()]
        batch = {"n_tokens": n, "expected_distinct_uniform": round(expected_distinct(e, k, n), 2),
                 "distinct_mean": round(float(np.mean(distinct)), 2), "distinct_min": int(min(distinct)),
                 "load_max_over_mean": round(float(np.mean([s["load_max"] / s["load_mean"]
                                                           for s in per_layer.values()])), 2),
                 "uniform_load_mean": round(n * k / expected_distinct(e, k, n), 2),
                 "layers": {str(il): s for il, s in per_layer.items()}}
        result["batches"].append(batch)
        print(n, {key: v for key, v in batch.items() if key != "layers"})
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
