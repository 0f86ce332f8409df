"""The decoder graph as the planner sees it: an ordered list of placement units (a matrix with its bias/norm, or a
layer's KV cache and attention), the roles they play, and how often a placement crosses between the CPU and a GPU.

The role table is data (like gguf-py's constants): one row per role, in graph order within a block, saying which half
of the block it belongs to and what kind of tensor it is. Every "is this an FFN unit?" question is answered here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from .schema import Hyperparameters, ModelInventory, TensorInfo

CPU = "CPU"

# Halves of a block and kinds of unit.
ATTENTION, FFN = "attention", "ffn"
NORM, MATRIX, KV, ROUTER, EXPERTS = "norm", "matrix", "kv", "router", "experts"

# role -> (half of the block, kind), in graph order. "attn" is the KV cache and attention (placed with the layer, i.e.
# n_gpu_layers); every other role is a group of tensors that one op (or a matrix and its bias/norm) consumes.
ROLES: dict[str, tuple[str, str]] = {
    "attn_norm": (ATTENTION, NORM),
    "attn_q": (ATTENTION, MATRIX), "attn_k": (ATTENTION, MATRIX), "attn_v": (ATTENTION, MATRIX),
    "attn_qkv": (ATTENTION, MATRIX),
    "attn": (ATTENTION, KV),
    "attn_output": (ATTENTION, MATRIX),
    "post_attention_norm": (ATTENTION, NORM), "attn_post_norm": (ATTENTION, NORM),
    "ffn_norm": (FFN, NORM),
    "ffn_gate_inp": (FFN, ROUTER),
    "ffn_gate": (FFN, MATRIX), "ffn_up": (FFN, MATRIX),
    "ffn_gate_exps": (FFN, EXPERTS), "ffn_up_exps": (FFN, EXPERTS), "ffn_gate_up_exps": (FFN, EXPERTS),
    "ffn_down": (FFN, MATRIX), "ffn_down_exps": (FFN, EXPERTS),
    "ffn_gate_shexp": (FFN, MATRIX), "ffn_up_shexp": (FFN, MATRIX), "ffn_down_shexp": (FFN, MATRIX),
    "post_ffw_norm": (FFN, NORM), "ffn_post_norm": (FFN, NORM), "layer_output_norm": (FFN, NORM),
}
LAYER_ORDER = tuple(ROLES)
# tensors that ride with another unit (applied right after it, on its device)
UNIT_OF_ROLE = {"attn_q_norm": "attn_q", "attn_k_norm": "attn_k"}
# roles whose op is followed by the gated activation, and roles whose output is added to the residual stream
_GLU_AFTER = ("ffn_gate", "ffn_gate_exps", "ffn_gate_up_exps", "ffn_gate_shexp")
_RESIDUAL_AFTER = ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp")   # the shared experts' output is
# added to the routed experts' output


@dataclass(frozen=True)
class Unit:
    key: str                       # "blk.3.ffn_up", "blk.3.attn" (KV + attention), "output", "output_norm"
    layer: int | None
    tensors: tuple[str, ...]       # GGUF names ("token_embd.weight" for a tied output matrix)
    n_bytes: int                   # weight bytes (KV bytes for an attn unit are counted separately)
    matrices: tuple[tuple[str, int, int], ...]   # (type, K, N) of each MUL_MAT weight in the unit
    elementwise: tuple[tuple[str, int], ...]     # (op, elements per token) that run with the unit
    is_attention: bool = False
    is_output: bool = False


def role(unit: Unit) -> str:
    """"ffn_up" for "blk.3.ffn_up"; the key itself outside the blocks ("output", "output_norm")."""
    return unit.key.split(".", 2)[2] if unit.layer is not None else unit.key


def role_info(name: str) -> tuple[str, str]:
    """(half, kind) of a role: from the table; a role it lacks is read from its name, as GGUF names roles."""
    if name in ROLES:
        return ROLES[name]
    half = FFN if name.startswith(("ffn", "post_ffw", "layer_output")) else ATTENTION
    return half, NORM if "norm" in name else MATRIX


def is_ffn(unit: Unit) -> bool:
    """A block's FFN weights: gate, up, down, router, experts and shared experts, not its norms. These are what
    llama.cpp's `-ot 'blk\\.N\\.ffn_(gate|up|down)=CPU'` moves to the CPU."""
    if unit.layer is None:
        return False
    half, kind = role_info(role(unit))
    return half == FFN and kind != NORM


def is_expert(unit: Unit) -> bool:
    """A block's routed experts (MUL_MAT_ID): what llama.cpp's --n-cpu-moe moves to the CPU."""
    return unit.layer is not None and role_info(role(unit))[1] == EXPERTS


def is_router(unit: Unit) -> bool:
    """A block's expert router (ffn_gate_inp): a small dense matrix, then the top-k selection."""
    return unit.layer is not None and role_info(role(unit))[1] == ROUTER


def expected_touched(n_expert: int, n_used: int, n_tokens: float) -> float:
    """Distinct experts a batch of n_tokens touches when each token picks n_used of n_expert uniformly:
    E * (1 - (1 - k/E)^T). Measured routing of the shape-faithful models follows it
    (benchmarks/results/*-moe-routing-*.json)."""
    if not n_expert:
        return 0.0
    return n_expert * (1 - (1 - n_used / n_expert) ** n_tokens)


def active_bytes(unit: Unit, n_expert: int, n_used: int) -> float:
    """Weight bytes one token reads from a unit: n_used of n_expert experts for routed experts, else all."""
    return unit.n_bytes * n_used / n_expert if is_expert(unit) and n_expert else unit.n_bytes


def crossings(devices: Iterable, start=CPU) -> int:
    """CPU<->GPU crossings of a graph that starts on `start` (the input lookup runs on the CPU) and runs through
    `devices` in order (device names, or 0/1 for CPU/GPU with start=0)."""
    count, before = 0, start
    for device in devices:
        count += device != before
        before = device
    return count


def model_units(inv: ModelInventory) -> list[Unit]:
    """Every placeable unit in graph order: blocks 0..n-1 (LAYER_ORDER within), then output_norm, output.
    token_embd (input, GET_ROWS) stays on the CPU, as llama.cpp puts it."""
    hp = inv.hparams
    by_unit: dict[tuple[int, str], list[TensorInfo]] = defaultdict(list)
    extra_roles: list[str] = []
    for t in inv.tensors:
        if t.layer is None:
            continue
        unit_role = UNIT_OF_ROLE.get(t.role, t.role)
        if unit_role not in ROLES and unit_role not in extra_roles:
            extra_roles.append(unit_role)
        by_unit[(t.layer, unit_role)].append(t)
    units = []
    for il in range(hp.n_layer):
        for name in LAYER_ORDER + tuple(extra_roles):
            if name == "attn":
                n_embd_q = hp.n_head * hp.head_dim_k
                units.append(Unit(f"blk.{il}.attn", il, (), 0, (), (("ROPE", n_embd_q), ("ROPE", n_embd_q // 2),
                                  ("SET_ROWS", hp.n_head_kv[il] * (hp.head_dim_k + hp.head_dim_v))), True))
                continue
            tensors = by_unit.get((il, name))
            if tensors:
                units.append(_unit(f"blk.{il}.{name}", il, tensors, hp))
    if any(t.name == "output_norm.weight" for t in inv.tensors):
        units.append(_unit("output_norm", None, [inv.tensor("output_norm.weight")], hp))
    out = inv.output_matrix()
    units.append(Unit("output", None, (out.name,), out.n_bytes, ((out.ggml_type, out.shape[0], out.shape[1]),), (),
                      is_output=True))
    return units


def _unit(key: str, layer: int | None, tensors: list[TensorInfo], hp: Hyperparameters) -> Unit:
    matrices, elementwise = [], []
    for t in tensors:
        if t.op in ("MUL_MAT", "MUL_MAT_ID") and len(t.shape) >= 2:
            share = hp.n_expert_used / hp.n_expert if t.op == "MUL_MAT_ID" and hp.n_expert else 1.0
            matrices.append((t.ggml_type, t.shape[0], int(t.shape[1] * (t.shape[2] if len(t.shape) > 2 else 1)
                                                          * share)))
        elif t.op == "MUL" and "norm" in t.role:
            elementwise += [("RMS_NORM", t.flops_per_token), ("MUL", t.flops_per_token)]
        elif t.op in ("ADD", "MUL"):
            elementwise.append((t.op, t.flops_per_token))
    name = key.rsplit(".", 1)[-1]
    if name in _GLU_AFTER:    # routed experts: n_used rows of the expert width per token; shared: its own width
        shape = tensors[0].shape
        width = (shape[1] * hp.n_expert_used if name.endswith("_exps") and len(shape) > 2 else
                 shape[1] if name.endswith("_shexp") and len(shape) > 1 else hp.n_ff)
        elementwise.append(("GLU", width))
    if name == "ffn_down_exps":   # each token's n_used expert outputs weighted by the router, then summed
        elementwise += [("MUL", hp.n_embd * hp.n_expert_used), ("ADD", hp.n_embd * (hp.n_expert_used - 1))]
    if name in _RESIDUAL_AFTER:
        elementwise.append(("ADD", hp.n_embd))          # the residual
    return Unit(key, layer, tuple(t.name for t in tensors), sum(t.n_bytes for t in tensors), tuple(matrices),
                tuple(elementwise))
