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

from .machine import target_build
from .memory import KV_SEGMENT_GROWTH_CELLS
from .schema import KvSegment, Profile, Workload
from .units import format_bytes

# The patch a build needs for a plan to put the second segment in host memory
KV_SEGMENT_PATCH = "segment-kv-placement"


def segment_cells_for(workload: Workload) -> int:
    """The first segment for a workload whose context (n_ctx_asked) is longer than what it uses: the cells it fills
    (depth, prompt, generation) rounded up to 256, so that a chat within them runs the stock graph (an empty second
    segment builds the stock nodes); 0 where the workload fills its context (segments would save nothing)."""
    used = -(-(workload.n_depth + workload.n_prompt + workload.n_gen) // 256) * 256
    return used if used < -(-workload.n_ctx // 256) * 256 else 0


def segments_available(profile: Profile) -> bool:
    """Whether the build plans are made for can put the second segment in host memory."""
    return KV_SEGMENT_PATCH in target_build(profile)


def segment_env(segments: tuple[KvSegment, ...]) -> dict[str, str]:
    """The environment the patched llama.cpp reads when it creates a context: what `load` sets, and what a llama.cpp
    command of the same build needs in front of it; nothing for the stock cache (the patched build's default)."""
    if not segments:
        return {}
    first, rest = segments[0], segments[-1]
    return {"OATO_SEGMENT_KV": str(first.end_cell), "OATO_SEGMENT_KV_HOST": "1" if rest.device == "CPU" else "0",
            "OATO_SEGMENT_KV_CHUNK": str(rest.growth_cells)}


def segment_note(solution, workload: Workload, profile: Profile) -> tuple[str, ...]:
    """Why the plan uses the segment KV cache or not, with the predicted times of both (solve.Solution)."""
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
        return (f"segment KV cache: cells 0-{cells} of each full-attention layer's cache stay with the layer, cells "
                f"{cells}-{workload.n_ctx} go to host memory in chunks of {KV_SEGMENT_GROWTH_CELLS} as a chat grows "
                f"past {cells} (their attention then runs on the CPU, still exact: decode about as fast as with the "
                f"whole cache in host memory, prompt batches past {cells} cells much slower, since the host "
                f"segment is never copied to the GPU); KV cache in VRAM {kv}; "
                f"best predicted {workload.objective} time: {times}",)
    return (f"segment KV cache considered (first segment {cells} cells) and not used: best predicted "
            f"{workload.objective} time: {times} (the stock cache is kept unless segments gain more than the "
            f"solver's gap)",)
