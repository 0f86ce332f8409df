"""Stage 4: the Plan and what it means in llama.cpp's terms.

A Plan says where every tensor, KV cache and compute buffer goes, in the two levers llama.cpp has: `n_gpu_layers`
(the last n-1 blocks and `output` go to the GPU, with their KV cache and attention) and tensor buffer-type overrides
(`-ot PATTERN=DEVICE`, first match wins) for the tensors that differ from that rule. This module turns a per-tensor
placement into those levers (`make_plan`), predicts what llama.cpp will allocate (`predict_memory`), and writes the
equivalent llama.cpp flags and llama-cpp-python arguments. `plan_model` solves a model's placement and predicts the
baselines beside it (`plan_cpu` when nothing goes to a GPU); `plan_for` turns any per-unit placement (an Arm's) into a Plan the loader applies.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections import defaultdict
from pathlib import Path


from .baselines import baseline_arms, greedy_arm
from .cost import CostModel, cpu_cost_model, kv_type_note, predict
from .errors import OatoError, PlanError, PlanMismatchError
from .graph import CPU, model_units
from .names import buffer_type_flag, device_flag, is_rpc, override_pattern, rpc_endpoint, split_device
from .machine import default_threads, logical_cpus, target_build
from .inventory import check_kv_types, needs_flash_attn
from .memory import Settings, gpu_memory, gpu_overhead_bytes, kv_split_bytes, segment_copy_bytes, vram_terms
from .schema import (SCHEMA_VERSION, BaselinePrediction, MemoryPrediction, ModelInventory, Plan, Profile,
                     TensorOverride, Workload)
from .segments import check_kv_segments, kv_segments, offload_cells_for, segment_env, segment_note
from .solve import CpuSolution, explain, placement_for, solve, solve_cpu
from .streaming import refine, stream_note
from .units import format_bytes

# Key of the second copy of token_embd.weight that llama.cpp makes as the output matrix of a tied-embedding model.
TIED_OUTPUT = "token_embd.weight (output copy)"

# llama.cpp (and the GGML CUDA backend's buffers) align tensors; allow this much per tensor when checking bytes.
ALIGNMENT_SLACK_BYTES = 1024


def default_device(inv: ModelInventory, group: str, layer: int | None, n_gpu_layers: int, gpu: str | None,
                   gpus: tuple[str, ...] = (), tensor_split: tuple[int, ...] = ()) -> str:
    """Device llama.cpp gives a tensor without overrides: the input layer always stays on the CPU; block il and
    `output` (layer n_layer) go to the GPU when il >= n_layer + 1 - n_gpu_layers; with several devices (`gpus`,
    `tensor_split`), to the one the split gives that layer."""
    if gpu is None or group == "input":
        return CPU
    n_layer = inv.hparams.n_layer
    ngl = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    il = n_layer if group == "output" else layer if layer is not None else 0
    if len(gpus) > 1 and tensor_split:
        return split_device(il, n_layer, ngl, gpus, tensor_split)
    return gpu if il >= n_layer + 1 - ngl else CPU


def tensor_devices(inv: ModelInventory, plan: Plan) -> dict[str, str]:
    """Device of every tensor (and of TIED_OUTPUT) under the plan, by llama.cpp's rules."""
    gpu = plan.gpu_devices[0] if plan.gpu_devices else None
    split = (plan.gpu_devices, plan.tensor_split)
    overridden = {}
    for o in plan.tensor_overrides:
        for name in o.tensors:
            overridden.setdefault(name, o.device)      # as llama.cpp applies them: the first override wins

    def place(name: str, group: str, layer: int | None) -> str:
        return overridden.get(name) or default_device(inv, group, layer, plan.n_gpu_layers, gpu, *split)

    devices = {t.name: place(t.name, t.group, t.layer) for t in inv.tensors}
    if inv.tied_output:
        devices[TIED_OUTPUT] = place("token_embd.weight", "output", None)
    return devices


def layer_devices(inv: ModelInventory, plan: Plan) -> list[str]:
    """Device of each block's KV cache and attention (n_gpu_layers alone decides it)."""
    gpu = plan.gpu_devices[0] if plan.gpu_devices else None
    return [default_device(inv, "layer", il, plan.n_gpu_layers, gpu, plan.gpu_devices, plan.tensor_split)
            for il in range(inv.hparams.n_layer)]


def predict_memory(inv: ModelInventory, plan: Plan, compute_bytes: dict[str, int] | None = None) -> MemoryPrediction:
    """Weight and KV-cache bytes per device, as llama.cpp will allocate them."""
    model_bytes: dict[str, int] = defaultdict(int)
    optional_bytes: dict[str, int] = {}
    placed = tensor_devices(inv, plan)
    for t in inv.tensors:
        model_bytes[placed[t.name]] += t.n_bytes
    if inv.tied_output:
        # the output copy shares the input copy's memory when both land in the same buffer type; on one device
        # that is the rule, unless the CPU backend repacks the output matrix (then it keeps a second copy)
        embd_bytes = inv.tensor("token_embd.weight").n_bytes
        if placed[TIED_OUTPUT] != placed["token_embd.weight"]:
            model_bytes[placed[TIED_OUTPUT]] += embd_bytes
        elif placed[TIED_OUTPUT] == CPU:
            optional_bytes[CPU] = embd_bytes
    kv_bytes: dict[str, int] = defaultdict(int)
    s = plan_settings(plan)
    for il, device in enumerate(layer_devices(inv, plan)):
        with_layer, host = kv_split_bytes(inv.hparams, il, s, plan.swa_full)
        kv_bytes[device] += with_layer
        if host:
            kv_bytes[CPU] += host
    return MemoryPrediction(model_bytes=dict(model_bytes), kv_bytes=dict(kv_bytes), compute_bytes=compute_bytes or {},
                            model_optional_bytes=optional_bytes)


def make_plan(inv: ModelInventory, devices: dict[str, str], *, n_gpu_layers: int, gpu_devices: tuple[str, ...] = (),
              n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int = 512, use_mmap: bool | None = None,
              op_offload: bool = True, flash_attn: bool = True, type_k: str = "f16", type_v: str = "f16",
              swa_full: bool = True, n_outputs_max: int = 0, stream_slots: int = 0, stream_slot_bytes: int = 0,
              stream_bytes: dict[str, int] | None = None, n_threads: int | None = None, llama_cpp_build: str = "",
              profile_id: str = "", tensor_split: tuple[int, ...] = (), rpc_servers: tuple[str, ...] = (),
              budget_bytes: int | None = None, compute_bytes: dict[str, int] | None = None,
              notes: tuple[str, ...] = (), segment_cells: int = 0, segment_offload_cells: int = 0,
              segment_host_types: tuple[str, str] | None = None) -> Plan:
    """A Plan that puts each tensor where `devices` says (tensors it leaves out follow n_gpu_layers). Overrides are
    emitted only for tensors that differ from n_gpu_layers' rule, merged into one pattern per device.
    use_mmap defaults to off whenever a GPU is used, so that CPU-resident weights sit in pinned memory."""
    gpu = gpu_devices[0] if gpu_devices else None
    split = (tuple(gpu_devices), tuple(tensor_split))
    unknown = set(devices) - {t.name for t in inv.tensors} - {TIED_OUTPUT}
    if unknown:
        raise PlanError(f"no tensor named {sorted(unknown)[0]!r} in {inv.identity.file_name}")
    stray = sorted(set(devices.values()) - {CPU} - set(gpu_devices))
    if stray:
        raise PlanError(f"device {stray[0]!r} is not among the plan's GPU devices {list(gpu_devices)}")
    moved: dict[str, list[str]] = defaultdict(list)
    for t in inv.tensors:
        default = default_device(inv, t.group, t.layer, n_gpu_layers, gpu, *split)
        if devices.get(t.name, default) != default and not (inv.tied_output and t.name == "token_embd.weight"):
            moved[devices[t.name]].append(t.name)
    if inv.tied_output:
        # llama.cpp names both copies "token_embd.weight": one override moves both, none leaves the input copy on
        # the CPU and the output copy on the output layer's device
        default_output = default_device(inv, "output", None, n_gpu_layers, gpu, *split)
        input_device = devices.get("token_embd.weight", CPU)
        output_device = devices.get(TIED_OUTPUT, default_output)
        if input_device == output_device and (input_device, output_device) != (CPU, default_output):
            moved[input_device].append("token_embd.weight")
        elif (input_device, output_device) != (CPU, default_output):
            raise PlanError(f"tied embeddings: token_embd.weight on {input_device} with its output copy on "
                            f"{output_device} cannot be expressed in llama.cpp; place both copies together")
    overrides = tuple(TensorOverride(device, tuple(names)) for device, names in sorted(moved.items()))
    plan = Plan(schema_version=SCHEMA_VERSION, model=inv.identity, n_gpu_layers=n_gpu_layers,
                tensor_overrides=overrides, n_ctx=n_ctx, n_batch=max(n_batch, n_ubatch), n_ubatch=n_ubatch,
                use_mmap=(gpu is None) if use_mmap is None else use_mmap, op_offload=op_offload,
                flash_attn=flash_attn, type_k=type_k, type_v=type_v, n_threads=n_threads, swa_full=swa_full,
                n_outputs_max=n_outputs_max, stream_slots=stream_slots, stream_slot_bytes=stream_slot_bytes,
                gpu_devices=tuple(gpu_devices), llama_cpp_build=llama_cpp_build, profile_id=profile_id,
                budget_bytes=budget_bytes, notes=notes, tensor_split=tuple(tensor_split),
                rpc_servers=tuple(rpc_servers),
                kv_segments=kv_segments(inv, n_ctx, n_ubatch, segment_cells, type_k, type_v, swa_full,
                                        segment_offload_cells, segment_host_types))
    memory = predict_memory(inv, plan, compute_bytes)
    return dataclasses.replace(plan, memory=dataclasses.replace(memory, stream_bytes=dict(stream_bytes or {})))


def cpu_only_plan(inv: ModelInventory, **settings) -> Plan:
    """Everything on the CPU, llama-cpp-python's defaults otherwise (mmap on); op offload off, so that a GPU build
    runs nothing on the GPU either."""
    return make_plan(inv, {}, n_gpu_layers=0, **{"op_offload": False, **settings})


def check_plan(inv: ModelInventory, plan: Plan, source: str) -> None:
    """Refuse a plan made for another model, or one whose patterns do not compile or match nothing."""
    if plan.model.tensor_table_sha256 != inv.identity.tensor_table_sha256 or \
            plan.model.file_bytes != inv.identity.file_bytes:
        made, given = plan.model, inv.identity      # names and sizes can match: the tensor tables tell them apart
        raise PlanMismatchError(f"{source} was made for {made.file_name} ({made.file_bytes} bytes, tensor table "
                                f"{made.tensor_table_sha256[:12]}), not for {given.file_name} ({given.file_bytes} "
                                f"bytes, tensor table {given.tensor_table_sha256[:12]}); make a plan for this model")
    names = {t.name for t in inv.tensors}
    listed: set[str] = set()
    for override in plan.tensor_overrides:
        if not override.tensors:
            raise PlanError(f"{source}: the override to {override.device} lists no tensor; drop it or name tensors")
        for name in override.tensors:
            if name not in names:
                raise PlanError(f"{source}: tensor override to {override.device} names {name!r}, which "
                                f"{inv.identity.file_name} does not have; make the plan again for this model")
            if name in listed:
                raise PlanError(f"{source}: tensor {name!r} is listed in two overrides; keep it in one")
            listed.add(name)
        override_pattern(override.tensors)      # every name can be written as a pattern llama.cpp reads alike
    stray = sorted({o.device for o in plan.tensor_overrides} - {CPU} - set(plan.gpu_devices))
    if stray:
        raise PlanError(f"{source}: override device {stray[0]!r} is not listed in gpu_devices {list(plan.gpu_devices)}")
    if plan.tensor_split and len(plan.tensor_split) != len(plan.gpu_devices):
        raise PlanError(f"{source}: tensor_split has {len(plan.tensor_split)} entries for {len(plan.gpu_devices)} "
                        f"devices; give one layer count per device of gpu_devices")
    rpc = sorted(rpc_endpoint(d) for d in plan.gpu_devices if is_rpc(d))
    if rpc != sorted(plan.rpc_servers):
        raise PlanError(f"{source}: rpc_servers {list(plan.rpc_servers)} are not the RPC devices of gpu_devices "
                        f"{list(plan.gpu_devices)}; list each RPC[host:port] device's host:port once")
    if plan.n_ubatch > plan.n_batch:
        raise PlanError(f"{source}: n_ubatch {plan.n_ubatch} is larger than n_batch {plan.n_batch}")
    check_plan_numbers(inv, plan, source)


# A context past the model's training length only when the plan's workload asked for it (plan --ctx-over-train),
# or up to make_plan's default; never past MAX_N_CTX tokens (a typo there asks llama.cpp for terabytes of KV cache).
DEFAULT_N_CTX = 4096
MAX_N_CTX = 1 << 24
MAX_INT32 = (1 << 31) - 1     # llama.cpp's int32 parameters
MAX_STREAM_SLOTS = 16         # native/oato-stream.h's OATO_STREAM_MAX_SLOTS


def check_plan_numbers(inv: ModelInventory, plan: Plan, source: str) -> None:
    """Refuse plan fields (a plan.json edited by hand) that llama.cpp would reject, misread or try to allocate."""
    try:
        check_kv_types(inv, plan.type_k, plan.type_v, ("type_k", "type_v"))
    except OatoError as e:
        raise PlanError(f"{source}: {e}") from None
    if needs_flash_attn(plan.type_v) and not plan.flash_attn:
        raise PlanError(f"{source}: type_v {plan.type_v} needs flash attention, as llama.cpp says; set flash_attn "
                        f"true or type_v f16")
    asked = plan.workload.n_ctx if plan.workload else 0
    limit = min(max(inv.hparams.n_ctx_train, DEFAULT_N_CTX, asked), MAX_N_CTX)
    if not 1 <= plan.n_ctx <= limit:
        raise PlanError(f"{source}: n_ctx {plan.n_ctx} is outside 1..{limit} ({inv.identity.file_name} was trained "
                        f"on {inv.hparams.n_ctx_train} tokens); plan again with --ctx set to the context you need "
                        f"(--ctx-over-train to go past the training length)")
    bounds = {"n_ubatch": (1, MAX_N_CTX), "n_batch": (1, MAX_N_CTX), "n_gpu_layers": (-1, MAX_INT32),
              "n_outputs_max": (0, MAX_INT32), "n_threads": (1, 4096), "stream_slots": (0, MAX_STREAM_SLOTS),
              "stream_slot_bytes": (1 if plan.stream_slots else 0, 1 << 40 if plan.stream_slots else 0)}
    for name, (low, high) in bounds.items():
        value = getattr(plan, name)
        if not (value is None and name == "n_threads") and not low <= value <= high:
            raise PlanError(f"{source}: {name} {value} is outside {low}..{high}; plan again, or fix the number")
    check_kv_segments(inv, plan, source)
    if plan.stream_slots == 1:
        raise PlanError(f"{source}: stream_slots 1 is not a ring (the patched llama.cpp takes 2 at least); plan "
                        f"again, or set 0 (off) or 2..{MAX_STREAM_SLOTS}")


def llama_cpp_flags(plan: Plan) -> str:
    """The same placement as llama.cpp command-line flags (llama-cli, llama-server) of the llama.cpp that
    llama-cpp-python 0.3.36 vendors (mmap off is `--load-mode none` there)."""
    flags = [f"-ngl {plan.n_gpu_layers}", f"-c {plan.n_ctx}", f"-b {plan.n_batch}", f"-ub {plan.n_ubatch}",
             f"-fa {'on' if plan.flash_attn else 'off'}", f"-ctk {plan.type_k}", f"-ctv {plan.type_v}"]
    if not plan.use_mmap:
        flags.append("-lm none")
    if not plan.op_offload:
        flags.append("--no-op-offload")
    if plan.swa_full:
        flags.append("--swa-full")
    if plan.n_threads:
        flags.append(f"-t {plan.n_threads}")
    if plan.rpc_servers:
        flags.append(f"--rpc {','.join(plan.rpc_servers)}")
    if plan.tensor_split or plan.rpc_servers or len(plan.gpu_devices) > 1:
        # exactly the plan's devices: else llama.cpp takes every GPU and RPC device, split by free memory
        flags.append(f"-dev {','.join(device_flag(d, plan.rpc_servers) for d in plan.gpu_devices)}")
    if len(plan.gpu_devices) > 1:      # without a split, the loader gives every layer to the first device
        split = plan.tensor_split or (1,) + (0,) * (len(plan.gpu_devices) - 1)
        flags.append(f"-ts {','.join(map(str, split))}")
    flags += [f"-ot '{override_pattern(o.tensors)}={buffer_type_flag(o.device)}'" for o in plan.tensor_overrides]
    return " ".join(flags)


def stream_env(plan: Plan) -> dict[str, str]:
    """The environment oatoplan's patched llama.cpp reads for weight streaming (patches/0005) when a context is
    created: what `load` sets, and what a llama.cpp command of the same build needs in front of it."""
    if not plan.stream_slots:
        return {"OATO_STREAM": "0"}
    return {"OATO_STREAM": "1", "OATO_STREAM_SLOTS": str(plan.stream_slots),
            "OATO_STREAM_SLOT_BYTES": str(plan.stream_slot_bytes)}


def llama_server_command(plan: Plan, model_path: str | Path, host: str = "127.0.0.1", port: int = 8000) -> str:
    """llama.cpp's own llama-server serving the same placement as `oatoplan serve`: llama_cpp_flags, one slot holding
    the whole context (`-np 1`: its default is 4 slots sharing a unified KV cache) and `-fit off` (else it may change
    what the plan left at llama.cpp's defaults to fit free memory), after the weight-streaming environment.
    n_outputs_max has no flag: llama-server sets it from its slots itself."""
    flags = llama_cpp_flags(plan)
    # always: oatoplan's build streams by default, and a plan without streaming did not count the ring
    env = "".join(f"{k}={v} " for k, v in {**stream_env(plan), **segment_env(plan.kv_segments)}.items())
    return (f"{env}llama-server -m {shlex.quote(str(model_path))} {flags} -np 1 -fit off "
            f"-a {shlex.quote(Path(model_path).stem)} --host {host} --port {port}")


# ---------------------------------------------------------------------------------------------------------------
# From a solved placement to a Plan

def tensor_placement(inv: ModelInventory, unit_devices: dict[str, str]) -> tuple[dict[str, str], int]:
    """Per-tensor devices and n_gpu_layers for a per-unit placement (solve's units): KV/attention on the GPU for
    the last k layers means n_gpu_layers = k + 1 (`output` counts as a layer); tensors follow their unit."""
    devices: dict[str, str] = {}
    n_kv_gpu = 0
    for unit in model_units(inv):
        device = unit_devices[unit.key]
        if unit.is_attention:
            n_kv_gpu += device != CPU
        elif unit.is_output and inv.tied_output:
            devices[TIED_OUTPUT] = device
        else:
            devices.update({name: device for name in unit.tensors})
    uses_gpu = any(d != CPU for d in unit_devices.values())
    return devices, (n_kv_gpu + 1 if uses_gpu else 0)


def plan_for(inv: ModelInventory, unit_devices: dict[str, str], s: Settings, profile: Profile,
             gpu: str | None) -> Plan:
    """A loader Plan for a per-unit placement and settings (mmap on when `s.pinned` is off)."""
    devices, n_gpu_layers = tensor_placement(inv, unit_devices)
    units = model_units(inv)
    vram = gpu_memory(inv, units, unit_devices, s, gpu_overhead_bytes(profile)) if gpu else {}
    slot = vram_terms(inv, units, s, 0).slot([unit_devices[u.key] != CPU for u in units]) if gpu else 0
    plan = make_plan(inv, devices, n_gpu_layers=n_gpu_layers, gpu_devices=(gpu,) if gpu else (), n_ctx=s.n_ctx,
                     n_batch=s.n_ubatch, n_ubatch=s.n_ubatch, use_mmap=not s.pinned, op_offload=s.op_offload,
                     type_k=s.type_k, type_v=s.type_v, n_outputs_max=s.n_outputs_max, n_threads=profile.n_threads,
                     llama_cpp_build=target_build(profile), profile_id=profile.profile_id,
                     compute_bytes={gpu: vram["compute"]} if gpu else {},
                     stream_slots=s.stream_slots if slot else 0, stream_slot_bytes=slot if s.stream_slots else 0,
                     stream_bytes={gpu: vram["stream"]} if gpu and vram["stream"] else {},
                     segment_cells=s.segment_cells, segment_host_types=s.host_kv_types)
    return dataclasses.replace(plan, placement=dict(unit_devices), flags=llama_cpp_flags(plan))


def plan_settings(plan: Plan) -> Settings:
    """The non-placement decisions a plan made (the inverse of plan_for's)."""
    host = (plan.kv_segments[-1].type_k, plan.kv_segments[-1].type_v) if plan.kv_segments else None
    return Settings(plan.n_ubatch, plan.op_offload, not plan.use_mmap, plan.n_ctx, plan.type_k, plan.type_v,
                    plan.n_outputs_max, plan.stream_slots, plan_segment_cells(plan),
                    host if host != (plan.type_k, plan.type_v) else None)


def plan_segment_cells(plan: Plan) -> int:
    """The first segment's cells of a plan with the segment KV cache, 0 for llama.cpp's own cache."""
    return plan.kv_segments[0].end_cell if plan.kv_segments else 0


def plan_model(inv: ModelInventory, profile: Profile, budget_bytes: int, workload: Workload,
               write_lp=None, segments: bool = True) -> Plan:
    """Solve the placement for `workload` within `budget_bytes` of VRAM with `profile`'s costs, and return the
    Plan with its prediction, the baselines' predictions at the same budget and an explanation. With no GPU in the
    profile or a budget of 0: plan_cpu."""
    if not profile.gpu_device or budget_bytes == 0:
        if write_lp:
            raise PlanError("--write-lp: a CPU-only plan solves no integer program (no GPU in the profile, or a "
                            "VRAM budget of 0); leave --write-lp out")
        return plan_cpu(inv, profile, workload, budget_bytes)
    cost = CostModel(profile)
    solution = solve(inv, cost, budget_bytes, workload, write_lp, segments)
    others = ()
    if solution.settings.stream_slots and workload.objective != "total":
        # the program prices streaming as ideal overlap, under which many placements tie for one phase's time: the
        # whole workload's optimum is one more candidate for the slot simulation (refine) to judge
        total = placement_for(inv, cost, budget_bytes, dataclasses.replace(workload, objective="total"),
                              solution.settings)
        others = (total,) if total else ()
    solution = refine(inv, cost, solution, budget_bytes, workload, others)
    s = solution.settings
    arms = baseline_arms(inv, cost.gpu, budget_bytes, workload, gpu_overhead_bytes(profile)) + \
        [greedy_arm(inv, cost, budget_bytes, workload, s)]
    baselines = [BaselinePrediction(a.name, a.flags, predict(cost, inv, a.placement, workload, a.settings)
                                    if a.placement else None) for a in arms]
    devices, n_gpu_layers = tensor_placement(inv, solution.devices)
    gpu_bytes = solution.prediction.gpu_bytes
    offload_cells = offload_cells_for(inv, profile, s, solution.devices, budget_bytes)
    notes = tuple(explain(inv, cost, solution, workload)) + (
        f"ubatch {s.n_ubatch}, op offload {'on' if s.op_offload else 'off'}, mmap off (host weights pinned): "
        f"best of {len(solution.candidates)} settings solved in {solution.solve_s:.2f} s",) + \
        ((_outputs_note(s),) if s.n_outputs_max else ()) + stream_note(inv, cost, solution, workload) + \
        segment_note(solution, workload, profile, offload_cells,
                     sum(segment_copy_bytes(inv.hparams, s, offload_cells))) + kv_type_note(cost, s) + \
        _build_note(profile)
    units = model_units(inv)
    slot = vram_terms(inv, units, s, 0).slot([solution.devices[u.key] != CPU for u in units])
    plan = make_plan(inv, devices, n_gpu_layers=n_gpu_layers, gpu_devices=(cost.gpu,), n_ctx=workload.n_ctx,
                     n_batch=s.n_ubatch, n_ubatch=s.n_ubatch, use_mmap=False, op_offload=s.op_offload,
                     n_outputs_max=s.n_outputs_max,
                     flash_attn=True, type_k=s.type_k, type_v=s.type_v, n_threads=profile.n_threads,
                     llama_cpp_build=target_build(profile), profile_id=profile.profile_id,
                     budget_bytes=budget_bytes, compute_bytes={cost.gpu: gpu_bytes.get("compute", 0)}, notes=notes,
                     stream_slots=s.stream_slots if slot else 0, stream_slot_bytes=slot if s.stream_slots else 0,
                     stream_bytes={cost.gpu: gpu_bytes["stream"]} if gpu_bytes.get("stream") else {},
                     segment_cells=s.segment_cells, segment_offload_cells=offload_cells,
                     segment_host_types=s.host_kv_types)
    plan = dataclasses.replace(plan, workload=workload, prediction=solution.prediction, baselines=tuple(baselines),
                               placement=dict(solution.devices))
    return dataclasses.replace(plan, flags=llama_cpp_flags(plan))


def _build_note(profile: Profile) -> tuple[str, ...]:
    """Says so when the profile was measured with another build than the one the plan is for."""
    build = target_build(profile)
    if build == profile.machine.llama_cpp_build:
        return ()
    return (f"profile {profile.profile_id} was measured with {profile.machine.llama_cpp_build or 'an unnamed build'}, "
            f"this plan is for {build}: its timings may differ (`oatoplan profile run` measures this build)",)


def _outputs_note(s: Settings) -> str:
    return (f"n_outputs_max {s.n_outputs_max}: llama.cpp reserves logits for {s.n_outputs_max} token per ubatch, not "
            f"{s.n_ubatch} (no llama-cli flag; llama-server does this itself, oatoplan.load sets it)")


# ---------------------------------------------------------------------------------------------------------------
# All on the CPU

CPU_DEFAULTS = "llama-cpp-python defaults (n_threads = logical CPUs // 2, ubatch 512)"


def plan_cpu(inv: ModelInventory, profile: Profile, workload: Workload, budget_bytes: int = 0) -> Plan:
    """Everything on the CPU: this machine's physical cores for decode and prefill, the ubatch solve_cpu picks from
    the profile's CPU timings, mmap on, op offload off (on a GPU build too: nothing runs on the GPU), flash
    attention, one logit row per ubatch; predicted with the profile's CPU side, beside llama-cpp-python's defaults."""
    cost = cpu_cost_model(profile)
    solution = solve_cpu(inv, cost, workload)
    s, n_threads = solution.settings, default_threads()
    plan = make_plan(inv, {}, n_gpu_layers=0, n_ctx=workload.n_ctx, n_batch=s.n_ubatch, n_ubatch=s.n_ubatch,
                     use_mmap=True, op_offload=False, flash_attn=True, n_outputs_max=s.n_outputs_max,
                     type_k=s.type_k, type_v=s.type_v, n_threads=n_threads, llama_cpp_build=target_build(profile),
                     profile_id=profile.profile_id, budget_bytes=0,
                     notes=_cpu_notes(profile, solution, budget_bytes, n_threads) + kv_type_note(cost, s) +
                     _build_note(profile))
    plan = dataclasses.replace(plan, workload=workload, prediction=solution.prediction,
                               baselines=(_cpu_defaults(inv, cost, workload),),
                               placement={u.key: CPU for u in model_units(inv)})
    return dataclasses.replace(plan, flags=llama_cpp_flags(plan))


def _cpu_notes(profile: Profile, solution: CpuSolution, budget_bytes: int, n_threads: int) -> tuple[str, ...]:
    s = solution.settings
    if not profile.gpu_device:
        why = f"profile {profile.profile_id} has no GPU" + (
            f" (the VRAM budget of {format_bytes(budget_bytes)} is not used)" if budget_bytes else "")
    else:
        why = (f"VRAM budget 0: n_gpu_layers 0 and op offload off, so that no weight, KV cache or op goes to "
               f"{profile.gpu_device} (with op offload on, llama.cpp's GPU build would still copy the weights of large "
               f"batches to the GPU and run them there); the GPU build still creates its GPU context")
    times = ", ".join(f"{c.n_ubatch}: {p.prefill_s * 1e3:.1f} ms" for c, p in solution.candidates)
    notes = [f"all on the CPU: {why}",
             f"n_threads {n_threads} for decode and prefill (n_threads_batch): this machine's physical cores",
             f"ubatch {s.n_ubatch}: the shortest predicted prefill of the candidates ({times})"]
    if solution.unmeasured:
        notes.append(f"ubatch {', '.join(map(str, solution.unmeasured))} not considered: the profile timed CPU batches "
                     f"of at most {max(c.n_ubatch for c, _ in solution.candidates)} tokens")
    if n_threads != profile.n_threads:
        notes.append(f"the profile timed {profile.n_threads} threads on {profile.machine.cpu_model}: the predicted "
                     f"times are for that, not for {n_threads} threads here; profile this machine (oatoplan profile "
                     f"run --cpu) for a prediction of its own")
    notes += ["mmap on: the weights are read from the file's mapping (no GPU to pin host memory for)",
              "llama.cpp's CPU weight repacking (CPU_REPACK buffers) stays on, as llama.cpp defaults: the weights it "
              "repacks are copied out of the mapping; the profile has no timings of repacked kernels, so the "
              "planner does not choose between the two",
              _outputs_note(s)]
    return tuple(notes)


def _cpu_defaults(inv: ModelInventory, cost: CostModel, workload: Workload) -> BaselinePrediction:
    """llama-cpp-python's Llama() defaults on this machine: decode on logical CPUs // 2 threads, prefill on all,
    ubatch 512. Predicted only where both thread counts are the profile's: the profile timed no other."""
    logical = logical_cpus()
    decode_threads, prefill_threads, timed = max(logical // 2, 1), logical, cost.profile.n_threads
    kv = (workload.type_k, workload.type_v)
    flags = f"-ngl 0 -ub 512 -b 512 -t {decode_threads} -tb {prefill_threads}" + \
        (f" -ctk {kv[0]} -ctv {kv[1]}" if kv != ("f16", "f16") else "")
    if decode_threads == prefill_threads == timed:
        s = Settings(512, False, False, workload.n_ctx, workload.type_k, workload.type_v)
        return BaselinePrediction(CPU_DEFAULTS, flags,
                                  predict(cost, inv, {u.key: CPU for u in model_units(inv)}, workload, s))
    return BaselinePrediction(CPU_DEFAULTS, flags, None,
                              f"not predicted: n_threads {decode_threads} (decode), n_threads_batch "
                              f"{prefill_threads} (prefill); the profile timed {timed} threads only")
