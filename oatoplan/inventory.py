"""Stage 1: what is in a GGUF model. Entry point: `read_inventory(path) -> ModelInventory`.

Reads the file with the `gguf` package's reader (never our own parser) and classifies every tensor by llama.cpp's
naming scheme (`token_embd`, `blk.N.<role>.<param>`, `output_norm`, `output`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from .errors import ModelFileError, OatoError
from .schema import SCHEMA_VERSION, Hyperparameters, ModelIdentity, ModelInventory, TensorInfo

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# Roles inside a block `blk.N.<role>.<param>`, by the ggml op that consumes the weight.
MATRIX_ROLES = frozenset({
    "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_gate",
    "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", "attn_k_b", "attn_v_b",   # MLA (deepseek2)
    "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_inp",
    "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp",
})
EXPERT_ROLES = frozenset({"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"})
NORM_ROLES = frozenset({
    "attn_norm", "attn_norm_2", "ffn_norm", "attn_q_norm", "attn_k_norm", "attn_post_norm", "ffn_post_norm",
    "post_attention_norm", "post_ffw_norm", "layer_output_norm", "attn_q_a_norm", "attn_kv_a_norm",
})
OTHER_BLOCK_ROLES = {"ffn_exp_probs_b": "ADD", "attn_sinks": "SOFT_MAX"}
# Tensors outside blocks: (group, op)
GLOBAL_ROLES = {
    "token_embd": ("input", "GET_ROWS"),
    "token_embd_norm": ("input", "MUL"),
    "rope_freqs": ("input", "ROPE"),
    "output_norm": ("output", "MUL"),
    "output": ("output", "MUL_MAT"),
}
# Sliding-window layer pattern when the file gives none (llama.cpp hard-codes it per architecture):
# with pattern n, layer il uses the window unless il % n == n - 1.
DEFAULT_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}

BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


class _HeaderReader(GGUFReader):
    """GGUFReader with two changes, both for the sake of clear errors and speed:
    - metadata arrays are read in one step instead of one numpy view per element (GGUFReader: 17.6 s over Gemma
      3's 262k-token vocabulary, see benchmarks/inventory_speed.py); an array of strings keeps only its type and
      length, since we never read tokens;
    - tensor types and data bounds are checked before the tensors are built, so that a damaged file gets a
      message naming the tensor rather than a numpy reshape error."""

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        if len(raw_itype) != 1 or len(alen) != 1:
            raise ValueError("metadata array runs past the end of the file")
        count, offs = int(alen[0]), orig_offs + 12
        types = [GGUFValueType.ARRAY, GGUFValueType(int(raw_itype[0]))]
        nptype = self.gguf_scalar_to_np.get(types[1])
        if nptype is not None:
            # numbers: one view of the whole array (GGUFReader makes one view per element)
            values = self._get(offs, nptype, count)
            if len(values) != count:
                raise ValueError("metadata array runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
        if types[1] != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        # strings: step over them, keep only the length
        buf = memoryview(self.data)
        for _ in range(count):
            if offs + 8 > len(buf):
                raise ValueError("string array runs past the end of the file")
            offs += 8 + int.from_bytes(buf[offs:offs + 8], "little")
        if offs > len(buf):
            raise ValueError("string array runs past the end of the file")
        return offs - orig_offs, [raw_itype, alen], [], types

    def _build_tensors(self, start_offs, fields):
        file_bytes = len(self.data)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise _UnknownType(f"tensor {name} has unknown ggml type {int(raw_dtype[0])}") from None
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            end = start_offs + int(offset_tensor[0]) + int(np.prod(dims)) * type_size // block_size
            if end > file_bytes:
                raise _TruncatedData(f"tensor data is truncated: {name} ends at byte {end} but the file has "
                                     f"{file_bytes} bytes")
        super()._build_tensors(start_offs, fields)


class _UnknownType(Exception):
    pass


class _TruncatedData(Exception):
    pass


def read_inventory(path: str | Path) -> ModelInventory:
    """Read a GGUF file's metadata and tensor table. Raises ModelFileError with a one-line message."""
    path = Path(path)
    reader = open_gguf(path)
    fields = reader.fields
    arch = _field_value(fields, "general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: no general.architecture in the metadata; this file is not a llama.cpp model")
    hparams, warnings = _hyperparameters(reader, arch)
    tensors = []
    for rt in reader.tensors:
        info = _classify(rt.name, rt.tensor_type.name, tuple(int(x) for x in rt.shape), int(rt.n_bytes), hparams)
        if info.role == "other":
            warnings.append(f"tensor {rt.name} is not a known llama.cpp tensor; listed as 'other'")
        tensors.append(info)
    names = {t.name for t in tensors}
    for w in warnings:
        log.warning("%s: %s", path.name, w)
    table = hashlib.sha256()
    for rt in reader.tensors:
        table.update(f"{rt.name}\t{rt.tensor_type.name}\t{list(map(int, rt.shape))}\t{rt.data_offset}\n".encode())
    identity = ModelIdentity(file_name=path.name, file_bytes=path.stat().st_size,
                             tensor_table_sha256=table.hexdigest())
    return ModelInventory(
        schema_version=SCHEMA_VERSION, path=str(path), identity=identity, hparams=hparams, tensors=tuple(tensors),
        tied_output="output.weight" not in names and "token_embd.weight" in names,
        data_offset=int(reader.data_offset), warnings=tuple(warnings))


def open_gguf(path: str | Path) -> GGUFReader:
    """A GGUFReader over `path` (fast on large vocabularies); raises ModelFileError with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: file not found")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; pass a .gguf model file")
    with path.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); pass a .gguf model")
    version = int.from_bytes(head[4:8], "little")
    if version not in READER_SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (supported: "
                             f"{', '.join(map(str, READER_SUPPORTED_VERSIONS))}); convert the model with a current "
                             f"llama.cpp")
    try:
        return _HeaderReader(path)
    except _UnknownType as exc:
        raise ModelFileError(f"{path}: {exc}; this model needs a newer gguf package (pip install -U gguf) or "
                             f"another quantization") from None
    except _TruncatedData as exc:
        raise ModelFileError(f"{path}: {exc}; the file is incomplete, copy or download it again") from None
    except (ValueError, IndexError, KeyError, OverflowError) as exc:
        raise ModelFileError(f"{path}: truncated or damaged GGUF header ({exc}); copy or download the file "
                             f"again") from None


def _field_value(fields, key: str, default=None):
    field = fields.get(key)
    if field is None:
        return default
    if field.types[:2] == [GGUFValueType.ARRAY, GGUFValueType.STRING]:
        return int(field.parts[-1][0])  # string arrays keep only their length (see _HeaderReader)
    return field.contents()


def _hyperparameters(reader: GGUFReader, arch: str) -> tuple[Hyperparameters, list[str]]:
    fields = reader.fields
    warnings: list[str] = []

    def key(name: str, default=None):
        return _field_value(fields, f"{arch}.{name}", default)

    n_layer = int(key("block_count", 0))
    n_embd = int(key("embedding_length", 0))
    n_head = _per_layer_max(key("attention.head_count", 0))
    head_count_kv = key("attention.head_count_kv", n_head)
    n_head_kv = (tuple(int(x) for x in head_count_kv) if isinstance(head_count_kv, list)
                 else (int(head_count_kv),) * n_layer)
    head_dim = n_embd // n_head if n_head else 0
    n_vocab = _field_value(fields, "tokenizer.ggml.tokens")
    if n_vocab is None:
        n_vocab = key("vocab_size")
    if n_vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        n_vocab = int(embd.shape[1]) if embd is not None else 0
    n_swa = int(key("attention.sliding_window", 0) or 0)
    swa_layers: tuple[int, ...] = ()
    if n_swa:
        pattern = key("attention.sliding_window_pattern", DEFAULT_SWA_PATTERN.get(arch))
        if isinstance(pattern, list):
            swa_layers = tuple(i for i, is_swa in enumerate(pattern) if is_swa)
        elif pattern is not None:
            pattern = int(pattern)
            swa_layers = tuple(i for i in range(n_layer) if pattern == 0 or i % pattern < pattern - 1)
        else:
            warnings.append(f"{arch} has a sliding window of {n_swa} but no layer pattern; KV sizes assume none")
    hparams = Hyperparameters(
        architecture=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=int(key("attention.key_length", head_dim)), head_dim_v=int(key("attention.value_length", head_dim)),
        n_ff=_per_layer_max(key("feed_forward_length", 0)), n_vocab=int(n_vocab),
        n_ctx_train=int(key("context_length", 0)), n_swa=n_swa, swa_layers=swa_layers,
        n_expert=int(key("expert_count", 0)), n_expert_used=int(key("expert_used_count", 0)))
    return hparams, warnings


def _per_layer_max(value) -> int:
    return int(max(value)) if isinstance(value, list) else int(value)


def _classify(name: str, ggml_type: str, shape: tuple[int, ...], n_bytes: int, hp: Hyperparameters) -> TensorInfo:
    match = BLOCK_NAME.match(name)
    layer = int(match.group(1)) if match else None
    rest = match.group(2) if match else name
    role, _, param = rest.partition(".")
    n_elements = int(np.prod(shape))
    if layer is None:
        group, op = GLOBAL_ROLES.get(role, ("other", "NONE"))
        if group == "other":
            role = "other"
    else:
        group = "layer"
        if role in MATRIX_ROLES:
            op = "MUL_MAT"
        elif role in EXPERT_ROLES:
            op = "MUL_MAT_ID"
        elif role in NORM_ROLES:
            op = "MUL"
        elif role in OTHER_BLOCK_ROLES:
            op = OTHER_BLOCK_ROLES[role]
        else:
            role, op = "other", "NONE"
    if param == "bias":
        op = "ADD"
    if op == "MUL_MAT":
        flops = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
    elif op == "MUL_MAT_ID":
        flops = 2 * shape[0] * shape[1] * max(hp.n_expert_used, 1)
    elif op == "MUL" and role in ("attn_q_norm", "attn_k_norm") and shape[0] == hp.head_dim_k:
        # one norm weight of head_dim applied to every head
        flops = n_elements * (hp.n_head if role == "attn_q_norm" else hp.n_head_kv[layer or 0])
    elif op in ("MUL", "ADD"):
        flops = n_elements
    else:
        flops = 0
    return TensorInfo(name=name, layer=layer, group=group, role=role, param=param, ggml_type=ggml_type,
                      shape=shape, n_bytes=n_bytes, op=op, flops_per_token=flops)


# ---------------------------------------------------------------------------------------------------------------
# KV cache

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


def kv_bytes_per_token(hp: Hyperparameters, layer: int, type_k: str = "f16", type_v: str | None = None) -> int:
    """Bytes of K and V one token adds to `layer`'s cache: n_head_kv x (head_dim_k rows of type_k + head_dim_v
    rows of type_v). Quantized cache types store blocks of 32 values (q8_0: 34 bytes per 32)."""
    type_v = type_v or type_k
    n_kv = hp.n_head_kv[layer]
    return _row_bytes(type_k, n_kv * hp.head_dim_k) + _row_bytes(type_v, n_kv * hp.head_dim_v)


def kv_cells(hp: Hyperparameters, layer: int, n_ctx: int, n_ubatch: int, swa_full: bool = True) -> int:
    """Cells llama.cpp allocates for `layer`'s cache (one sequence): n_ctx rounded up to a multiple of 256, or for a
    sliding-window layer with swa_full off (iSWA cache) min(n_ctx, n_swa + n_ubatch) rounded up to 256."""
    n_ctx = _pad(n_ctx, 256)
    if layer in hp.swa_layers and hp.n_swa and not swa_full:
        return _pad(min(n_ctx, hp.n_swa + n_ubatch), 256)
    return n_ctx


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_bytes(cache_type: str, n_elements: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
    except KeyError:
        raise OatoError(f"KV cache type {cache_type!r} is unknown; use one of {', '.join(KV_CACHE_TYPES)}") from None
    return n_elements // block_size * type_size
