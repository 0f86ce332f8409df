"""The time model: a Profile turned into the time of any operator the planner asks about, and the predicted time
of a placement of a model's units (graph.py) for a workload. VRAM is memory.py's.

Time of an op between measured points: log-log interpolation over the token count (and KV length), linear scaling
beyond the largest measured point; a weight shape that was not measured is scaled from the nearest measured one by
its number of weights, a weight type that was not measured from the nearest type by bytes per weight.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import defaultdict

from .ggml import row_bytes
from .graph import CPU, Unit, active_bytes, crossings, expected_touched, is_expert, is_router, model_units
from .inventory import kv_bytes_per_token
from .memory import OP_OFFLOAD_MIN_TOKENS, Settings, gpu_memory, gpu_overhead_bytes
from .schema import ModelInventory, Prediction, Profile, Workload

# Classes of decode work that a profile's calibration scales separately (oatoplan/calibrate.py): the GPU's units and
# the CPU's units; a decode crossing gets its own calibrated cost.
DECODE_CLASSES = ("gpu", "cpu")


def _loglog(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise log-log interpolation through (xs, ys), xs ascending; below the first point the first value (a
    latency floor), above the last point proportional scaling."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], max(ys[i - 1], 1e-9), max(ys[i], 1e-9)
    f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))


def _bytes_per_weight(ggml_type: str) -> float:
    return row_bytes(ggml_type, 256) / 256


class CostModel:
    """Times in microseconds from a Profile, for the CPU and the profiled GPU."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.gpu = profile.gpu_device or None
        self._matmul: dict[tuple[str, str], dict[tuple[int, int], tuple[list, list]]] = defaultdict(dict)
        self._attn: dict[tuple[str, str], dict[int, tuple[list, list]]] = defaultdict(dict)   # (device, K/V type)
        self._attn_layout: dict[str, tuple[int, ...]] = {}
        self._elementwise: dict[tuple[str, str], tuple[list, list]] = {}
        points = defaultdict(list)
        for o in profile.ops:
            if o.op == "MUL_MAT":
                points[("mm", o.device, o.ggml_type, o.shape)].append((o.n_tokens, o.t_us))
            elif o.op == "FLASH_ATTN_EXT":
                points[("fa", (o.device, o.ggml_type.upper()), o.n_tokens)].append((o.shape[3], o.t_us))
                self._attn_layout[o.device] = tuple(o.shape[:3])
            else:   # element-wise: by total elements
                points[("ew", o.device, o.op)].append((o.shape[0] * o.n_tokens, o.t_us))
        for key, pts in points.items():
            pts.sort()
            series = ([float(x) for x, _ in pts], [y for _, y in pts])
            if key[0] == "mm":
                self._matmul[(key[1], key[2])][key[3]] = series
            elif key[0] == "fa":
                self._attn[key[1]][key[2]] = series
            else:
                self._elementwise[(key[1], key[2])] = series
        self._transfer = {}
        for direction in ("h2d", "d2h"):
            for memory in ("pinned", "pageable", "pinned-busy"):
                pts = sorted((t.n_bytes, t.t_us) for t in profile.transfers
                             if t.direction == direction and t.memory == memory)
                if len(pts) >= 2:
                    (b0, t0), (b1, t1) = pts[0], pts[-1]
                    per_byte = (t1 - t0) / (b1 - b0)
                    self._transfer[(direction, memory)] = (max(t0 - per_byte * b0, 0.0), per_byte)

    def devices(self) -> list[str]:
        return [CPU] + ([self.gpu] if self.gpu else [])

    def matmul_us(self, device: str, ggml_type: str, k: int, n: int, n_tokens: int) -> float:
        types = {t for d, t in self._matmul if d == device}
        if not types:
            raise KeyError(f"no MUL_MAT measured on {device}")
        measured_type = ggml_type if ggml_type in types else min(
            types, key=lambda t: abs(_bytes_per_weight(t) - _bytes_per_weight(ggml_type)))
        shapes = self._matmul[(device, measured_type)]
        shape = (k, n) if (k, n) in shapes else min(shapes, key=lambda s: abs(math.log(s[0] * s[1] / (k * n))))
        t = _loglog(*shapes[shape], n_tokens) * (k * n) / (shape[0] * shape[1])
        if measured_type != ggml_type and n_tokens < OP_OFFLOAD_MIN_TOKENS:   # small batches are bandwidth-bound
            t *= _bytes_per_weight(ggml_type) / _bytes_per_weight(measured_type)
        return t

    def _moe_points(self) -> dict:
        """MUL_MAT_ID, EXPERT_UPLOAD points by (op, device, type) -> shape -> series (profile_moe.py); built once."""
        if not hasattr(self, "_moe"):
            points = defaultdict(list)
            for o in self.profile.ops:
                if o.op in ("MUL_MAT_ID", "EXPERT_UPLOAD"):
                    points[(o.op, o.device, o.ggml_type, o.shape)].append((o.n_tokens, o.t_us))
            self._moe: dict = defaultdict(dict)
            for (op, device, ggml_type, shape), pts in points.items():
                pts.sort()
                self._moe[(op, device, ggml_type)][shape] = ([float(x) for x, _ in pts], [y for _, y in pts])
        return self._moe

    def mul_mat_id_us(self, device: str, ggml_type: str, k: int, n: int, n_expert: int, n_used: int,
                      n_tokens: int) -> float:
        """MUL_MAT_ID of n_tokens tokens, n_used of n_expert (K, N) experts each, routed uniformly: measured
        (profile_moe.py; another shape scaled by its weights per expert, another type from the nearest by bytes per
        weight), else, for a profile without it, the dense matmul of n_used experts' rows."""
        measured = {t: shapes for (op, d, t), shapes in self._moe_points().items() if op == "MUL_MAT_ID" and d == device}
        if not measured:
            return self.matmul_us(device, ggml_type, k, n * n_used, n_tokens)
        measured_type = ggml_type if ggml_type in measured else min(
            measured, key=lambda t: abs(_bytes_per_weight(t) - _bytes_per_weight(ggml_type)))
        shapes = measured[measured_type]
        shape = (k, n, n_expert, n_used)
        if shape not in shapes:
            shape = min(shapes, key=lambda s: (s[2:] != (n_expert, n_used), abs(math.log(s[0] * s[1] / (k * n)))))
        t = _loglog(*shapes[shape], n_tokens) * (k * n) / (shape[0] * shape[1])
        if measured_type != ggml_type and n_tokens < OP_OFFLOAD_MIN_TOKENS:
            t *= _bytes_per_weight(ggml_type) / _bytes_per_weight(measured_type)
        return t

    def expert_upload_us(self, n_touched: float, expert_bytes: int, n_expert: int, pinned: bool) -> float:
        """Op offload's copy of n_touched experts of expert_bytes each from host memory: measured for this expert
        size (pinned; pageable memory scaled by the measured pageable/pinned rate), else one transfer of their
        bytes."""
        n_bytes = n_touched * expert_bytes
        measured = [s for (op, d, _), shapes in self._moe_points().items() if op == "EXPERT_UPLOAD" and d == self.gpu
                    for s in shapes.items() if s[0] == (expert_bytes, n_expert)]
        if not measured:
            return self.transfer_us(int(n_bytes), "h2d", pinned)
        t = _loglog(*measured[0][1], max(n_touched, 1.0))
        return t if pinned else t * self.transfer_us(int(n_bytes), "h2d", False) / self.transfer_us(int(n_bytes))

    def attention_us(self, device: str, head_dim: int, n_head: int, n_head_kv: int, n_kv: int,
                     n_tokens: int, kv_type: str = "F16") -> float:
        """Flash attention of n_tokens queries over n_kv cached tokens, one layer: one token over a K/V type the
        profile timed (kv_type_measured) from those points, anything else from the f16 points."""
        typed = self._attn.get((device, kv_type.upper()), {})
        by_tokens = typed if n_tokens == 1 and 1 in typed else self._attn[(device, "F16")]
        token_counts = sorted(by_tokens)
        times = [_loglog(*by_tokens[n], max(n_kv, 1)) for n in token_counts]
        t = _loglog([float(n) for n in token_counts], times, n_tokens)
        p_dim, p_head, p_head_kv = self._attn_layout[device]
        # one token reads the cache (scale by KV width); many tokens compute (scale by query width)
        scale = (n_head_kv * head_dim) / (p_head_kv * p_dim) if n_tokens == 1 else (n_head * head_dim) / (p_head * p_dim)
        return t * scale

    def kv_type_measured(self, device: str, kv_type: str) -> bool:
        """Whether one-token attention over a K/V cache of kv_type was timed on `device`."""
        return 1 in self._attn.get((device, kv_type.upper()), {})

    def elementwise_us(self, device: str, op: str, n_elements: int) -> float:
        return _loglog(*self._elementwise[(device, op)], max(n_elements, 1))

    def transfer_us(self, n_bytes: int, direction: str = "h2d", pinned: bool = True) -> float:
        latency, per_byte = self._transfer[(direction, "pinned" if pinned else "pageable")]
        return latency + per_byte * n_bytes

    def stream_upload_us(self, n_bytes: int) -> float:
        """A streamed upload from pinned memory while the GPU computes: the profile's rate measured that way
        ("pinned-busy"), else the idle pinned rate."""
        latency, per_byte = self._transfer.get(("h2d", "pinned-busy"), self._transfer[("h2d", "pinned")])
        return latency + per_byte * n_bytes

    def decode_factor(self, decode_class: str) -> float:
        """Calibrated factor of a class's decode time (1 without calibration)."""
        return self.profile.decode_factors.get(decode_class, 1.0)

    def launch_us(self, device: str) -> float:
        return self.profile.launch_us.get(device, 0.0)

    @property
    def stream_split_us(self) -> float:
        """The fixed cost of one streamed upload, calibrated on a real model (calibrate.measure_stream_split), paid on
        both streams: by its split on the compute stream (the scheduler's split switch, the event wait and record, the
        small kernels around it) and by the upload on the copy stream (its slot wait, copy issue and event); the three
        streamed bench arms fit that form, not the compute stream alone (benchmarks/stream_predict_check.py).
        0: not measured (streamed splits are then priced by crossings)."""
        split = self.profile.stream_split
        return max(split.split_us, 0.0) if split else 0.0

    @property
    def crossing_us(self) -> float:
        """One CPU<->GPU crossing in a prefill graph (measured back to back)."""
        return self.profile.crossing_us

    @property
    def decode_crossing_us(self) -> float:
        """One crossing in a decode graph: calibrated on real decodes where the profile has that (the CPU threads
        go to sleep during each GPU phase and must be woken), else the measured back-to-back crossing."""
        return self.profile.decode_crossing_us or self.profile.crossing_us


def cpu_cost_model(profile: Profile) -> CostModel:
    """The CPU side of a profile alone: a run with no GPU (a CPU-only build, or a GPU build with nothing offloaded
    and op offload off, so that no op and no graph launch goes to the GPU)."""
    return CostModel(dataclasses.replace(profile, gpu_device=""))


def decode_class(unit: Unit, device: str) -> str:
    """The DECODE_CLASSES entry of a unit's decode work on `device`."""
    return "cpu" if device == CPU else "gpu"


# ---------------------------------------------------------------------------------------------------------------
# Unit costs for a workload

def ubatches(n_prompt: int, n_ubatch: int) -> list[int]:
    return [min(n_ubatch, n_prompt - start) for start in range(0, n_prompt, n_ubatch)]


def _offloaded(cost: CostModel, device: str, s: Settings, n_tokens: int) -> bool:
    """Whether op offload takes a host unit's ops in a batch of n_tokens to the GPU."""
    return device == CPU and bool(cost.gpu) and s.op_offload and n_tokens >= OP_OFFLOAD_MIN_TOKENS


def streamed(cost: CostModel, unit: Unit, device: str, s: Settings, n_tokens: int) -> bool:
    """Whether a unit's weights are uploaded by weight streaming (on the copy stream) in a batch of n_tokens. A norm's
    weight streams too: op offload takes its MUL to the GPU like a matmul, and the scheduler gives it a split."""
    return bool(s.stream_slots) and bool(unit.tensors) and not unit.is_output and not unit.is_attention \
        and _offloaded(cost, device, s, n_tokens)


def split_priced(cost: CostModel, s: Settings, n_tokens: int) -> bool:
    """Whether a ubatch of n_tokens prices its streamed splits by the profile's stream_split_us rather than by
    CPU/GPU crossings: it streams, and the profile measured that cost."""
    return bool(s.stream_slots) and cost.stream_split_us > 0 and _offloaded(cost, CPU, s, n_tokens)


def prefill_crossings(cost: CostModel, units: list[Unit], devices: dict[str, str], s: Settings,
                      n_tokens: int) -> int:
    """CPU<->GPU crossings of one prefill ubatch of n_tokens. Where it is split_priced, op offload runs every host
    unit but the output matrix on the GPU, and each host tensor's split is priced by stream_split_us
    (unit_ubatch_us): only the graph's real changes of device count (from the input lookup on the CPU, to a host
    output matrix), not each alternation of units, which would count those splits twice. Otherwise every CPU/GPU
    alternation of units counts, as in decode."""
    if split_priced(cost, s, n_tokens):
        return crossings(cost.gpu if devices[u.key] == CPU and not u.is_output else devices[u.key] for u in units)
    return crossings(devices[u.key] for u in units)


def unit_ubatch_us(cost: CostModel, inv: ModelInventory, unit: Unit, device: str, s: Settings, n_tokens: int,
                   depth: int) -> tuple[float, float]:
    """(time on the compute stream, streamed upload time on the copy stream) of one prefill ubatch of n_tokens after
    `depth` cached tokens, in microseconds. A host-resident matrix in a batch of >= 32 tokens with op offload on is
    copied to the GPU and multiplied there: on the compute stream (stock llama.cpp), or on the copy stream when
    the plan streams weights."""
    hp = inv.hparams
    offload = _offloaded(cost, device, s, n_tokens)
    if unit.is_attention:
        # causal mask: the ubatch sees what came before and, on average, half of itself (assumed: the
        # flash-attention kernels skip masked blocks; not measured on its own). With op offload, a host layer's
        # attention in a large batch follows its offloaded Q/K/V to the GPU: the cache is copied up (the KV cache is
        # not a weight: never streamed), attention runs there (layer offload against all-GPU attention:
        # benchmarks/results/archive/2026-11-22-h100-bench-qwen2-7b-pp512.json)
        head_kv = hp.n_head_kv[unit.layer]
        t = cost.transfer_us((depth + n_tokens) * kv_bytes_per_token(hp, unit.layer, s.type_k, s.type_v), "h2d",
                             s.pinned) if offload else 0.0
        t += cost.attention_us(cost.gpu if offload else device, hp.head_dim_k, hp.n_head, head_kv,
                               depth + n_tokens // 2, n_tokens)
        return t + sum(cost.elementwise_us(device, op, width * n_tokens) for op, width in unit.elementwise), 0.0
    if is_expert(unit) or is_router(unit):
        return _moe_ubatch_us(cost, inv, unit, device, s, n_tokens)
    moved = offload and bool(unit.matrices)
    compute = sum(cost.matmul_us(cost.gpu if moved else device, *m, n_tokens) for m in unit.matrices)
    # with op offload every op that reads a host weight at >= 32 tokens moves to the GPU, and the scheduler puts the
    # element-wise ops around it there too
    compute += sum(cost.elementwise_us(cost.gpu if offload else device, op, width * n_tokens)
                   for op, width in unit.elementwise)
    if streamed(cost, unit, device, s, n_tokens):    # each host tensor its own upload and split
        split = len(unit.tensors) * cost.stream_split_us
        return compute + split, cost.stream_upload_us(unit.n_bytes) + split
    return compute + (cost.transfer_us(unit.n_bytes, "h2d", s.pinned) if moved else 0.0), 0.0


def kv_type(s: Settings) -> str:
    """The K/V type attention is priced for: the cache's, when K and V share it; else f16."""
    return s.type_k.upper() if s.type_k == s.type_v else "F16"


# One-token attention is timed over f16 and over this quantized cache type (-ctk q8_0 -ctv q8_0, the common choice):
# decode reads the cache, whose bytes the type sets. A batch over a quantized cache is priced as over f16 (CUDA converts
# it to f16 first)
ATTN_QUANTIZED_TYPE = "Q8_0"


def kv_type_note(cost: CostModel, s: Settings) -> tuple[str, ...]:
    """Says so when decode attention over the plan's K/V types is priced from another type's timings."""
    if (s.type_k, s.type_v) == ("f16", "f16"):
        return ()
    devices = [d for d in (CPU, cost.gpu) if d]
    if s.type_k != s.type_v or not all(cost.kv_type_measured(d, kv_type(s)) for d in devices):
        return (f"KV cache {s.type_k}/{s.type_v}: attention is priced from the f16 timings (profile "
                f"{cost.profile.profile_id} has no one-token attention over {s.type_k}/{s.type_v} on "
                f"{' and '.join(devices)}); the cache's bytes are counted for its types",)
    return ()


def unit_time_us(cost: CostModel, inv: ModelInventory, unit: Unit, device: str, workload: Workload,
                 s: Settings) -> tuple[float, float]:
    """(prefill time for the whole prompt, decode time per token averaged over the generated tokens) of one unit on
    `device`, in microseconds. Prefill counts the compute stream's time and, with weight streaming, the copy
    stream's uploads (their overlap is stream_prefill_us's, for a whole placement)."""
    hp = inv.hparams
    if unit.is_attention:
        decode_depth = workload.n_depth + workload.n_prompt + workload.n_gen / 2   # attention is linear in depth
        decode = cost.attention_us(device, hp.head_dim_k, hp.n_head, hp.n_head_kv[unit.layer], int(decode_depth), 1,
                                   kv_type(s))
    elif is_expert(unit) or is_router(unit):
        decode = _weights_us(cost, inv, unit, device, 1)      # one token reads n_used experts
    else:
        decode = sum(cost.matmul_us(device, *m, 1) for m in unit.matrices)
    decode += sum(cost.elementwise_us(device, op, width) for op, width in unit.elementwise)
    decode *= cost.decode_factor(decode_class(unit, device))
    if unit.is_output:     # logits only for the last prompt token
        return decode, decode
    return sum(c + u for c, u in unit_prefill_us(cost, inv, unit, device, workload, s)), decode


def unit_prefill_us(cost: CostModel, inv: ModelInventory, unit: Unit, device: str, workload: Workload,
                    s: Settings) -> list[tuple[float, float]]:
    """unit_ubatch_us of every ubatch of the prompt (the output matrix: logits of the last token only)."""
    if unit.is_output:
        n_ub = len(ubatches(workload.n_prompt, s.n_ubatch))
        return [(0.0, 0.0)] * (n_ub - 1) + [(unit_time_us(cost, inv, unit, device, workload, s)[0], 0.0)]
    parts, depth = [], workload.n_depth
    for n in ubatches(workload.n_prompt, s.n_ubatch):
        parts.append(unit_ubatch_us(cost, inv, unit, device, s, n, depth))
        depth += n
    return parts


def stream_prefill_us(parts: list[tuple[float, float]], n_slots: int) -> float:
    """One ubatch on two streams, units in graph order, parts[i] = (compute, upload) of unit i: the copy stream
    uploads in order, each into the next of n_slots slots once that slot's last reader has run; the compute stream
    runs each unit once its upload is done. A slot's reader is the scheduler's split that copied the weight in,
    which runs on to the next host weight (a host matrix starts a split; the GPU-resident ops after it join it):
    its slot is free only when the compute stream reaches the next streamed unit."""
    copy_done = compute_done = 0.0
    slot_free = [0.0] * max(n_slots, 1)
    k, reading = 0, None
    for compute, upload in parts:
        if upload > 0:
            if reading is not None:
                slot_free[reading] = compute_done
            copy_done = max(copy_done, slot_free[k]) + upload
            compute_done = max(compute_done, copy_done) + compute
            reading, k = k, (k + 1) % len(slot_free)
        else:
            compute_done += compute
    return compute_done


def _per_tensor(cost: CostModel, inv: ModelInventory, unit: Unit,
                part: tuple[float, float]) -> list[tuple[float, float]]:
    """A streamed unit's (compute, upload) as the scheduler runs it: each host tensor (a matrix, its bias) is an upload
    of its own into a slot of its own and a split of its own (stream_split_us each on both streams), the unit's
    compute after the largest one's."""
    compute, upload = part
    if upload <= 0 or len(unit.tensors) < 2:
        return [part]
    split = cost.stream_split_us
    sizes = sorted((inv.tensor(name).n_bytes for name in unit.tensors), reverse=True)
    return [(compute - split * (len(sizes) - 1), cost.stream_upload_us(sizes[0]) + split)] + \
        [(split, cost.stream_upload_us(b) + split) for b in sizes[1:]]


def _expert_matrices(inv: ModelInventory, unit: Unit) -> list[tuple[str, int, int, int]]:
    """(type, K, N, n_expert) of each routed-expert weight of a unit."""
    return [(t.ggml_type, t.shape[0], t.shape[1], t.shape[2]) for t in map(inv.tensor, unit.tensors)
            if t.op == "MUL_MAT_ID" and len(t.shape) == 3]


def _weights_us(cost: CostModel, inv: ModelInventory, unit: Unit, device: str, n_tokens: int) -> float:
    """The weight ops of an expert or router unit for a batch: MUL_MAT_ID (at the batch's touched experts), or the
    router's MUL_MAT and its top-k selection (MOE_ROUTE, where the profile measured it)."""
    hp = inv.hparams
    if is_expert(unit):
        return sum(cost.mul_mat_id_us(device, t, k, n, e, hp.n_expert_used, n_tokens)
                   for t, k, n, e in _expert_matrices(inv, unit))
    route = cost.elementwise_us(device, "MOE_ROUTE", hp.n_expert * n_tokens) \
        if (device, "MOE_ROUTE") in cost._elementwise else 0.0
    return sum(cost.matmul_us(device, *m, n_tokens) for m in unit.matrices) + route


def _moe_ubatch_us(cost: CostModel, inv: ModelInventory, unit: Unit, device: str, s: Settings,
                   n_tokens: int) -> tuple[float, float]:
    """unit_ubatch_us of a block's routed experts (one of gate/up/down) or its router: MUL_MAT_ID at the ubatch's
    touched experts. A host expert tensor with op offload on is copied to the GPU: the stock scheduler copies only
    the touched experts' rows, E * (1 - (1 - k/E)^T) of them, on the compute stream; weight streaming uploads the
    whole tensor on the copy stream (the touched experts are known only once the router has run)."""
    offload = _offloaded(cost, device, s, n_tokens)
    run_on = cost.gpu if offload else device
    compute = _weights_us(cost, inv, unit, run_on, n_tokens)
    compute += sum(cost.elementwise_us(run_on, op, width * n_tokens) for op, width in unit.elementwise)
    if streamed(cost, unit, device, s, n_tokens):
        split = len(unit.tensors) * cost.stream_split_us
        return compute + split, cost.stream_upload_us(unit.n_bytes) + split
    if offload and is_expert(unit):
        touched = expected_touched(inv.hparams.n_expert, inv.hparams.n_expert_used, n_tokens)
        compute += sum(cost.expert_upload_us(touched, row_bytes(t, k) * n_out, e, s.pinned)
                       for t, k, n_out, e in _expert_matrices(inv, unit))
    elif offload:
        compute += cost.transfer_us(unit.n_bytes, "h2d", s.pinned)
    return compute, 0.0


def fixed_time_us(cost: CostModel, inv: ModelInventory, workload: Workload, s: Settings,
                  uses_gpu: bool) -> tuple[float, float]:
    """Time that no placement changes: the input embedding lookup on the CPU and the graph launches."""
    n_embd = inv.hparams.n_embd
    # one graph launch per token on the GPU; a CPU split's launch is part of the measured crossing
    launches = cost.launch_us(cost.gpu) if uses_gpu and cost.gpu else cost.launch_us(CPU)
    prefill = sum(cost.elementwise_us(CPU, "GET_ROWS", n_embd * n) + launches
                  for n in ubatches(workload.n_prompt, s.n_ubatch))
    return prefill, launches + cost.elementwise_us(CPU, "GET_ROWS", n_embd)


def combine(prefill_us: float, decode_us: float, workload: Workload) -> float:
    """The objective in microseconds."""
    if workload.objective == "ttft":
        return prefill_us
    if workload.objective == "decode":
        return decode_us
    return prefill_us + workload.n_gen * decode_us


def predict(cost: CostModel, inv: ModelInventory, devices: dict[str, str], workload: Workload,
            s: Settings) -> Prediction:
    """Predicted time and VRAM of a placement: `devices` maps every unit key to "CPU" or the GPU."""
    units = model_units(inv)
    prefill = decode = 0.0
    for unit in units:
        p, d = unit_time_us(cost, inv, unit, devices[unit.key], workload, s)
        prefill, decode = prefill + p, decode + d
    if s.stream_slots:     # the two streams overlap: each ubatch's prefill is its pipeline's, not the sum
        per_unit = [unit_prefill_us(cost, inv, u, devices[u.key], workload, s) for u in units]
        prefill = sum(stream_prefill_us([p for u, parts in zip(units, per_unit) for p in
                                         _per_tensor(cost, inv, u, parts[ub])], s.stream_slots)
                      for ub in range(len(ubatches(workload.n_prompt, s.n_ubatch))))
    uses_gpu = cost.gpu is not None      # a GPU build runs graph splits (and op offload) there even at -ngl 0
    n_crossings = crossings(devices[u.key] for u in units)
    fixed_prefill, fixed_decode = fixed_time_us(cost, inv, workload, s, uses_gpu)
    prefill_cross = sum(prefill_crossings(cost, units, devices, s, n) for n in ubatches(workload.n_prompt, s.n_ubatch))
    prefill += fixed_prefill + prefill_cross * cost.crossing_us
    decode += fixed_decode + n_crossings * cost.decode_crossing_us
    gpu_bytes = gpu_memory(inv, units, devices, s, gpu_overhead_bytes(cost.profile)) if uses_gpu else {}
    return Prediction(prefill_s=prefill * 1e-6, decode_s_per_token=decode * 1e-6,
                      prefill_tokens_per_s=workload.n_prompt / (prefill * 1e-6),
                      decode_tokens_per_s=1e6 / decode, total_s=(prefill + workload.n_gen * decode) * 1e-6,
                      gpu_bytes=gpu_bytes, n_crossings=n_crossings)


def decode_bound_tokens_per_s(cost: CostModel, inv: ModelInventory, devices: dict[str, str]) -> float:
    """What decode cannot beat for a placement: the host weight bytes one token reads (for routed experts n_used of
    n_expert) at the fastest host read the profile saw (its plain memory read, or the CPU's mat-vec streaming rate
    where that was faster or the profile did not measure a plain read), plus the GPU units' own weight time (no
    crossings, no CPU op overhead)."""
    hp, units = inv.hparams, model_units(inv)
    rate = max(cost.profile.host_read_bytes_per_s, cost.profile.cpu_read_bytes_per_s)
    cpu_bytes = sum(active_bytes(u, hp.n_expert, hp.n_expert_used) for u in units
                    if devices[u.key] == CPU and not u.is_attention)
    gpu_us = sum(_weights_us(cost, inv, u, devices[u.key], 1) if is_expert(u) else
                 sum(cost.matmul_us(devices[u.key], *m, 1) for m in u.matrices)
                 for u in units if devices[u.key] != CPU)
    return 1e6 / (cpu_bytes / rate * 1e6 + gpu_us)
