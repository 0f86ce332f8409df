"""VRAM: what a placement costs on the GPU, term by term, and the one budget rule every arm is held to.

`vram_terms` is the only place the terms are written: each unit's bytes on the GPU (its weights, or its KV cache),
llama.cpp's compute buffer (the output stage and the layer stage, plus the host weight that op offload copies in) and
the CUDA backend's pool. The integer program takes its coefficients from it, `gpu_memory` evaluates a placement with
it (`fits`, `cost.predict`), and the plan's memory prediction takes its KV bytes from `kv_layer_bytes`.

The budget rule: every arm (the plan, the greedy placement, every baseline) must fit `usable_bytes(budget_bytes)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .artifacts import RPC_DEVICE_NAME
from .errors import OatoError, ProfileError
from .ggml import row_bytes
from .graph import CPU, Unit
from .inventory import kv_bytes_per_token, kv_cells
from .machine import devices
from .schema import Hyperparameters, ModelInventory, Profile
from .units import parse_size_bytes

# llama.cpp's CUDA backend takes an op with a host-resident weight to the GPU (copying the weight) from this batch
# size on.
OP_OFFLOAD_MIN_TOKENS = 32
# The CUDA backend pads a quantized matrix whose rows are not a multiple of this many values (one row's worth of
# padding at the end, ggml_backend_cuda_buffer_type_get_alloc_size), and aligns buffers to STREAM_SLOT_ALIGN bytes.
MATRIX_ROW_PADDING = 512
STREAM_SLOT_ALIGN = 128
# The segment KV cache's growth (OATO_SEGMENT_KV_CHUNK): its host segment grows by this many cells at a time.
KV_SEGMENT_GROWTH_CELLS = 256
# Share of every budget kept free for what the terms below do not count (allocator rounding, CUDA context growth).
# How far allocations came from predictions: the validate-* and bench-* files in benchmarks/results/.
VRAM_MARGIN = 0.03
# The per-process GPU overhead assumed for a profile that did not measure it: above the 80-90 MiB measured beyond the
# pool on the H200 machine (benchmarks/results/2026-12-01-h200-vram-overhead-qwen2-7b.jsonl).
UNMEASURED_OVERHEAD_BYTES = 128 * 1024 * 1024
# `--vram auto`: the free VRAM less this share (the CUDA context grows, other processes allocate).
AUTO_BUDGET_SHARE = 0.95


@dataclass(frozen=True)
class Settings:
    """The non-placement decisions a plan makes."""
    n_ubatch: int
    op_offload: bool
    pinned: bool                   # mmap off: host weights in pinned memory
    n_ctx: int
    type_k: str = "f16"
    type_v: str = "f16"
    # llama.cpp's n_outputs_max: logits rows reserved per ubatch (0 = every token of it, llama.cpp's default).
    # Generation needs one (the last prompt token's); llama-server sets it, llama-cpp-python and llama-cli cannot.
    n_outputs_max: int = 0
    # weight streaming (patches/0005): staging slots in VRAM for op offload's host weights; 0: off
    stream_slots: int = 0
    # segment KV cache (patches/0007-0008): cells [0, segment_cells) of every full-attention layer's cache stay with
    # the layer, the cells past them live in host memory (growing in KV_SEGMENT_GROWTH_CELLS chunks) with their
    # attention on the CPU; 0: the stock cache, n_ctx cells with the layer
    segment_cells: int = 0
    # the host segment's (K, V) types where they are not the cache's (patches/0010, OATO_SEGMENT_KV_TYPES1)
    host_kv_types: tuple[str, str] | None = None


def host_kv_types(s: Settings) -> tuple[str, str]:
    """The (K, V) types of the segment KV cache's host segment."""
    return s.host_kv_types or (s.type_k, s.type_v)


def usable_bytes(budget_bytes: int) -> int:
    """The VRAM an arm may use of a budget: the budget less VRAM_MARGIN. The same for every arm."""
    return int(budget_bytes * (1 - VRAM_MARGIN))


def budget_for(needed_bytes: float) -> int:
    """The smallest budget whose usable share holds `needed_bytes` (the inverse of usable_bytes)."""
    return math.ceil(needed_bytes / (1 - VRAM_MARGIN))


def budget_bytes(vram: str, profile: Profile) -> int:
    """A VRAM budget: a size ("6GiB", "4500MiB", "0" for a CPU-only plan), or "auto": the profiled GPU's free memory
    less 5%, and 0 where there is no GPU (a CPU profile, or a llama.cpp build without a GPU device)."""
    if vram != "auto":
        return parse_size_bytes(vram)
    gpus = [d for d in devices() if d.type in ("GPU", "IGPU")]
    if not profile.gpu_device or not gpus:
        return 0
    found = [d for d in gpus if d.name == profile.gpu_device]
    if not found:
        raise ProfileError(f"--vram auto needs {profile.gpu_device} of the profile {profile.profile_id}, but this "
                           f"llama.cpp build has {', '.join(d.name for d in gpus)}; give a size, e.g. --vram 6GiB, "
                           f"or profile this machine")
    return int(found[0].free_bytes * AUTO_BUDGET_SHARE)


def parse_budgets(text: str) -> dict[str, int] | None:
    """`--vram CUDA0=20GiB,CUDA1=10GiB,RPC[host:50052]=8GiB` -> {device: bytes}, in the order given (the order of
    llama.cpp's layer split); None for a single budget ("6GiB", "auto")."""
    if "=" not in text:
        return None
    budgets: dict[str, int] = {}
    for item in text.split(","):
        device, _, size = item.strip().partition("=")
        if not size or not (device.isidentifier() or RPC_DEVICE_NAME.match(device)) or device == CPU:
            raise OatoError(f"--vram {item.strip()!r}: give DEVICE=SIZE for each accelerator, e.g. "
                            f"CUDA0=20GiB,CUDA1=10GiB,RPC[192.168.1.20:50052]=8GiB")
        if device in budgets:
            raise OatoError(f"--vram names {device} twice; give each device once")
        budgets[device] = _auto_budget(device) if size == "auto" else parse_size_bytes(size)
    return budgets


def _auto_budget(device: str) -> int:
    """`DEVICE=auto`: that device's free memory less 5%, as llama.cpp reports it here."""
    if device.startswith("RPC["):
        raise OatoError(f"--vram {device}=auto: give the RPC device a size (e.g. {device}=8GiB); oatoplan asks RPC "
                        f"servers for their memory only when it profiles them")
    found = [d for d in devices() if d.name == device]
    if not found:
        raise OatoError(f"--vram {device}=auto: this llama.cpp build has no device {device} (it has "
                        f"{', '.join(d.name for d in devices())}); give a size, e.g. {device}=8GiB")
    return int(found[0].free_bytes * AUTO_BUDGET_SHARE)


def effective_ubatch(s: Settings) -> int:
    """llama.cpp caps n_batch (and so n_ubatch) at n_ctx: a 2048-token ubatch in a 640-token context is 640."""
    return min(s.n_ubatch, s.n_ctx)


def n_outputs(s: Settings) -> int:
    """Logit rows llama.cpp reserves (and computes at most) per ubatch."""
    u = effective_ubatch(s)
    return min(s.n_outputs_max, u) if s.n_outputs_max else u


def kv_layer_bytes(hp: Hyperparameters, layer: int, n_ctx: int, n_ubatch: int, type_k: str = "f16",
                   type_v: str = "f16", swa_full: bool = True) -> int:
    """KV cache bytes of one layer: the cells llama.cpp allocates times the K and V row bytes of a token."""
    return kv_cells(hp, layer, n_ctx, n_ubatch, swa_full) * kv_bytes_per_token(hp, layer, type_k, type_v)


def segment_kv_cells(hp: Hyperparameters, layer: int, n_ctx: int, n_ubatch: int, segment_cells: int, n_used: int,
                     chunk_cells: int = 256, swa_full: bool = True) -> int:
    """Cells of `layer`'s cache under the segment KV cache (patches/0007, OATO_SEGMENT_KV=segment_cells) once
    `n_used` cells were filled in order: the prompt segment's P cells and a spare, and the response segment's cells
    and a spare. The response segment starts with the cells up to the first multiple of 256 past P, then grows by
    whole chunks (chunk_cells rounded up to 256; 0: reserved whole), never past the cache. Sliding-window layers (the
    iSWA cache's own part, full-size or not) and P outside 1..cells-1 keep the stock cache (kv_cells)."""
    cells = kv_cells(hp, layer, n_ctx, n_ubatch, swa_full)
    if (layer in hp.swa_layers and hp.n_swa) or not 0 < segment_cells < cells:
        return cells
    full, chunk = cells - segment_cells, -(-chunk_cells // 256) * 256

    def capacity(n_cells1: int) -> int:
        if chunk == 0:
            return full
        base = -(-segment_cells // 256) * 256 - segment_cells
        cap = base + (-(-(n_cells1 - base) // chunk) * chunk if n_cells1 > base else 0)
        return min(full, cap if cap > 0 else chunk)
    return segment_cells + 1 + max(capacity(1), capacity(n_used - segment_cells)) + 1


def parallel_kv_cells(hp: Hyperparameters, layer: int, n_ctx: int, n_ubatch: int, n_seq: int, unified: bool,
                      swa_full: bool = True) -> int:
    """Cells of `layer`'s stock cache in a context for `n_seq` parallel sequences (n_seq_max). Per-sequence caches
    (unified off): n_ctx (rounded up to 256) split into n_seq streams of n_ctx / n_seq rounded up to 256, each sized
    like a one-sequence cache. Unified: one stream of n_ctx cells that every sequence shares; a sliding-window layer
    without swa_full keeps n_swa cells per sequence and a ubatch (llama_kv_cache_iswa)."""
    n_ctx = -(-n_ctx // 256) * 256
    if not unified:
        return n_seq * kv_cells(hp, layer, -(-(n_ctx // n_seq) // 256) * 256, n_ubatch, swa_full)
    if layer in hp.swa_layers and hp.n_swa and not swa_full:
        return -(-min(n_ctx, hp.n_swa * n_seq + n_ubatch) // 256) * 256
    return n_ctx


def shared_segment_kv_cells(hp: Hyperparameters, layer: int, n_ctx: int, n_ubatch: int, n_seq: int,
                            segment_cells: int, n_decoded: int, chunk_cells: int = 256, swa_full: bool = True) -> int:
    """Cells of `layer`'s cache when `n_seq` sequences share one prompt of `segment_cells` tokens in a unified
    segment KV cache (kv_unified, OATO_SEGMENT_KV=P, the prompt decoded once and llama_memory_seq_cp'd to the others)
    and each then decoded `n_decoded` tokens: the prompt's cells are segment 0, stored once; every sequence's
    tokens take cells of segment 1 in turn (P + n_seq * n_decoded used), which grows in chunks as for one sequence
    (segment_kv_cells). Sliding-window layers keep the unified stock cache (parallel_kv_cells)."""
    if layer in hp.swa_layers and hp.n_swa:
        return parallel_kv_cells(hp, layer, n_ctx, n_ubatch, n_seq, True, swa_full)
    return segment_kv_cells(hp, layer, n_ctx, n_ubatch, segment_cells, segment_cells + n_seq * n_decoded,
                            chunk_cells, swa_full)


def kv_split_bytes(hp: Hyperparameters, layer: int, s: Settings, swa_full: bool = True) -> tuple[int, int]:
    """(bytes with the layer, bytes in host memory) of `layer`'s KV cache when the context is created. The stock cache
    (kv_layer_bytes) is all with the layer. Under the segment KV cache with its second segment in host memory
    (s.segment_cells = P), segment 0's P cells and its spare cell stay with the layer; segment 1 starts in host memory
    as segment_kv_cells says for an empty cache and grows there. Sliding-window layers, and a P outside the cache,
    keep the stock cache."""
    whole = kv_layer_bytes(hp, layer, s.n_ctx, s.n_ubatch, s.type_k, s.type_v, swa_full)
    cells = kv_cells(hp, layer, s.n_ctx, s.n_ubatch, swa_full)
    if not s.segment_cells or (layer in hp.swa_layers and hp.n_swa) or not 0 < s.segment_cells < cells:
        return whole, 0
    per_cell = kv_bytes_per_token(hp, layer, s.type_k, s.type_v)
    total = segment_kv_cells(hp, layer, s.n_ctx, s.n_ubatch, s.segment_cells, 0, KV_SEGMENT_GROWTH_CELLS, swa_full)
    host_per_cell = kv_bytes_per_token(hp, layer, *host_kv_types(s))
    return (s.segment_cells + 1) * per_cell, (total - s.segment_cells - 1) * host_per_cell


def reserved_n_kv(s: Settings) -> int:
    """The KV cells a graph views when llama.cpp reserves its compute buffer: n_ctx rounded up to 256; under the
    segment KV cache, the cells that exist then (segment 0 and segment 1's first chunk, oato_n_kv_full)."""
    n_ctx = -(-s.n_ctx // 256) * 256
    if not 0 < s.segment_cells < n_ctx:
        return n_ctx
    return min(n_ctx, -(-s.segment_cells // 256) * 256 + KV_SEGMENT_GROWTH_CELLS)


def compute_stage_bytes(inv: ModelInventory, s: Settings) -> tuple[int, int]:
    """(output stage, layer stage) bytes of llama.cpp's GPU compute buffer, which it reserves for the worst case
    (n_outputs_max tokens of a ubatch produce logits; by default all). Output stage: logits (n_outputs x n_vocab f32)
    + the normed input; layer stage: the gate, up and GLU outputs and three n_embd-wide activations per token (f32),
    and the attention mask (f16, n_ctx per token). Weight copies for op offload come on top. Both stages match
    llama.cpp's allocations to the byte for Qwen2-7B on the H200 (layer stage with one logit row, ubatch 512 and 2048:
    benchmarks/results/2026-12-01-h200-vram-overhead-qwen2-7b.jsonl; output stage: tests/test_cost.py)."""
    hp, u = inv.hparams, effective_ubatch(s)
    n_ctx = reserved_n_kv(s)
    output_stage = 4 * n_outputs(s) * hp.n_vocab + 4 * u * hp.n_embd
    layer_stage = 4 * u * (3 * hp.n_ff + 3 * hp.n_embd) + 2 * u * n_ctx + moe_stage_bytes(hp, u)
    return output_stage, layer_stage


def moe_stage_bytes(hp: Hyperparameters, n_ubatch: int) -> int:
    """What a mixture-of-experts block adds to the layer stage (f32): the down experts' output before the weighted
    sum, n_used rows of n_embd per token where a dense block has one, and the router's logits, probabilities and
    top-k order (n_expert each). Read from llama.cpp's build_moe_ffn, not measured on its own. With it, a
    Qwen3-30B-A3B-shaped plan's compute buffer came out as predicted at ubatch 2048 but 141 MiB short at ubatch 512
    with no weight copy in the buffer (benchmarks/results/2026-12-01-h200-moe-bench-*.json): not understood yet."""
    if not hp.n_expert:
        return 0
    return 4 * n_ubatch * ((hp.n_expert_used - 1) * hp.n_embd + 3 * hp.n_expert)


def pool_bytes(inv: ModelInventory, s: Settings) -> int:
    """The CUDA backend's working pool beside llama.cpp's buffers: a ubatch of activations converted for the widest
    matrix input (quantized weights: q8_1 activations for the integer kernels, 36 bytes per 32 values; f16/bf16
    weights: f16 activations for cuBLAS). It grows to its high-water mark and stays allocated; the slope per ubatch
    token matches the q8_1 row of the widest input (benchmarks/results/2026-12-01-h200-vram-overhead-qwen2-7b.jsonl).
    Or, where larger, kv_conversion_bytes."""
    per_token = max((_input_bytes(t, inv.hparams) for t in inv.tensors
                     if t.op in ("MUL_MAT", "MUL_MAT_ID") and len(t.shape) >= 2),
                    default=_q8_1_bytes(inv.hparams.n_embd))
    return max(effective_ubatch(s) * per_token, kv_conversion_bytes(inv.hparams, s))


def kv_conversion_bytes(hp: Hyperparameters, s: Settings) -> int:
    """The f16 copy of one layer's K and/or V views that CUDA's batched flash-attention kernels make of a cache that is
    not f16 (ggml-cuda/fattn-common.cuh, from the pool, freed after the node): the widest layer's view of a ubatch at
    the end of the cache on the GPU (all n_ctx cells, or the first segment's). Not measured on a GPU yet."""
    cells = s.segment_cells or -(-s.n_ctx // 256) * 256
    return cells * max(_f16_conversion_bytes(hp, il, s.type_k, s.type_v) for il in range(hp.n_layer))


def _f16_conversion_bytes(hp: Hyperparameters, layer: int, type_k: str, type_v: str) -> int:
    """Bytes a cell of `layer`'s K and V take in CUDA's f16 copy of those that are not f16 already."""
    return 2 * hp.n_head_kv[layer] * ((type_k != "f16") * hp.head_dim_k + (type_v != "f16") * hp.head_dim_v)


def _input_bytes(t, hp: Hyperparameters) -> int:
    """One token's converted input of a weight's op: a row of K values (q8_1, or f16 for f16/bf16/f32 weights);
    n_used rows for the down experts (gate and up read the layer input once, broadcast over the experts)."""
    rows = hp.n_expert_used if t.op == "MUL_MAT_ID" and "down" in t.role else 1
    return rows * (_q8_1_bytes(t.shape[0]) if t.ggml_type not in ("F16", "BF16", "F32") else 2 * t.shape[0])


def _q8_1_bytes(n_values: int) -> int:
    """ggml's CUDA block_q8_1: 32 int8 values and two f16 (scale, sum), 36 bytes (gguf-py's table says 40: the CPU's
    reference layout with f32 scales)."""
    return -(-n_values // 32) * 36


def gpu_overhead_bytes(profile: Profile) -> int:
    """What a llama.cpp process uses on the GPU beyond llama.cpp's own buffers and the pool: kernel code loaded on first
    use, cuBLAS handles and workspace, streams. Measured by the profile's calibration in a fresh process
    (`oatoplan profile run --model`; its samples say it was measured, and 0 can be a measurement); a profile
    without them gets UNMEASURED_OVERHEAD_BYTES."""
    return profile.gpu_overhead_bytes if profile.gpu_overhead else UNMEASURED_OVERHEAD_BYTES


@dataclass(frozen=True)
class VramTerms:
    """The VRAM terms of one model and settings, for any placement of its units (in graph order)."""
    units: tuple[Unit, ...]
    unit_bytes: tuple[int, ...]    # each unit on the GPU: its weights, or the KV cache of an attn unit
    slot_bytes: tuple[int, ...]    # each unit's largest tensor as a staging slot holds it (stream_slot_bytes)
    stream_slots: int              # weight streaming's staging slots (0: off, op offload copies into the layer stage)
    output_stage_bytes: int        # compute buffer while the output matrix's op runs on the GPU
    layer_stage_bytes: int         # compute buffer of a block
    pool_bytes: int
    overhead_bytes: int            # per process beyond llama.cpp's buffers and the pool (gpu_overhead_bytes)
    offload: bool                  # op offload at this ubatch: a host matrix's op runs on the GPU, its weight copied in
    copy_output: bool              # ... the output matrix's too (its logit rows reach OP_OFFLOAD_MIN_TOKENS)

    @property
    def output(self) -> int:
        """Index of the output unit."""
        return next(i for i, u in enumerate(self.units) if u.is_output)

    def copied(self) -> list[int]:
        """Units whose weight op offload copies into the layer stage when they stay on the host."""
        return [i for i, u in enumerate(self.units) if self.offload and u.matrices and not u.is_output]

    def slot(self, on_gpu: Sequence) -> int:
        """Bytes of one weight-streaming slot for a placement: its largest host weight that op offload copies."""
        return max((self.slot_bytes[i] for i in self.copied() if not on_gpu[i]), default=0)

    def layer_copy(self, on_gpu: Sequence) -> int:
        """Bytes of the largest host weight op offload copies into the layer stage (0 with streaming: every host
        weight goes through the ring of slots, none through the compute buffer)."""
        host_copies = [i for i in self.copied() if not on_gpu[i]]
        return 0 if self.stream_slots else max((self.unit_bytes[i] for i in host_copies), default=0)

    def of(self, on_gpu: Sequence) -> dict[str, int]:
        """VRAM by category of the placement that puts unit i on the GPU when on_gpu[i] (bool or 0/1)."""
        weights = sum(b for u, b, g in zip(self.units, self.unit_bytes, on_gpu) if g and not u.is_attention)
        kv = sum(b for u, b, g in zip(self.units, self.unit_bytes, on_gpu) if g and u.is_attention)
        out = self.output
        stream = self.stream_slots * self.slot(on_gpu)
        copy_layer = self.layer_copy(on_gpu)
        output_stage = 0
        if on_gpu[out] or self.offload:
            copy_output = self.unit_bytes[out] if self.copy_output and not on_gpu[out] else 0
            output_stage = self.output_stage_bytes + copy_output
        compute = max(output_stage, self.layer_stage_bytes + copy_layer)
        return {"weights": weights, "kv": kv, "compute": compute, "stream": stream, "pool": self.pool_bytes,
                "overhead": self.overhead_bytes}


def vram_terms(inv: ModelInventory, units: Sequence[Unit], s: Settings, overhead_bytes: int) -> VramTerms:
    """The VRAM terms of `units` (model_units(inv)) under settings `s`, with a process overhead of `overhead_bytes`
    (gpu_overhead_bytes(profile))."""
    unit_bytes = tuple(kv_split_bytes(inv.hparams, u.layer, s)[0] if u.is_attention else u.n_bytes for u in units)
    output_stage, layer_stage = compute_stage_bytes(inv, s)
    offload = s.op_offload and s.n_ubatch >= OP_OFFLOAD_MIN_TOKENS
    slots = s.stream_slots if offload else 0
    return VramTerms(tuple(units), unit_bytes, tuple(stream_slot_bytes(inv, u) for u in units), slots, output_stage,
                     layer_stage, pool_bytes(inv, s), overhead_bytes, offload,
                     offload and n_outputs(s) >= OP_OFFLOAD_MIN_TOKENS)


def segment_copy_bytes(hp: Hyperparameters, s: Settings, n_cells: int) -> tuple[int, int]:
    """(K/V, mask) bytes the GPU's compute buffer holds while a prompt batch attends to `n_cells` host-segment cells on
    the GPU (patches/0012, OATO_SEGMENT_KV_OFFLOAD; flash attention on, as GPU plans run: with it off the scores and
    the transposed V's whole capacity would be copied too, and plans do not offload then). K/V: the scheduler's copy
    of one layer's K and V views (the widest layer's), freed after that layer's attention, and for a quantized cache
    the f16 conversion CUDA's batched flash-attention kernels make of it beside the copy. Mask: the copy of the
    segment's f16 mask columns, n_ubatch values a cell, made once a graph and read by every layer's attention."""
    types = host_kv_types(s)
    widest = max(kv_bytes_per_token(hp, il, *types) + _f16_conversion_bytes(hp, il, *types) for il in range(hp.n_layer))
    return widest * n_cells, 2 * effective_ubatch(s) * n_cells


def segment_offload_cells(hp: Hyperparameters, terms: VramTerms, on_gpu: Sequence, s: Settings, budget_bytes: int,
                          host_cells: int) -> int:
    """The most host-segment cells (a multiple of 256, at most `host_cells`) a prompt batch past the first segment
    may copy to the GPU, within the VRAM the placement leaves under the budget. The mask copy lives through the
    whole graph, so it comes on top of the layer stage and its weight copy; the K/V copy comes on top of the layer
    stage only: the scheduler starts a new split at every op whose weight it copies, so a weight's copy and the
    attention's inputs are never allocated together. 0 where op offload would not run a ubatch on the GPU."""
    if not (s.segment_cells and terms.offload):
        return 0
    vram = terms.of(on_gpu)
    room = usable_bytes(budget_bytes) - sum(vram.values())
    layer, copy = terms.layer_stage_bytes, terms.layer_copy(on_gpu)

    def growth(n: int) -> int:
        kv, mask = segment_copy_bytes(hp, s, n)
        return max(vram["compute"], layer + copy + mask, layer + kv + mask) - vram["compute"]

    cells = 0
    while cells + 256 <= host_cells and growth(cells + 256) <= room:
        cells += 256
    return cells


def tensor_alloc_bytes(ggml_type: str, shape: tuple[int, ...], n_bytes: int) -> int:
    """Bytes the CUDA backend allocates for a tensor: a quantized matrix whose rows are not a multiple of
    MATRIX_ROW_PADDING values gets one row's worth of padding at the end."""
    quantized = ggml_type not in ("F32", "F16", "BF16", "I8", "I16", "I32", "I64", "F64")
    if quantized and shape[0] % MATRIX_ROW_PADDING:
        return n_bytes + row_bytes(ggml_type, MATRIX_ROW_PADDING - shape[0] % MATRIX_ROW_PADDING)
    return n_bytes


def stream_slot_bytes(inv: ModelInventory, unit: Unit) -> int:
    """The staging slot a unit's host weights need: its largest tensor's allocation, aligned (each weight is uploaded
    into a slot of its own; 0 for a unit without weights)."""
    if unit.is_attention:
        return 0
    largest = max((tensor_alloc_bytes(t.ggml_type, t.shape, t.n_bytes) for t in map(inv.tensor, unit.tensors)),
                  default=0)
    return -(-largest // STREAM_SLOT_ALIGN) * STREAM_SLOT_ALIGN


def gpu_memory(inv: ModelInventory, units: Sequence[Unit], devices_of: dict[str, str], s: Settings,
               overhead_bytes: int) -> dict[str, int]:
    """VRAM by category (weights, kv, compute, pool, overhead) of a placement: unit key -> "CPU" or the GPU."""
    return vram_terms(inv, units, s, overhead_bytes).of([devices_of[u.key] != CPU for u in units])


def fits(inv: ModelInventory, units: Sequence[Unit], devices_of: dict[str, str], s: Settings,
         budget_bytes: int, overhead_bytes: int) -> bool:
    """Whether a placement keeps to the budget rule."""
    return sum(gpu_memory(inv, units, devices_of, s, overhead_bytes).values()) <= usable_bytes(budget_bytes)
