"""Several completions of one prompt: KV memory of llama.cpp's per-sequence caches, its unified cache, and oatoplan's
segment KV cache over the unified one (the prompt's cells stored once in segment 0, every sequence's tokens in
segment 1), measured on a real model (CPU); and for the Qwen2-7B shape, how many parallel sequences fit a KV budget
by the memory model. Writes one JSON file.

    python -m benchmarks.segment_kv_shared MODEL QWEN_GGUF --prompt 8192 --gen 128 --seqs 4 --out FILE

The prompt (random ids) is decoded once as sequence 0 and llama_memory_seq_cp'd to the others; sequence s starts
with the prompt's s-th most likely next token, then all of them decode greedily, one token each per llama_decode.
n_ctx is what a user sets for that: seqs * (prompt + gen). Bytes are the context memory's buffers after the last
decode (oatoplan.ggml.memory_bytes), next to memory.parallel_kv_cells / shared_segment_kv_cells' prediction.

    python -m benchmarks.segment_kv_shared QWEN2_7B_GGUF --fit --gpu --out FILE

--fit: how many completions of one --prompt-token prompt (--gen tokens each) fit the KV budget (--budget), measured:
for each cache, the memory model's count n is run, and n + 1 where the count is under LLAMA_MAX_SEQ, and the KV bytes of
each run are recorded against the budget. --gpu: every layer (and so the KV cache) on the first GPU.
swa_full (llama-cpp-python's default): with a window-sized SWA cache (Gemma 3), the unified cache cannot give the
sequences their own cells once the prompt's SWA cells carry every sequence's id (stock llama.cpp reuses an SWA cell
only when one sequence holds it): "failed to find a memory slot", segmented or not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

from oatoplan import ggml
from oatoplan.inventory import kv_bytes_per_token, read_inventory
from oatoplan.machine import gpu_devices, llama_cpp_build
from oatoplan.memory import parallel_kv_cells, shared_segment_kv_cells
from oatoplan.schema import Hyperparameters
from oatoplan.testing import qwen2_7b_header, write_sparse
from oatoplan.units import parse_size_bytes

N_UBATCH = 512
LLAMA_MAX_SEQ = 256     # llama.cpp's cap on n_seq_max (src/llama-cparams.h)


def completions(model: str, prompt: list[int], n_seq: int, n_tokens: int, *, flash_attn: bool, unified: bool,
                segment_cells: int | None, n_ctx: int, firsts: list[int] | None = None, n_threads: int = 2,
                swa_full: bool = True, ctx_check=None, n_gpu_layers: int = 0) -> tuple[list[list[int]], list[list[float]], int]:
    """n_seq completions of `prompt`, n_tokens each: sequence s starts with firsts[s] (default: the prompt's s-th
    most likely next token), then greedy. Returns the tokens, each step's top-2 logit gap per sequence (the step that
    chose token i+1 is gap i), and the context memory's bytes after the last decode. ctx_check(ctx), if given, runs
    on the context before it is freed."""
    with ggml.environment(OATO_SEGMENT_KV=segment_cells or None):
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers    # 0: the CPU, even where a GPU or an RPC server is registered
        lmodel = llama_cpp.llama_model_load_from_file(model.encode(), mparams)
        if not lmodel:
            raise RuntimeError(f"llama.cpp could not load {model}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_threads, cparams.n_threads_batch = n_ctx, n_threads, n_threads
        cparams.n_batch = cparams.n_ubatch = N_UBATCH
        cparams.n_seq_max, cparams.kv_unified = n_seq, unified
        cparams.flash_attn_type, cparams.swa_full = (1 if flash_attn else 0), swa_full
        ctx = llama_cpp.llama_init_from_model(lmodel, cparams)
    if not ctx:
        llama_cpp.llama_model_free(lmodel)
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for {n_seq} sequences")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(lmodel))
    batch = llama_cpp.llama_batch_init(max(n_seq, N_UBATCH), 0, n_seq)
    try:
        for start in range(0, len(prompt), N_UBATCH):
            part = prompt[start:start + N_UBATCH]
            array = (llama_cpp.llama_token * len(part))(*part)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(part))) != 0:
                raise RuntimeError(f"llama_decode of the prompt failed at token {start}")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        tokens = [[f] for f in (firsts or [int(t) for t in np.argsort(-logits, kind="stable")[:n_seq]])]
        gaps: list[list[float]] = [[] for _ in range(n_seq)]
        for s in range(1, n_seq):
            llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(ctx), 0, s, -1, -1)
        for step in range(n_tokens - 1):
            batch.n_tokens = n_seq
            for s in range(n_seq):
                batch.token[s], batch.pos[s] = tokens[s][-1], len(prompt) + step
                batch.n_seq_id[s], batch.seq_id[s][0], batch.logits[s] = 1, s, 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode of {n_seq} sequences failed at step {step} (see llama.cpp's log)")
            for s in range(n_seq):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, s), shape=(n_vocab,))
                top2 = np.partition(logits, -2)[-2:]
                tokens[s].append(int(np.argmax(logits)))
                gaps[s].append(float(abs(top2[1] - top2[0])))
        n_bytes = ggml.memory_bytes(ctx)
        if ctx_check is not None:
            ctx_check(ctx)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(lmodel)
    return tokens, gaps, n_bytes


def predicted_bytes(hp: Hyperparameters, n_ctx: int, n_seq: int, unified: bool, segment_cells: int | None,
                    n_decoded: int, swa_full: bool = True, layers: list[int] | None = None) -> int:
    """KV bytes (f16) the memory model predicts for the three caches above (of `layers`, default all)."""
    def cells(il: int) -> int:
        if segment_cells:
            return shared_segment_kv_cells(hp, il, n_ctx, N_UBATCH, n_seq, segment_cells, n_decoded,
                                           swa_full=swa_full)
        return parallel_kv_cells(hp, il, n_ctx, N_UBATCH, n_seq, unified, swa_full)
    return sum(cells(il) * kv_bytes_per_token(hp, il, "f16", "f16") for il in (layers or range(hp.n_layer)))


def sequences_that_fit(hp: Hyperparameters, budget_bytes: int, n_prompt: int, n_gen: int, mode: str,
                       max_seq: int = LLAMA_MAX_SEQ) -> int:
    """Most parallel completions of one n_prompt-token prompt, n_gen tokens each, whose KV fits budget_bytes, up to
    max_seq (llama.cpp's LLAMA_MAX_SEQ). n_ctx = n * (n_prompt + n_gen), as a user sets it, except "unified-sized": the
    unified stock cache with n_ctx = n_prompt + n * n_gen, sized by hand to the shared prompt."""
    def kv_bytes(n: int) -> int:
        if mode == "per-sequence":
            return predicted_bytes(hp, n * (n_prompt + n_gen), n, False, None, n_gen)
        if mode == "unified-sized":
            return predicted_bytes(hp, n_prompt + n * n_gen, n, True, None, n_gen)
        return predicted_bytes(hp, n * (n_prompt + n_gen), n, True, n_prompt, n_gen)
    return max((n for n in range(1, max_seq + 1) if kv_bytes(n) <= budget_bytes), default=0)


def fit_runs(model: str, hp: Hyperparameters, budget_bytes: int, n_prompt: int, n_gen: int, n_threads: int,
             n_gpu_layers: int) -> dict:
    """--fit: each cache at the memory model's count of sequences that fit budget_bytes and (under LLAMA_MAX_SEQ) one
    more, measured: KV bytes after every sequence decoded n_gen tokens, and whether they fit."""
    prompt = np.random.default_rng(0).integers(0, hp.n_vocab or 32000, n_prompt).tolist()
    out = {}
    for mode, unified, seg in (("per-sequence", False, None), ("unified-sized", True, None),
                               ("unified-segmented", True, n_prompt)):
        n_fit = sequences_that_fit(hp, budget_bytes, n_prompt, n_gen, mode)
        for n in [n for n in (n_fit, n_fit + 1) if 0 < n <= LLAMA_MAX_SEQ]:     # none fit: run one, over it
            n_ctx = n_prompt + n * n_gen if mode == "unified-sized" else n * (n_prompt + n_gen)
            logging.info("%s: %d sequences, n_ctx %d", mode, n, n_ctx)
            run = {"n_seq": n, "n_ctx": n_ctx, "predicted_kv_bytes": predicted_bytes(hp, n_ctx, n, unified, seg, n_gen)}
            try:
                tokens, _, n_bytes = completions(model, prompt, n, n_gen + 1, flash_attn=True, unified=unified,
                                                 segment_cells=seg, n_ctx=n_ctx, n_threads=n_threads,
                                                 n_gpu_layers=n_gpu_layers)
                run.update({"kv_bytes": n_bytes, "fits_budget": n_bytes <= budget_bytes,
                            "tokens_per_seq": sorted({len(t) for t in tokens})})
            except RuntimeError as e:     # recorded: e.g. a unified cache of a sliding-window model, see above
                run["error"] = str(e)
            out.setdefault(mode, []).append(run)
            print(mode, out[mode][-1], file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the model measured (e.g. Gemma 3 270M)")
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens (random ids)")
    ap.add_argument("--gen", type=int, default=128, help="tokens per completion")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--budget", default="2.5GiB", help="KV budget for the Qwen2-7B count")
    ap.add_argument("--fit", action="store_true", help="measure the sequences that fit --budget (a Qwen2-7B-shaped "
                    "MODEL: the issue's case)")
    ap.add_argument("--gpu", action="store_true", help="every layer and the KV cache on the first GPU")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    hp = read_inventory(args.model).hparams
    budget = parse_size_bytes(args.budget)
    record = {
        "schema_version": 1,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.segment_kv_shared " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "n_cpu_threads": os.cpu_count(),
                    "llama_cpp_build": llama_cpp_build(), "gpu": [d.description for d in gpu_devices()]},
        "model": Path(args.model).name, "flash_attn": True, "type_k": "f16", "type_v": "f16", "swa_full": True,
    }
    if args.fit:
        record.update({"n_prompt": args.prompt, "n_gen": args.gen, "kv_budget_bytes": budget,
                       "llama_max_seq": LLAMA_MAX_SEQ, "n_gpu_layers": 99 if args.gpu else 0,
                       "fit": fit_runs(args.model, hp, budget, args.prompt, args.gen, args.threads,
                                       99 if args.gpu else 0)})
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        return 0

    prompt = np.random.default_rng(0).integers(0, 200_000, args.prompt).tolist()
    n_ctx = args.seqs * (args.prompt + args.gen)
    runs = {}
    for name, unified, seg in (("per-sequence", False, None), ("unified", True, None),
                               ("unified-segmented", True, args.prompt)):
        _, _, n_bytes = completions(args.model, prompt, args.seqs, args.gen + 1, flash_attn=True, unified=unified,
                                    segment_cells=seg, n_ctx=n_ctx, n_threads=args.threads, swa_full=True,
                                    n_gpu_layers=99 if args.gpu else 0)
        global_layers = [il for il in range(hp.n_layer) if il not in hp.swa_layers or not hp.n_swa]
        runs[name] = {"kv_unified": unified, "segment_cells": seg, "kv_bytes": n_bytes,
                      "predicted_kv_bytes": predicted_bytes(hp, n_ctx, args.seqs, unified, seg, args.gen, True),
                      "predicted_global_layers_kv_bytes": predicted_bytes(hp, n_ctx, args.seqs, unified, seg,
                                                                          args.gen, True, global_layers)}
        print(name, runs[name], file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        qwen = read_inventory(write_sparse(qwen2_7b_header(), Path(tmp) / "qwen2-7b.gguf")).hparams
    fit = {mode: sequences_that_fit(qwen, budget, 8192, 128, mode)
           for mode in ("per-sequence", "unified-sized", "unified-segmented")}
    uncapped = {mode: sequences_that_fit(qwen, budget, 8192, 128, mode, 4096)
                for mode in ("unified-sized", "unified-segmented")}
    record.update({
        "n_prompt": args.prompt, "n_gen": args.gen, "n_seq": args.seqs, "n_ctx": n_ctx, "global_layers": global_layers,
        "runs": runs,
        "qwen2_7b_sequences_that_fit": {"kv_budget_bytes": budget, "n_prompt": 8192, "n_gen": 128,
                                        "llama_max_seq": LLAMA_MAX_SEQ, **fit,
                                        "without_llama_max_seq": uncapped},
    })
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
