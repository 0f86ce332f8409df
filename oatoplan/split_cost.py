"""Stage 3b's prices: what a placement over several accelerators (more local GPUs, llama.cpp RPC devices) and the CPU
costs, in time (predict_split) and in memory on each device (device_memory), with each device's link as the profile
measured it (links). split.py's program, llama.cpp's own splits and `bench` over several devices all price through
these.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .cost import CostModel, fixed_time_us, ubatches, unit_time_us
from .errors import ProfileError
from .graph import CPU, Unit, model_units
from .memory import Settings, compute_stage_bytes, gpu_overhead_bytes, kv_layer_bytes, pool_bytes
from .names import is_rpc
from .schema import DeviceLink, ModelInventory, Prediction, Workload

ACTIVATION_BYTES = 4            # the hidden state crosses as f32: n_embd x 4 bytes per token

@dataclass(frozen=True)
class Link:
    """One accelerator as the program prices it."""
    device: str
    local_gpu: bool                # a GPU of this process (op offload, the CUDA pool and per-process overhead)
    prefill_crossing_us: float     # one crossing of its link with one ubatch of activations
    decode_crossing_us: float      # one crossing with one token's


def links(cost: CostModel, inv: ModelInventory, devices: list[str], s: Settings) -> list[Link]:
    """Each device's link: the profiled GPU's measured crossing (as cost.predict charges it), the others' fixed
    cost plus the activations at the link's rate."""
    profile, found = cost.profile, {link.device: link for link in cost.profile.devices}
    token_bytes = inv.hparams.n_embd * ACTIVATION_BYTES
    out = []
    for d in devices:
        if d == profile.gpu_device:
            out.append(Link(d, True, cost.crossing_us, cost.decode_crossing_us))
            continue
        if d not in found:
            known = ", ".join([profile.gpu_device] * bool(profile.gpu_device) + list(found)) or "no accelerator"
            raise ProfileError(f"profile {profile.profile_id} has no timings for {d} (it has {known}): measure a "
                               f"profile with it (`oatoplan profile run --device {shlex.quote(d)}`) or leave it out")
        link: DeviceLink = found[d]
        per_byte = 0.5 / link.h2d_bytes_per_s + 0.5 / link.d2h_bytes_per_s      # one way, either direction
        out.append(Link(d, not is_rpc(d), link.crossing_us + token_bytes * s.n_ubatch * per_byte * 1e6,
                        link.decode_crossing_us + token_bytes * per_byte * 1e6))
    return out


def device_memory(inv: ModelInventory, units: list[Unit], placement: dict[str, str], s: Settings,
                  device_links: list[Link], overhead_bytes: int) -> dict[str, dict[str, int]]:
    """VRAM by category on each device of a placement (memory.py's terms, per device): weights and KV where they
    are; the compute buffer of a device with layers (and the output stage where `output` runs); the first local GPU
    also holds op offload's largest host weight copy; local GPUs the CUDA pool and the process's overhead."""
    output_stage, layer_stage = compute_stage_bytes(inv, s)
    hp, first_gpu = inv.hparams, next((x.device for x in device_links if x.local_gpu), None)
    offload = bool(first_gpu) and s.op_offload and s.n_ubatch >= 32
    out = {}
    for link in device_links:
        d = link.device
        mine = [u for u in units if placement[u.key] == d]
        weights = sum(u.n_bytes for u in mine if not u.is_attention)
        kv = sum(kv_layer_bytes(hp, u.layer, s.n_ctx, s.n_ubatch, s.type_k, s.type_v) for u in mine
                 if u.is_attention)
        used = bool(mine) or (offload and d == first_gpu)
        copy = max((u.n_bytes for u in units if placement[u.key] == CPU and u.matrices and not u.is_output),
                   default=0) if offload and d == first_gpu else 0
        has_output = any(u.is_output for u in mine)
        compute = max(output_stage if has_output else 0, layer_stage + copy if used else 0)
        out[d] = {"weights": weights, "kv": kv, "compute": compute,
                  "pool": pool_bytes(inv, s) if used else 0,
                  "overhead": overhead_bytes if used and link.local_gpu else 0}
    return out


def layer_counts(units: list[Unit], placement: dict[str, str], devices: list[str]) -> tuple[int, ...]:
    """tensor_split as layer counts: each device's KV layers, `output` counted with the last device that has any."""
    counts = [sum(1 for u in units if u.is_attention and placement[u.key] == d) for d in devices]
    last = max((i for i, c in enumerate(counts) if c), default=0)
    counts[last] += 1
    return tuple(counts)


def decode_rescale(cost: CostModel, device: str) -> float:
    """cost.unit_time_us's decode on `device` (the GPU's calibration) -> this device's: its class's calibration
    (DeviceLink.decode_class: an RPC device with the CPU's mat-vec speed decodes like the CPU); 1 for the others."""
    link = next((x for x in cost.profile.devices if x.device == device), None)
    if link is None:
        return 1.0
    return cost.decode_factor(link.decode_class) / cost.decode_factor("gpu")


def predict_split(cost: CostModel, inv: ModelInventory, placement: dict[str, str], workload: Workload,
                  s: Settings, device_links: list[Link]) -> tuple[Prediction, dict[str, dict[str, int]]]:
    """Predicted time and per-device VRAM of a placement over several devices."""
    units, by_device = model_units(inv), {x.device: x for x in device_links}
    prefill = decode = 0.0
    for u in units:
        d = placement[u.key]
        p, t = unit_time_us(cost, inv, u, d, workload, s)
        prefill, decode = prefill + p, decode + t * decode_rescale(cost, d)
    n_ub = len(ubatches(workload.n_prompt, s.n_ubatch))
    path = [CPU] + [placement[u.key] for u in units] + [CPU]      # the input lookup and the logits are on the CPU
    n_crossings = 0
    for a, b in zip(path, path[1:]):
        for d in {a, b} - {CPU} if a != b else ():
            prefill += n_ub * by_device[d].prefill_crossing_us
            decode += by_device[d].decode_crossing_us
            n_crossings += 1
    fixed_prefill, fixed_decode = fixed_time_us(cost, inv, workload, s, cost.gpu is not None)
    prefill, decode = prefill + fixed_prefill, decode + fixed_decode
    memory = device_memory(inv, units, placement, s, device_links, gpu_overhead_bytes(cost.profile))
    totals: dict[str, int] = {}
    for categories in memory.values():
        for k, v in categories.items():
            totals[k] = totals.get(k, 0) + v
    return Prediction(prefill_s=prefill * 1e-6, decode_s_per_token=decode * 1e-6,
                      prefill_tokens_per_s=workload.n_prompt / (prefill * 1e-6), decode_tokens_per_s=1e6 / decode,
                      total_s=(prefill + workload.n_gen * decode) * 1e-6, gpu_bytes=totals,
                      n_crossings=n_crossings), memory

