"""Bounded-time fuzzing of what oatoplan reads: GGUF metadata of every type and value, tensor tables, byte
mutations of a whole GGUF header, and plan and profile JSON. Every case either returns or raises OatoError (one line
through the CLI) -- never another exception, never a hang. Seeded: a failure names its case and replays."""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import struct

import pytest
from gguf import GGUFValueType as T

from conftest import gguf_parts, write_gguf, write_tiny_llama
from oatoplan.cost import CostModel
from oatoplan.errors import ArtifactError, OatoError
from oatoplan.inventory import read_inventory
from oatoplan.plan import cpu_only_plan
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.artifacts import dumps, read_json
from oatoplan.schema import Plan, Profile
from profiles import synthetic_profile

CASE_DEADLINE_S = 5
N_TYPED, N_TENSOR, N_BYTES, N_JSON = 400, 100, 300, 150

KEYS = ["general.architecture", "llama.block_count", "llama.embedding_length", "llama.context_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length",
        "llama.attention.key_length", "llama.attention.value_length", "llama.vocab_size",
        "llama.attention.sliding_window", "llama.attention.sliding_window_pattern", "llama.expert_count",
        "llama.expert_used_count", "tokenizer.ggml.tokens", "general.alignment", "general.name"]
INT_RANGES = {T.UINT8: (0, 2**8 - 1), T.INT8: (-2**7, 2**7 - 1), T.UINT16: (0, 2**16 - 1),
              T.INT16: (-2**15, 2**15 - 1), T.UINT32: (0, 2**32 - 1), T.INT32: (-2**31, 2**31 - 1),
              T.UINT64: (0, 2**64 - 1), T.INT64: (-2**63, 2**63 - 1)}
STRINGS = ["", "llama", "gemma3", b"\xff\xfe\xfd", b"ll\xc3", "x" * 300, "4", "blk.0", "\x00", "llama\n"]
NAMES = ["blk.99999999999999999999.attn_q.weight", "blk.2.attn_q.weight", "blk.01.attn_q.weight", b"\xff\xfe.weight",
         "blk.0." + "x" * 80, "blk.-1.attn_q.weight", "blk..weight", "token_embd.weight", "", "blk.\u0663.attn_q.weight"]
SHAPES = [[], [0], [64, 0], [2**40, 2**40], [2**63, 2], [32], [1, 1, 1, 1, 1], [64, 64, 64], [256], [7]]


class Hang(BaseException):
    """A case ran past its deadline (a BaseException: no `except Exception` or `except OSError` can swallow it)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    def expired(signum, frame):
        raise Hang(f"{what}: still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


SCALAR_TYPES = list(INT_RANGES) + [T.FLOAT32, T.FLOAT64, T.BOOL, T.STRING]


def _value_of(rng: random.Random, value_type: int):
    if value_type in INT_RANGES:
        low, high = INT_RANGES[value_type]
        candidates = [low, high, 0, 1, 2, 3, 4, 64, 10_001, 2**31 - 1, 4_000_000_000, -1, rng.randint(low, high)]
        return rng.choice([c for c in candidates if low <= c <= high])
    if value_type in (T.FLOAT32, T.FLOAT64):
        return rng.choice([0.0, 2.0, 4.0, -1.0, math.nan, math.inf, 4e9, 1e-30])
    if value_type == T.BOOL:
        return rng.random() < 0.5
    if value_type == T.STRING:
        return rng.choice(STRINGS)
    n = rng.choice([0, 1, 2, 2, 4, 100])
    if rng.random() < 0.1:      # an array of arrays
        return T.ARRAY, [(T.UINT8, [1, 2])] * n
    item_type = rng.choice(SCALAR_TYPES)
    return item_type, [_value_of(rng, item_type) for _ in range(n)]


def _random_value(rng: random.Random) -> tuple[int, object]:
    value_type = rng.choice(SCALAR_TYPES + [T.ARRAY] * 4)
    return value_type, _value_of(rng, value_type)


def _typed_case(rng: random.Random, metadata: list) -> list:
    metadata = list(metadata)
    for key in rng.sample(KEYS, rng.choice([1, 1, 1, 2, 3])):
        metadata = [m for m in metadata if m[0] != key]
        if rng.random() < 0.85:
            metadata.append((key, *_random_value(rng)))
    return metadata


def _tensor_case(rng: random.Random, tensors: list) -> list:
    tensors = list(tensors)
    i = rng.randrange(len(tensors))
    name, shape, ggml_type, data = tensors[i]
    what = rng.choice(["name", "shape", "type"])
    if what == "name":
        name = rng.choice(NAMES)
    elif what == "shape":
        shape = rng.choice(SHAPES)
    else:
        ggml_type = rng.choice([200, 2, 12, 0, 1, 30, 2**31])
    tensors[i] = (name, shape, ggml_type, data)
    return tensors


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A two-layer tiny model's parts, and a GPU profile for planning."""
    tmp = tmp_path_factory.mktemp("fuzz")
    model = write_tiny_llama(tmp / "template.gguf", n_layer=2)
    profile = tmp / "profile.json"
    profile.write_text(dumps(synthetic_profile()))
    return gguf_parts(model), model, profile


def _read_or_oato_error(path, what: str):
    with deadline(CASE_DEADLINE_S, what):
        try:
            return read_inventory(path)
        except OatoError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), what
            return None


def test_typed_metadata_and_tensor_table(template, tmp_path, cli):
    (metadata, tensors), _, profile = template
    path = tmp_path / "case.gguf"
    read, refused, through_cli = 0, 0, []
    for seed in range(N_TYPED + N_TENSOR):
        rng = random.Random(seed)
        if seed < N_TYPED:
            case = (_typed_case(rng, metadata), tensors)
        else:
            case = (metadata, _tensor_case(rng, tensors))
        try:
            write_gguf(path, *case)
        except (struct.error, OverflowError):
            continue    # a value its own type cannot hold (the generator's, not the reader's, limit)
        inventory = _read_or_oato_error(path, f"seed {seed}")
        read, refused = read + (inventory is not None), refused + (inventory is None)
        if seed % 25 == 0:
            through_cli.append((seed, path.read_bytes()))
    assert read > 50 and refused > 200, (read, refused)    # both sides are exercised
    # a sample through the CLI: inspect and plan exit 0 or 1, with one line of error and no traceback
    for seed, data in through_cli:
        path.write_bytes(data)
        commands = [["inspect", path], ["plan", path, "--vram", "1GiB", "--profile", profile, "-o",
                                        tmp_path / "plan.json", "--force"]]
        for args in commands:
            with deadline(4 * CASE_DEADLINE_S, f"seed {seed}: {args[0]}"):
                result = cli(args)
            assert result.exit_code in (0, 1) and "Traceback" not in result.stderr, (seed, args[0], result.stderr)
            if result.exit_code == 1:
                assert len(result.stderr.strip().splitlines()) == 1, (seed, args[0], result.stderr)


def test_byte_mutations_of_the_header(template, tmp_path):
    _, model, _ = template
    good = model.read_bytes()
    header_end = read_inventory(model).data_offset
    path = tmp_path / "case.gguf"
    for seed in range(N_BYTES):
        rng = random.Random(seed)
        data = bytearray(good)
        how = rng.choice(["flip", "flip", "word", "truncate"])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(header_end)] = rng.randrange(256)
        elif how == "word":    # a length, count or offset field becomes huge, zero or negative-looking
            at = rng.randrange(header_end - 8)
            data[at:at + 8] = rng.choice([b"\xff" * 8, bytes(8), struct.pack("<Q", 2**32), struct.pack("<Q", 10**6)])
        else:
            del data[rng.randrange(len(data)):]
        path.write_bytes(bytes(data))
        _read_or_oato_error(path, f"seed {seed} ({how})")


# --- plan and profile JSON -------------------------------------------------------------------------------------

def _paths(value, prefix=()):
    """Every (path) into a JSON value: keys of objects, indices of lists."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:6]):    # the first few items of long lists (ops) are enough
            yield from _paths(v, prefix + (i,))


REPLACEMENTS = [None, True, False, -1, 0, 1, 1.5, math.nan, math.inf, -math.inf, "x", "", [], {}, [1], {"a": 1},
                10**30, "CUDA7", [[]]]


def _mutate(doc, rng: random.Random):
    doc = json.loads(json.dumps(doc))
    path = rng.choice(list(_paths(doc))[1:])
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[path[-1]]
    elif isinstance(parent, dict) and rng.random() < 0.05:
        parent["unexpected"] = 1
    else:
        parent[path[-1]] = rng.choice(REPLACEMENTS)
    return doc


def _check_profile_drives_the_cost_model(profile: Profile) -> None:
    cost = CostModel(profile)
    for device in cost.devices():
        times = [cost.matmul_us(device, "Q4_K", 4096, 4096, 1), cost.attention_us(device, 128, 32, 8, 1024, 1),
                 cost.elementwise_us(device, "ADD", 4096)]
        if device != "CPU":
            times += [cost.transfer_us(1 << 20), cost.transfer_us(1 << 20, pinned=False)]
        assert all(math.isfinite(t) and t >= 0 for t in times), times


@pytest.mark.parametrize("cls", [Plan, Profile])
def test_artifact_json_mutations(template, tmp_path, cls):
    _, model, _ = template
    valid = synthetic_profile() if cls is Profile else cpu_only_plan(read_inventory(model))
    doc = json.loads(dumps(valid))
    path = tmp_path / "artifact.json"
    accepted = 0
    for seed in range(N_JSON):
        path.write_text(json.dumps(_mutate(doc, random.Random(seed))))
        with deadline(CASE_DEADLINE_S, f"{cls.__name__} seed {seed}"):
            try:
                artifact = read_json(cls, path)
            except ArtifactError as exc:
                assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), seed
                continue
        accepted += 1
        if cls is Profile:
            _check_profile_drives_the_cost_model(artifact)
    assert 0 < accepted < N_JSON


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe{}", r"not UTF-8 text \(byte 0\)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    (b"GGUF\x03\x00\x00\x00", "is a GGUF model, not a"),
    (b"", "not valid JSON"),
])
@pytest.mark.parametrize("cls", [Plan, Profile])
def test_unreadable_artifacts(tmp_path, cls, content, expected):
    path = tmp_path / "artifact.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=expected):
        read_json(cls, path)


def _profile_doc(change) -> dict:
    doc = json.loads(dumps(synthetic_profile()))
    change(doc)
    return doc


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(ops=[]), "ops is empty"),
    (lambda d: d.update(transfers=[]), "transfers: fewer than two sizes of h2d pinned copies"),
    (lambda d: d["ops"][3].update(t_us=math.nan), "ops[3].t_us is nan, not a positive finite number"),
    (lambda d: d["ops"][3].update(t_us=-2.0), "ops[3].t_us is -2.0"),
    (lambda d: d["transfers"][0].update(t_us=0.0), "transfers[0].t_us is 0.0"),
    (lambda d: d.update(cpu_read_bytes_per_s=0.0), "cpu_read_bytes_per_s is 0.0, not a positive finite number"),
    (lambda d: d["ops"][0].update(device="CUDA1"), "ops[0].device: device 'CUDA1' is not one of the profile's devices"),
    (lambda d: d.update(ops=[o for o in d["ops"] if o["op"] != "ROPE" or o["device"] != "CUDA0"]),
     "ops: no ROPE timing on CUDA0"),
    (lambda d: d["ops"][0].update(shape=[4096]), "ops[0].shape [4096] has too few dimensions for MUL_MAT"),
    (lambda d: d.update(n_threads=0), "n_threads is 0, less than 1"),
    (lambda d: d.update(gpu_device="CPU"), "gpu_device 'CPU' is not a ggml GPU device name"),
])
def test_profile_validation(tmp_path, cli, change, expected):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile_doc(change)))
    with pytest.raises(ArtifactError) as err:
        read_json(Profile, path)
    assert str(err.value).startswith(f"{path}: invalid profile: ") and expected in str(err.value)
    assert "measure it again (oatoplan profile run)" in str(err.value)
    result = cli(["profile", "show", path])
    assert result.exit_code == 1 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_valid_profiles_pass(tmp_path):
    for profile in (SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json", SHIPPED_PROFILES_DIR / "h100-qwen2-7b.json"):
        _check_profile_drives_the_cost_model(read_json(Profile, profile))
    cpu = synthetic_profile(gpu=False)
    path = tmp_path / "cpu.json"
    path.write_text(dumps(cpu))
    assert read_json(Profile, path) == cpu
