"""Stage 1: what is in a GGUF model. Entry point: `read_inventory(path) -> ModelInventory`.

Reads the file with the `gguf` package's reader (never our own parser), validates every metadata key it uses (type
and range) and every tensor (name, dimensions, data bounds), and classifies every tensor by llama.cpp's naming
scheme (`token_embd`, `blk.N.<role>.<param>`, `output_norm`, `output`). Anything out of place is a ModelFileError
naming the file and the key or tensor, never another exception.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from .errors import ModelFileError, OatoError
from .files import GGUF_MAGIC, describe_mode
from .schema import SCHEMA_VERSION, Hyperparameters, ModelIdentity, ModelInventory, TensorInfo

log = logging.getLogger(__name__)

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

BLOCK_NAME = re.compile(r"^blk\.([0-9]+)\.(.+)$")

# Ranges of the metadata read (inclusive); a value outside is a damaged file, not a model to plan.
MAX_LAYERS = 10_000
MAX_WIDTH = 1 << 20           # embedding length, heads, head size
MAX_FF = 1 << 24
MAX_CTX = (1 << 32) - 1       # llama.cpp keeps n_ctx_train in a uint32
MAX_VOCAB = 1 << 24
MAX_EXPERTS = 1 << 16
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64            # llama.cpp refuses tensor names of this many bytes or more
ARCH_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                       GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})


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
            _, name_data, n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = field.name        # GGUFReader decoded it as UTF-8 (a ValueError otherwise)
            if len(bytes(name_data)) >= GGML_MAX_NAME:
                raise _Damaged(f"tensor name {name[:40]!r}... is {len(bytes(name_data))} bytes long (llama.cpp "
                               f"allows {GGML_MAX_NAME - 1})")
            if not 1 <= int(n_dims[0]) <= GGML_MAX_DIMS or len(dims) != int(n_dims[0]):
                raise _Damaged(f"tensor {name} has {int(n_dims[0])} dimensions (ggml tensors have 1 to "
                               f"{GGML_MAX_DIMS})")
            shape = [int(d) for d in dims]
            if min(shape) < 1:
                raise _Damaged(f"tensor {name} has an empty dimension (shape {shape})")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise _UnknownType(f"tensor {name} has unknown ggml type {int(raw_dtype[0])}") from None
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            if shape[0] % block_size:
                raise _Damaged(f"tensor {name}: row length {shape[0]} is not a multiple of {ggml_type.name}'s "
                               f"block of {block_size}")
            # exact integers: numpy's product of uint64 dims wraps around
            end = start_offs + int(offset_tensor[0]) + math.prod(shape) * type_size // block_size
            if end > file_bytes:
                raise _TruncatedData(f"tensor data is truncated: {name} ends at byte {end} but the file has "
                                     f"{file_bytes} bytes")
        super()._build_tensors(start_offs, fields)


class _UnknownType(Exception):
    pass


class _TruncatedData(Exception):
    pass


class _Damaged(Exception):
    pass


def read_inventory(path: str | Path) -> ModelInventory:
    """Read a GGUF file's metadata and tensor table. Raises ModelFileError with a one-line message."""
    path = Path(path)
    reader = open_gguf(path)
    meta = _Metadata(path, reader.fields)
    if "general.architecture" not in reader.fields:
        raise ModelFileError(f"{path}: no general.architecture in the metadata; this file is not a llama.cpp model")
    arch = meta.string("general.architecture")
    if not ARCH_NAME.match(arch):
        raise meta.bad("general.architecture", f"is {arch[:40]!r}, not an architecture name")
    hparams, warnings = _hyperparameters(meta, reader, arch)
    tensors = []
    for rt in reader.tensors:
        block = BLOCK_NAME.match(rt.name)
        if block and (len(block.group(1)) > 5 or block.group(1) != str(int(block.group(1)))
                      or int(block.group(1)) >= hparams.n_layer):
            raise ModelFileError(f"{path}: tensor {rt.name} is in block {block.group(1)[:20]}, but the model has "
                                 f"{hparams.n_layer} blocks ({arch}.block_count); the file is damaged or not a "
                                 f"model oatoplan supports")
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
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):    # before any read: opening a FIFO would wait for a writer
        raise ModelFileError(f"{path}: is {describe_mode(mode)}; pass a .gguf model file")
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from None
    if len(head) < 8:
        raise ModelFileError(f"{path}: not a GGUF file (only {len(head)} bytes); pass a .gguf model")
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC.decode()}); "
                             f"pass a .gguf model")
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
    except _Damaged as exc:
        raise ModelFileError(f"{path}: {exc}; the file is damaged or not a model oatoplan supports") from None
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as exc:
        raise ModelFileError(f"{path}: truncated or damaged GGUF header ({exc}); copy or download the file "
                             f"again") from None


class _Metadata:
    """Typed access to a GGUF's metadata: each value read is checked for type and range, and any problem is a
    ModelFileError naming the file and the key."""

    def __init__(self, path: Path, fields):
        self.path, self.fields = path, fields

    def bad(self, key: str, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: metadata {key} {problem}; the file is damaged or not a model oatoplan "
                              f"supports")

    def int(self, key: str, low: int, high: int, default: int | None = None) -> int:
        field = self.fields.get(key)
        if field is None:
            if default is None:
                raise self.bad(key, "is missing")
            return default
        if len(field.types) != 1 or field.types[0] not in INT_TYPES:
            raise self.bad(key, f"is {_type_name(field)}, not an integer")
        return self._in_range(key, int(field.parts[-1][0]), low, high)

    def ints(self, key: str, n: int, low: int, high: int, default: int | tuple[int, ...] | None = None
             ) -> tuple[int, ...]:
        """An integer or an array of `n` integers (one per layer), as `n` values."""
        field = self.fields.get(key)
        if field is None:
            if default is None:
                raise self.bad(key, "is missing")
            return default if isinstance(default, tuple) else (default,) * n
        if len(field.types) == 1:
            return (self.int(key, low, high),) * n
        if field.types[0] == GGUFValueType.ARRAY and len(field.types) == 2 and field.types[1] in INT_TYPES:
            values = [int(v) for v in field.contents()]
            if len(values) == n:
                return tuple(self._in_range(f"{key}[{i}]", v, low, high) for i, v in enumerate(values))
        raise self.bad(key, f"is {_type_name(field)}, not an integer or an array of {n} integers (one per layer)")

    def string(self, key: str) -> str:
        field = self.fields[key]
        if field.types != [GGUFValueType.STRING]:
            raise self.bad(key, f"is {_type_name(field)}, not a string")
        try:
            return bytes(field.parts[-1]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(key, "is not valid UTF-8") from None

    def string_count(self, key: str) -> int | None:
        """Length of an array of strings (their text is skipped, see _HeaderReader); None when absent."""
        field = self.fields.get(key)
        if field is None:
            return None
        if field.types[:2] != [GGUFValueType.ARRAY, GGUFValueType.STRING]:
            raise self.bad(key, f"is {_type_name(field)}, not an array of strings")
        return int(field.parts[-1][0])

    def _in_range(self, key: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            raise self.bad(key, f"is {value}, outside {low}..{high}")
        return value


def _type_name(field) -> str:
    types = [t.name.lower() for t in field.types]
    if types[0] == "array":
        n = int(field.parts[4][0]) if len(field.parts) > 4 else 0    # key length, key, type, item type, count
        return f"an array of {n} {types[1] if len(types) > 1 else 'values'}"
    return f"{'an' if types[0].startswith('i') else 'a'} {types[0]}"     # an int32, a uint32, a string


def _hyperparameters(meta: _Metadata, reader: GGUFReader, arch: str) -> tuple[Hyperparameters, list[str]]:
    warnings: list[str] = []

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_layer = meta.int(key("block_count"), 1, MAX_LAYERS)
    n_embd = meta.int(key("embedding_length"), 1, MAX_WIDTH)
    n_ctx_train = meta.int(key("context_length"), 1, MAX_CTX)
    heads = meta.ints(key("attention.head_count"), n_layer, 0, MAX_WIDTH)
    n_head = max(heads)
    if n_head < 1:
        raise meta.bad(key("attention.head_count"), "is 0 on every layer (oatoplan plans attention models)")
    n_head_kv = meta.ints(key("attention.head_count_kv"), n_layer, 0, MAX_WIDTH, heads)
    for layer, (h, h_kv) in enumerate(zip(heads, n_head_kv)):
        if h_kv and (h_kv > h or h % h_kv):
            raise meta.bad(key("attention.head_count_kv"), f"is {h_kv} on layer {layer}, which does not divide "
                                                           f"its head_count {h}")
    head_dim = n_embd // n_head
    head_dim_k = meta.int(key("attention.key_length"), 1, MAX_WIDTH, head_dim or None)
    head_dim_v = meta.int(key("attention.value_length"), 1, MAX_WIDTH, head_dim or None)
    n_ff = max(meta.ints(key("feed_forward_length"), n_layer, 0, MAX_FF, 0))
    n_vocab = meta.string_count("tokenizer.ggml.tokens")
    if n_vocab is None and key("vocab_size") in meta.fields:
        n_vocab = meta.int(key("vocab_size"), 1, MAX_VOCAB)
    if n_vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        n_vocab = int(embd.shape[1]) if embd is not None and len(embd.shape) > 1 else 0
    if n_vocab > MAX_VOCAB:
        raise meta.bad("tokenizer.ggml.tokens", f"has {n_vocab} tokens, more than {MAX_VOCAB}")
    n_swa = meta.int(key("attention.sliding_window"), 0, MAX_CTX, 0)
    swa_layers: tuple[int, ...] = ()
    if n_swa:
        pattern_key = key("attention.sliding_window_pattern")
        pattern = meta.fields.get(pattern_key)
        if pattern is not None and pattern.types[:1] == [GGUFValueType.ARRAY]:
            if pattern.types[1:] != [GGUFValueType.BOOL] and not (len(pattern.types) == 2 and
                                                                  pattern.types[1] in INT_TYPES):
                raise meta.bad(pattern_key, f"is {_type_name(pattern)}, not an integer or an array of booleans")
            flags = pattern.contents()
            if len(flags) != n_layer:
                raise meta.bad(pattern_key, f"has {len(flags)} entries for {n_layer} layers")
            swa_layers = tuple(i for i, is_swa in enumerate(flags) if is_swa)
        else:
            every = (meta.int(pattern_key, 0, MAX_LAYERS) if pattern is not None
                     else DEFAULT_SWA_PATTERN.get(arch))
            if every is not None:
                swa_layers = tuple(i for i in range(n_layer) if every == 0 or i % every < every - 1)
            else:
                warnings.append(f"{arch} has a sliding window of {n_swa} but no layer pattern; KV sizes assume none")
    n_expert = meta.int(key("expert_count"), 0, MAX_EXPERTS, 0)
    n_expert_used = meta.int(key("expert_used_count"), 0, n_expert, 0)
    if n_expert and not n_expert_used:
        raise meta.bad(key("expert_used_count"), f"is 0 or missing with {n_expert} experts")
    hparams = Hyperparameters(
        architecture=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=n_ctx_train,
        n_swa=n_swa, swa_layers=swa_layers, n_expert=n_expert, n_expert_used=n_expert_used)
    return hparams, warnings


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
        flops = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1) * max(hp.n_expert_used, 1)
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


def needs_flash_attn(type_v: str) -> bool:
    """llama.cpp's rule: a quantized V cache needs flash attention."""
    return type_v not in ("f16", "bf16", "f32")


def check_kv_types(inv: ModelInventory, type_k: str, type_v: str,
                   names: tuple[str, str] = ("--cache-type-k", "--cache-type-v")) -> None:
    """Refuse K/V cache types llama.cpp's -ctk / -ctv do not take, or that llama.cpp refuses for this model (a
    quantized type whose blocks do not divide the head size); `names`: what the message calls them."""
    for option, value, head in ((names[0], type_k, inv.hparams.head_dim_k), (names[1], type_v, inv.hparams.head_dim_v)):
        if value not in KV_CACHE_TYPES:
            raise OatoError(f"{option} {value!r} is not a KV cache type of llama.cpp: use one of "
                            f"{', '.join(KV_CACHE_TYPES)}")
        block = GGML_QUANT_SIZES[GGMLQuantizationType[value.upper()]][0]
        if head % block:
            raise OatoError(f"{option} {value}: its blocks of {block} values do not divide {inv.identity.file_name}'s "
                            f"head size {head}, and llama.cpp refuses it; use f16 or bf16")


def _row_bytes(cache_type: str, n_elements: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
    except KeyError:
        raise OatoError(f"KV cache type {cache_type!r} is unknown; use one of {', '.join(KV_CACHE_TYPES)}") from None
    return n_elements // block_size * type_size
