"""The segment KV cache in plans (patches/0007-0008): when it is a candidate, what it says to llama.cpp, and the note
that explains the choice.

A user who asks for a long context (`--ctx 32768`) but usually chats for far less pays llama.cpp's reservation of
the whole n_ctx on every layer's device. Segmented, each full-attention layer's cache is two buffers: cells [0, P)
stay with the layer (in VRAM when the layer is on the GPU), and the cells past P live in host memory, growing in
chunks, with their attention run on the CPU and merged exactly with the first segment's (only queries and partial
results cross). P is what the workload fills, so the planned chat runs the stock graph on a cache of P cells, and a
chat that outgrows P stays correct, only slower. The VRAM a plan holds does not grow with the chat either way.
"""

from __future__ import annotations

from .graph import CPU, model_units
from .machine import target_build
from .memory import KV_SEGMENT_GROWTH_CELLS, Settings, gpu_overhead_bytes, segment_offload_cells, vram_terms
from .schema import KvSegment, ModelInventory, Profile, Workload
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


def segments_available(profile: Profile) -> bool:
    """Whether the build plans are made for can put the second segment in host memory."""
    return KV_SEGMENT_PATCH in target_build(profile)


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


def segment_env(segments: tuple[KvSegment, ...]) -> dict[str, str]:
    """The environment the patched llama.cpp reads when it creates a context: what `load` sets, and what a llama.cpp
    command of the same build needs in front of it; nothing for the stock cache (the patched build's default)."""
    if not segments:
        return {}
    first, rest = segments[0], segments[-1]
    env = {"OATO_SEGMENT_KV": str(first.end_cell), "OATO_SEGMENT_KV_HOST": "1" if rest.device == "CPU" else "0",
           "OATO_SEGMENT_KV_CHUNK": str(rest.growth_cells)}
    if rest.offload_cells:
        env["OATO_SEGMENT_KV_OFFLOAD"] = str(rest.offload_cells)
    return env


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
                f"in host memory; {batches}); KV cache in VRAM {kv}; "
                f"best predicted {workload.objective} time: {times}",)
    return (f"segment KV cache considered (first segment {cells} cells) and not used: best predicted "
            f"{workload.objective} time: {times} (the stock cache is kept unless segments gain more than the "
            f"solver's gap)",)
