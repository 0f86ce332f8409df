"""Inventory numbers against independently known facts, and every kind of bad input."""

import json
import os
import struct
import time

import pytest
from gguf import GGUFValueType

from conftest import gguf_parts, write_gguf
from oatoplan.errors import ModelFileError
from oatoplan.inventory import kv_bytes_per_token, kv_cells, read_inventory


def test_tiny_model_classification(tiny_model):
    inv = read_inventory(tiny_model)
    hp = inv.hparams
    assert (hp.architecture, hp.n_layer, hp.n_embd, hp.n_head, hp.n_ff) == ("llama", 4, 64, 4, 128)
    assert hp.n_head_kv == (2, 2, 2, 2) and hp.head_dim_k == 16
    assert not inv.tied_output and inv.warnings == ()
    q = inv.tensor("blk.2.attn_q.weight")
    assert (q.layer, q.group, q.role, q.param, q.op, q.ggml_type) == (2, "layer", "attn_q", "weight", "MUL_MAT", "F16")
    assert q.shape == (64, 64) and q.n_bytes == 64 * 64 * 2 and q.flops_per_token == 2 * 64 * 64
    embd = inv.tensor("token_embd.weight")
    assert (embd.group, embd.op, embd.flops_per_token) == ("input", "GET_ROWS", 0)
    assert inv.tensor("output_norm.weight").group == "output"
    assert inv.tensor("blk.0.ffn_norm.weight").op == "MUL"
    # data section = file size - data offset, up to the final tensor's alignment padding
    assert 0 <= inv.identity.file_bytes - inv.data_offset - inv.total_bytes < 32 * len(inv.tensors)


def test_tied_output_is_reported(tiny_tied_model):
    inv = read_inventory(tiny_tied_model)
    assert inv.tied_output
    assert inv.output_matrix().name == "token_embd.weight"


def test_unknown_tensor_is_listed_as_other(tmp_path):
    from gguf import GGUFWriter
    import numpy as np
    writer = GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("blk.0.mystery.weight", np.zeros(32, np.float32))
    writer.add_tensor("something_else", np.zeros(32, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    inv = read_inventory(tmp_path / "odd.gguf")
    assert [t.role for t in inv.tensors] == ["other", "other"]
    assert len(inv.warnings) == 2 and "blk.0.mystery.weight" in inv.warnings[0]


def test_gemma_bytes_fill_the_data_section(gemma_model):
    inv = read_inventory(gemma_model)
    # Gemma's tensors are packed: data offset + every tensor's bytes is exactly the file size
    assert inv.data_offset + inv.total_bytes == gemma_model.stat().st_size
    hp = inv.hparams
    assert (hp.architecture, hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv[0], hp.head_dim_k) == (
        "gemma3", 18, 640, 4, 1, 256)
    assert hp.n_vocab == 262144 and hp.n_swa == 512
    # llama.cpp's gemma3 pattern 6: every sixth layer (5, 11, 17) is global
    assert set(range(18)) - set(hp.swa_layers) == {5, 11, 17}
    assert inv.tied_output and "output.weight" not in {t.name for t in inv.tensors}
    assert {t.role for t in inv.tensors} >= {"post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"}
    assert "other" not in {t.role for t in inv.tensors}


def test_gemma_inventory_is_fast(gemma_model, cli):
    start = time.perf_counter()
    result = cli(["inspect", gemma_model])
    assert result.exit_code == 0
    assert time.perf_counter() - start < 2.0


def test_qwen2_7b_header_facts(qwen_header_model):
    inv = read_inventory(qwen_header_model)
    assert len(inv.tensors) == 339
    assert inv.total_bytes == 4_677_120_000
    assert inv.hparams.n_layer == 28 and inv.hparams.architecture == "qwen2"
    q6k_down = sorted(t.layer for t in inv.tensors if t.role == "ffn_down" and t.ggml_type == "Q6_K")
    assert q6k_down == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    assert {t.role for t in inv.tensors if t.param == "bias"} == {"attn_q", "attn_k", "attn_v"}
    assert all(t.op == "ADD" for t in inv.tensors if t.param == "bias")
    # token_embd (292 MiB) plus the rest (4,168 MiB), as in baselines.md
    assert inv.tensor("token_embd.weight").n_bytes // 2**20 == 292


def test_kv_bytes_per_token():
    from oatoplan.schema import Hyperparameters
    hp = Hyperparameters("qwen2", 28, 3584, 28, (4,) * 28, 128, 128, 18944, 152064, 32768, 0, (), 0, 0)
    assert kv_bytes_per_token(hp, 0, "f16") == 4 * 128 * 2 * 2            # 2 KiB
    assert kv_bytes_per_token(hp, 0, "q8_0") == 2 * (4 * 128 // 32 * 34)   # 34 bytes per 32 values
    assert kv_bytes_per_token(hp, 0, "q4_0") == 2 * (4 * 128 // 32 * 18)
    assert kv_bytes_per_token(hp, 0, "q8_0", "f16") == 4 * 128 // 32 * 34 + 4 * 128 * 2
    assert kv_cells(hp, 0, 1000, 512) == 1024                              # n_ctx padded to 256


def test_kv_cells_sliding_window(gemma_model):
    hp = read_inventory(gemma_model).hparams
    assert kv_cells(hp, 0, 8192, 512, swa_full=False) == 1024   # min(8192, 512 + 512) padded to 256
    assert kv_cells(hp, 5, 8192, 512, swa_full=False) == 8192   # global layer
    assert kv_cells(hp, 0, 600, 512, swa_full=False) == 768     # min(768, 1024)
    assert kv_cells(hp, 0, 8192, 512) == 8192                   # llama.cpp's default: full-size SWA cache


# --- bad input: one clear line naming the file -------------------------------------------------------------------

def _tensor_type_offset(data: bytes, name: bytes) -> int:
    """Offset of the ggml type field of tensor `name` in a GGUF header."""
    pos = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims


@pytest.mark.parametrize("case, expected", [
    ("missing", "file not found"),
    ("directory", "is a directory"),
    ("empty", "not a GGUF file"),
    ("bad_magic", "not a GGUF file"),
    ("version", "GGUF version 99 is not supported"),
    ("truncated_header", "truncated or damaged GGUF header"),
    ("truncated_data", "tensor data is truncated: output.weight"),
    ("unknown_type", "tensor token_embd.weight has unknown ggml type 200"),
])
def test_bad_model_files(tmp_path, tiny_model, cli, case, expected):
    good = tiny_model.read_bytes()
    path = tmp_path / "model.gguf"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "bad_magic":
        path.write_bytes(b"GGML" + good[4:])
    elif case == "version":
        path.write_bytes(good[:4] + struct.pack("<I", 99) + good[8:])
    elif case == "truncated_header":
        path.write_bytes(good[:2000])
    elif case == "truncated_data":
        path.write_bytes(good[:-1000])
    elif case == "unknown_type":
        data = bytearray(good)
        struct.pack_into("<I", data, _tensor_type_offset(good, b"token_embd.weight"), 200)
        path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as err:
        read_inventory(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    result = cli(["inspect", path])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oatoplan: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path, cli):
    with pytest.raises(ModelFileError):
        cli(["--debug", "inspect", tmp_path / "nope.gguf"])


def test_inspect_json_round_trips(tiny_model, cli):
    from oatoplan.artifacts import from_jsonable
    from oatoplan.schema import ModelInventory
    result = cli(["inspect", "--json", tiny_model])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert from_jsonable(ModelInventory, data, "stdout") == read_inventory(tiny_model)


# --- metadata and tensors of the wrong type or out of range (issue 16, item 2): one line naming file and key -----

U32, STR, ARR = GGUFValueType.UINT32, GGUFValueType.STRING, GGUFValueType.ARRAY


@pytest.mark.parametrize("key, value_type, value, expected", [
    ("general.architecture", STR, b"ll\xffama", "general.architecture is not valid UTF-8"),
    ("general.architecture", U32, 3, "general.architecture is a uint32, not a string"),
    ("llama.block_count", STR, "4", "llama.block_count is a string, not an integer"),
    ("llama.block_count", GGUFValueType.UINT64, 4_000_000_000, "llama.block_count is 4000000000, outside 1..10000"),
    ("llama.block_count", U32, None, "llama.block_count is missing"),
    ("llama.embedding_length", GGUFValueType.FLOAT32, 64.0, "llama.embedding_length is a float32, not an integer"),
    ("llama.context_length", GGUFValueType.INT32, -1, "llama.context_length is -1, outside 1.."),
    ("llama.attention.head_count", U32, 0, "llama.attention.head_count is 0 on every layer"),
    ("llama.attention.head_count_kv", ARR, (U32, []), "head_count_kv is an array of 0 uint32, not an integer or an "
                                                      "array of 4 integers"),
    ("llama.attention.head_count_kv", U32, 3, "head_count_kv is 3 on layer 0, which does not divide its "
                                              "head_count 4"),
    ("llama.attention.head_count_kv", ARR, (U32, [2, 2, 2, 8]), "is 8 on layer 3"),
    ("llama.feed_forward_length", ARR, (STR, ["a"] * 4), "feed_forward_length is an array of 4 string"),
    ("llama.expert_count", U32, 8, "llama.expert_used_count is 0 or missing with 8 experts"),
    ("llama.expert_used_count", U32, 2, "llama.expert_used_count is 2, outside 0..0"),
    ("tokenizer.ggml.tokens", ARR, (GGUFValueType.INT32, [1, 2]), "tokenizer.ggml.tokens is an array of 2 int32, "
                                                                  "not an array of strings"),
    ("llama.attention.sliding_window", U32, 16, None),      # accepted: llama has no default pattern, a warning
])
def test_bad_metadata(tmp_path, tiny_model, cli, key, value_type, value, expected):
    metadata, tensors = gguf_parts(tiny_model)
    metadata = [m for m in metadata if m[0] != key] + ([(key, value_type, value)] if value is not None else [])
    path = write_gguf(tmp_path / "model.gguf", metadata, tensors)
    if expected is None:
        assert "no layer pattern" in read_inventory(path).warnings[0]
        return
    with pytest.raises(ModelFileError) as err:
        read_inventory(path)
    message = str(err.value)
    assert message.startswith(f"{path}: metadata ") and expected in message
    assert "the file is damaged or not a model oatoplan supports" in message
    result = cli(["inspect", path])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and expected in result.stderr


@pytest.mark.parametrize("tensor, change, expected", [
    (1, dict(shape=[]), "tensor blk.0.attn_norm.weight has 0 dimensions"),
    (1, dict(shape=[64, 0]), "tensor blk.0.attn_norm.weight has an empty dimension"),
    (1, dict(shape=[1, 1, 1, 1, 64]), "has 5 dimensions"),
    (1, dict(name="blk.12345678901234567890.attn_norm.weight"), "is in block 12345678901234567890, but the model "
                                                                "has 4 blocks"),
    (1, dict(name="blk.4.attn_norm.weight"), "is in block 4, but the model has 4 blocks"),
    (1, dict(name="blk.00.attn_norm.weight"), "is in block 00"),
    (1, dict(name="blk.0." + "x" * 70), "bytes long (llama.cpp allows 63)"),
    (1, dict(ggml_type=12), "row length 64 is not a multiple of Q4_K's block of 256"),
    (1, dict(shape=[1 << 40, 1 << 40]), "tensor data is truncated"),
])
def test_bad_tensor_table(tmp_path, tiny_model, cli, tensor, change, expected):
    metadata, tensors = gguf_parts(tiny_model)
    name, shape, ggml_type, data = tensors[tensor]
    tensors[tensor] = (change.get("name", name), change.get("shape", shape), change.get("ggml_type", ggml_type), data)
    path = write_gguf(tmp_path / "model.gguf", metadata, tensors)
    with pytest.raises(ModelFileError) as err:
        read_inventory(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    result = cli(["inspect", path])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_per_layer_arrays_are_read(tmp_path, tiny_model):
    metadata, tensors = gguf_parts(tiny_model)
    metadata = [m for m in metadata if m[0] != "llama.attention.head_count_kv"]
    metadata.append(("llama.attention.head_count_kv", ARR, (U32, [2, 1, 4, 2])))
    path = write_gguf(tmp_path / "model.gguf", metadata, tensors)
    inv = read_inventory(path)      # a byte-by-byte rewrite reads as the original, but for the changed key
    assert inv.hparams.n_head_kv == (2, 1, 4, 2) and inv.tensors == read_inventory(tiny_model).tensors


def test_a_fifo_is_refused_without_reading(tmp_path, cli):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ModelFileError, match="is a FIFO; pass a .gguf model file"):
        read_inventory(fifo)
    result = cli(["inspect", fifo])
    assert result.exit_code == 1 and "is a FIFO" in result.stderr
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("data, expected", [
    (b"GGUF", "not a GGUF file (only 4 bytes)"),
    (b"GGUG\x03\x00\x00\x00" + bytes(100), "not a GGUF file (it starts with b'GGUG', not GGUF)"),
])
def test_messages_say_what_differs(tmp_path, data, expected):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelFileError) as err:
        read_inventory(path)
    assert expected in str(err.value)


def test_plan_mismatch_names_what_differs(tmp_path, tiny_model):
    from oatoplan.errors import PlanMismatchError
    from oatoplan.plan import check_plan, cpu_only_plan
    metadata, tensors = gguf_parts(tiny_model)
    (tmp_path / "b").mkdir()
    same = write_gguf(tmp_path / "tiny-llama.gguf", metadata, tensors)
    q, k = (next(i for i, t in enumerate(tensors) if t[0] == name) for name in ("blk.0.attn_q.weight",
                                                                                  "blk.0.attn_k.weight"))
    tensors[q], tensors[k] = (tensors[k][0],) + tensors[q][1:], (tensors[q][0],) + tensors[k][1:]
    swapped = write_gguf(tmp_path / "b" / "tiny-llama.gguf", metadata, tensors)   # same name, same size
    assert same.stat().st_size == swapped.stat().st_size
    a, b = read_inventory(same), read_inventory(swapped)
    with pytest.raises(PlanMismatchError) as err:
        check_plan(b, cpu_only_plan(a), "p.json")
    assert f"tensor table {a.identity.tensor_table_sha256[:12]}), not for" in str(err.value)
    assert f"tensor table {b.identity.tensor_table_sha256[:12]}); make a plan" in str(err.value)
