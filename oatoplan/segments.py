"""The segment KV cache in plans (patches/0007-0008, 0012): when it is a candidate, what it says to llama.cpp, and the
note that explains the choice.

A user who asks for a long context (`--ctx 32768`) but usually chats for far less pays llama.cpp's reservation of
the whole n_ctx on every layer's device. Segmented, each full-attention layer's cache is two buffers: cells [0, P)
stay with the layer (in VRAM when the layer is on the GPU), and the cells past P live in host memory, growing in
chunks, with their attention run on the CPU and merged exactly with the first segment's (only queries and partial
results cross). P is what the workload fills, so the planned chat runs the stock graph on a cache of P cells, and a
chat that outgrows P stays correct, only slower. A prompt batch past P copies the host cells to the GPU instead, a
layer at a time, while their copy fits the VRAM the placement leaves under the budget (`offload_cells`); past that,
the CPU. The VRAM a plan holds stays within its budget either way.
"""

from __future__ import annotations

from .cost import CostModel, kv_type
from .errors import PlanError
from .graph import CPU, model_units
from .inventory import KV_CACHE_TYPES, kv_cells
from .machine import target_build
from .memory import (KV_SEGMENT_GROWTH_CELLS, Settings, gpu_overhead_bytes, kv_split_bytes, segment_offload_cells,
                     vram_terms)
from .schema import Hyperparameters, KvSegment, ModelInventory, Profile, Workload
from .units import format_bytes

# The patch a build needs for a plan to put the second segment in host memory
KV_SEGMENT_PATCH = "segment-kv-placement"
# ... and to copy it to the GPU for a prompt batch (OATO_SEGMENT_KV_OFFLOAD)
KV_OFFLOAD_PATCH = "segment-kv-offload"


def segment_cells_for(workload: Workload) -> int:
    """The first segment for a workload whose context (n_ctx_asked) is longer than what it uses: the cells it fills
    (depth, prompt, generation) rounded up to 256, so that a chat within them runs the stock graph (an empty second
    segment builds the stock nodes); 0 where the workload fills its context (segments would save nothing)."""
    used = -(-(workload.n_depth + workload.n_prompt + workload.n_gen) // 256) * 256
    return used if used < -(-workload.n_ctx // 256) * 256 else 0


def kv_segments(inv: ModelInventory, n_ctx: int, n_ubatch: int, segment_cells: int, type_k: str, type_v: str,
                swa_full: bool, offload_cells: int = 0, host_types: tuple[str, str] | None = None
                ) -> tuple[KvSegment, ...]:
    """The segment KV cache's two segments for a first segment of `segment_cells` cells (0: none): [0, P) with each
    full-attention layer's KV cache, [P, n_ctx) in host memory (of `host_types`, default the cache's), growing,
    copied to the GPU for a prompt batch while it holds at most `offload_cells`; () where no layer's cache is longer
    than P."""
    s = Settings(n_ubatch, True, True, n_ctx, type_k, type_v, segment_cells=segment_cells)
    layers = tuple(il for il in range(inv.hparams.n_layer) if kv_split_bytes(inv.hparams, il, s, swa_full)[1])
    if not segment_cells or not layers:
        return ()
    end = kv_cells(inv.hparams, layers[0], n_ctx, n_ubatch, swa_full)
    host_k, host_v = host_types or (type_k, type_v)
    return (KvSegment(0, segment_cells, "layer", type_k, type_v, layers),
            KvSegment(segment_cells, end, CPU, host_k, host_v, layers, KV_SEGMENT_GROWTH_CELLS, offload_cells))


def host_types_for(cost: CostModel, hp: Hyperparameters, s: Settings) -> tuple[str, str] | None:
    """The host segment's K/V types for a cache of s's types: f16 where the user asked a quantized cache and the
    profile's CPU attends to one token over the whole context faster in f16 than in that type (a CPU that spends more
    dequantizing than it saves in bytes): more precise and faster past P, for 1.9x the host memory of q8_0 (and the
    PCIe bytes of a prompt batch's copy; its VRAM is less, with no f16 conversion beside it); else the cache's own
    (None), as on a build without patches/0010. The first segment, in VRAM with its layer, keeps the cache's types."""
    asked = kv_type(s)
    if (s.type_k, s.type_v) == ("f16", "f16") or asked == "F16" or not cost.kv_type_measured(CPU, asked) or \
            KV_TYPES_PATCH not in target_build(cost.profile):
        return None
    def one_token(t: str) -> float:      # noqa: E306
        return cost.attention_us(CPU, hp.head_dim_k, hp.n_head, max(hp.n_head_kv), s.n_ctx, 1, t)
    return ("f16", "f16") if one_token("F16") < one_token(asked) else None


def check_kv_segments(inv: ModelInventory, plan, source: str) -> None:
    """Refuse a plan's kv_segments that are not the two this llama.cpp sets up for its first segment (plan.Plan; a
    hand-set offload_cells is the user's call: the budget is not checked again here)."""
    if not plan.kv_segments:
        return
    p, rest = plan.kv_segments[0].end_cell, plan.kv_segments[-1]
    offload, host = rest.offload_cells, (rest.type_k, rest.type_v)
    if not set(host) <= set(KV_CACHE_TYPES):
        raise PlanError(f"{source}: kv_segments' host types {host} are not KV cache types of llama.cpp (one of "
                        f"{', '.join(KV_CACHE_TYPES)}); plan again, or fix them")
    expected = kv_segments(inv, plan.n_ctx, plan.n_ubatch, p, plan.type_k, plan.type_v, plan.swa_full, offload, host)
    if expected and not 0 <= offload <= expected[-1].end_cell - p:
        raise PlanError(f"{source}: kv_segments' offload_cells {offload} is outside 0..{expected[-1].end_cell - p} "
                        f"(the host segment's cells); plan again, or fix the number")
    if offload and not plan.flash_attn:
        raise PlanError(f"{source}: kv_segments' offload_cells {offload} needs flash attention (with it off the "
                        f"copy would not be bounded by it); set flash_attn true or offload_cells 0")
    if plan.kv_segments != expected:
        raise PlanError(f"{source}: kv_segments are not the two this llama.cpp sets up for a first segment of {p} "
                        f"cells (cells 0-{p} with each full-attention layer, the rest in host memory, the plan's "
                        f"KV types); plan again")


def segments_available(profile: Profile, workload: Workload | None = None) -> bool:
    """Whether the build plans are made for can put the second segment in host memory (and, for `workload`, whether
    its K type is one CUDA's segmented attention takes)."""
    return KV_SEGMENT_PATCH in target_build(profile) and (workload is None or workload.type_k in SEGMENT_K_TYPES)


def offload_cells_for(inv: ModelInventory, profile: Profile, s: Settings, unit_devices: dict[str, str],
                      budget_bytes: int) -> int:
    """The host segment's cells a prompt batch past the first segment may copy to the GPU: as many as the VRAM the
    placement leaves under the budget holds (memory.segment_offload_cells; GPU plans run flash attention, which that
    count assumes); 0 for a build without the patch."""
    if not s.segment_cells or KV_OFFLOAD_PATCH not in target_build(profile):
        return 0
    units = model_units(inv)
    terms = vram_terms(inv, units, s, gpu_overhead_bytes(profile))
    host_cells = -(-s.n_ctx // 256) * 256 - s.segment_cells
    return segment_offload_cells(inv.hparams, terms, [unit_devices[u.key] != CPU for u in units], s, budget_bytes,
                                 host_cells)


# every variable segment_env may set (load unsets the others, so that none leaks in from the user's shell)
SEGMENT_ENV_KEYS = ("OATO_SEGMENT_KV", "OATO_SEGMENT_KV_HOST", "OATO_SEGMENT_KV_CHUNK", "OATO_SEGMENT_KV_OFFLOAD",
                    "OATO_SEGMENT_KV_TYPES1")
# the K types whose segmented attention CUDA's log-sum-exp pass takes (native/ggml-cuda/oato-fattn-lse.cu); with any
# other, segment 0's attention would fall back to the CPU, reading the cache from VRAM
SEGMENT_K_TYPES = ("f16", "q8_0")
# the patch a build needs for the host segment's own types
KV_TYPES_PATCH = "segment-kv-types"


def segment_env(segments: tuple[KvSegment, ...]) -> dict[str, str]:
    """The environment the patched llama.cpp reads when it creates a context: what `load` sets, and what a llama.cpp
    command of the same build needs in front of it; nothing for the stock cache (the patched build's default)."""
    if not segments:
        return {}
    first, rest = segments[0], segments[-1]
    env = {"OATO_SEGMENT_KV": str(first.end_cell), "OATO_SEGMENT_KV_HOST": "1" if rest.device == "CPU" else "0",
           "OATO_SEGMENT_KV_CHUNK": str(rest.growth_cells)}
    if (rest.type_k, rest.type_v) != (first.type_k, first.type_v):
        env["OATO_SEGMENT_KV_TYPES1"] = f"{rest.type_k},{rest.type_v}"
    if rest.offload_cells:
        env["OATO_SEGMENT_KV_OFFLOAD"] = str(rest.offload_cells)
    return env


def _host_types_note(s: Settings) -> str:
    if not s.host_kv_types:
        return ""
    return (f"; the host cells are {'/'.join(s.host_kv_types)}, not {s.type_k}/{s.type_v}: this profile's CPU "
            f"attends over them faster so (and they are more precise), for more host memory")


def segment_note(solution, workload: Workload, profile: Profile, offload_cells: int = 0,
                 offload_bytes: int = 0) -> tuple[str, ...]:
    """Why the plan uses the segment KV cache or not, with the predicted times of both (solve.Solution), and how far
    past the first segment a prompt batch still attends on the GPU (`offload_cells`, offload_cells_for, whose copy
    takes `offload_bytes` of VRAM)."""
    if workload.n_ctx_asked <= workload.n_depth + workload.n_prompt + workload.n_gen:
        return ()
    cells = segment_cells_for(workload)
    if not cells:
        return (f"segment KV cache: not used, the workload fills its n_ctx of {workload.n_ctx} (after rounding to "
                f"256 cells)",)
    if not segments_available(profile):
        return (f"segment KV cache: not available in {target_build(profile) or 'this build'} (it needs oatoplan's "
                f"patch {KV_SEGMENT_PATCH}: oatoplan build); the whole n_ctx {workload.n_ctx} is reserved",)
    if not segments_available(profile, workload):
        return (f"segment KV cache: not used with K cache type {workload.type_k} (its segmented attention on CUDA "
                f"takes {' or '.join(SEGMENT_K_TYPES)} only); the whole n_ctx {workload.n_ctx} is reserved",)
    best = {}
    for s, t_us in solution.candidates:
        key = bool(s.segment_cells)
        best[key] = min(best.get(key, float("inf")), t_us)
    times = ", ".join(f"{'segmented' if k else 'stock cache'} {t / 1e3:,.1f} ms" for k, t in sorted(best.items()))
    kv = format_bytes(solution.prediction.gpu_bytes.get("kv", 0))
    if solution.settings.segment_cells:
        if offload_cells:
            batches = (f"a prompt batch attends to them on the GPU, their K/V copied there one layer at a time, up "
                       f"to {offload_cells} host cells (cell {cells + offload_cells}; the copy's "
                       f"{format_bytes(offload_bytes)} fit in the budget), on the CPU past them, much slower")
        else:
            batches = (f"prompt batches past {cells} cells much slower, since the host segment is not copied to the "
                       f"GPU (no VRAM left under the budget for the copy, or a build without oatoplan's patch "
                       f"{KV_OFFLOAD_PATCH})")
        return (f"segment KV cache: cells 0-{cells} of each full-attention layer's cache stay with the layer, cells "
                f"{cells}-{workload.n_ctx} go to host memory in chunks of {KV_SEGMENT_GROWTH_CELLS} as a chat grows "
                f"past {cells} (decode attends to them on the CPU, still exact, about as fast as with the whole cache "
                f"in host memory; {batches}){_host_types_note(solution.settings)}; KV cache in VRAM {kv}; "
                f"best predicted {workload.objective} time: {times}",)
    return (f"segment KV cache considered (first segment {cells} cells) and not used: best predicted "
            f"{workload.objective} time: {times} (the stock cache is kept unless segments gain more than the "
            f"solver's gap)",)
