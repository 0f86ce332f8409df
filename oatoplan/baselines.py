"""Named placements: llama.cpp's own choices at a VRAM budget (what a user would run instead of a plan), the greedy
placement, and the placements that validation and decode calibration measure. Each is an `Arm`; the plan stage
predicts them, the bench and calibration stages turn them into loader plans (plan.plan_for) and measure them.

Every arm that has a budget is held to the same rule as the plan: memory.usable_bytes(budget).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .cost import CostModel
from .graph import ATTENTION, CPU, MATRIX, is_expert, is_ffn, is_router, model_units, role, role_info
from .inventory import needs_flash_attn
from .memory import Settings, fits
from .schema import ModelInventory, Plan, Prediction, Workload
from .solve import greedy

GREEDY = "greedy (time saved per byte, same settings)"


@dataclass(frozen=True)
class Arm:
    """One way to run a model that is compared with others."""
    name: str
    placement: dict[str, str] | None = None   # unit key -> "CPU" or the GPU; None: it does not fit the budget
    settings: Settings | None = None
    flags: str = ""                # llama.cpp flags a user would write for it ("does not fit" without a placement)
    plan: Plan | None = None       # the Plan the loader applies (bench and calibration arms)
    prediction: Prediction | None = None
    reference: bool = False        # measured beside the others but no rival of the plan (bench's reference arms)


def all_on(inv: ModelInventory, device: str) -> dict[str, str]:
    return {u.key: device for u in model_units(inv)}


def layer_offload(inv: ModelInventory, gpu: str, n_gpu_layers: int) -> dict[str, str]:
    """-ngl N: output and the last N-1 blocks (weights, KV and attention) on the GPU."""
    first = inv.hparams.n_layer + 1 - n_gpu_layers
    return {u.key: gpu if (u.layer if u.layer is not None else inv.hparams.n_layer) >= first else CPU
            for u in model_units(inv)}


def n_cpu_ffn(inv: ModelInventory, gpu: str, n: int) -> dict[str, str]:
    """All layers on the GPU, the FFN weights of the first n blocks on the CPU (llama.cpp's --n-cpu-ffn for dense
    models: -ot 'blk\\.(0|..|n-1)\\.ffn_(gate|up|down)=CPU'). A router stays on the GPU."""
    return {u.key: CPU if is_ffn(u) and not is_router(u) and u.layer < n else gpu for u in model_units(inv)}


def experts_on_cpu(inv: ModelInventory, gpu: str, layers: range, partial: int | None = None) -> dict[str, str]:
    """All layers on the GPU, the routed experts (gate, up, down) of `layers` on the CPU; `partial`: one more block
    whose gate and down experts and router go to the CPU, its up experts staying (--fit's one extra layer,
    LAYER_FRACTION_UP: 'blk\\.N\\.ffn_(gate|gate_up|down).*', which also matches ffn_gate_inp)."""
    def device(u) -> str:
        if u.layer in layers and is_expert(u):
            return CPU
        if u.layer == partial and (is_router(u) or is_expert(u) and role(u) != "ffn_up_exps"):
            return CPU
        return gpu
    return {u.key: device(u) for u in model_units(inv)}


def _layers_flag(layers: range, what: str) -> str:
    return f"blk\\.({'|'.join(map(str, layers))})\\.{what}=CPU"


def moe_arms(inv: ModelInventory, gpu: str, fits_with, default: Settings, strong: Settings) -> list[Arm]:
    """The mixture-of-experts baselines: llama.cpp's --n-cpu-moe N (experts of the first N blocks on the CPU) with the
    smallest N that fits, as users run it (mmap, ubatch 512) and pinned with ubatch 2048; ik_llama.cpp's habit of
    putting the last N blocks' experts on the CPU (pinned, ubatch 2048); llama.cpp --fit's MoE order (every block's
    dense weights on the GPU, experts spilled, then the front blocks filled back with their experts while they fit,
    then part of one more: its up experts) with llama.cpp's defaults. `fits_with(placement, settings)`: the budget
    rule. --fit's own margin (1 GiB free) is not applied: every arm is held to the same budget."""
    n_layer = inv.hparams.n_layer

    def fewest(make, s: Settings) -> int | None:
        return next((n for n in range(n_layer + 1) if fits_with(make(n), s)), None)
    first = lambda n: experts_on_cpu(inv, gpu, range(n))                      # noqa: E731
    last = lambda n: experts_on_cpu(inv, gpu, range(n_layer - n, n_layer))    # noqa: E731
    arms = []
    n = fewest(first, default)
    arms.append(Arm("--n-cpu-moe", first(n) if n is not None else None, default,
                    f"-ngl 99 --n-cpu-moe {n} -ub 512 -b 2048" if n is not None else "does not fit"))
    n_last = fewest(last, default)
    if n_last is not None:     # --fit: experts of the last n_last blocks on the CPU, then part of one more if it fits
        full_front = n_layer - n_last
        partial = full_front if n_last and fits_with(
            experts_on_cpu(inv, gpu, range(full_front + 1, n_layer), full_front), default) else None
        cpu_layers = range(full_front + (partial is not None), n_layer)
        patterns = ([_layers_flag(cpu_layers, "ffn_(up|down|gate)_exps")] if len(cpu_layers) else []) + \
            ([f"blk\\.{partial}\\.ffn_(gate|down).*=CPU"] if partial is not None else [])
        override = f" -ot '{','.join(patterns)}'" if patterns else ""
        arms.append(Arm("llama.cpp --fit (MoE order)", experts_on_cpu(inv, gpu, cpu_layers, partial), default,
                        f"-ngl 99{override} -ub 512 -b 2048"))
    n = fewest(first, strong)
    if n is not None:
        arms.append(Arm("--n-cpu-moe, pinned, ubatch 2048", first(n), strong,
                        f"-ngl 99 --n-cpu-moe {n} --no-mmap -ub 2048 -b 2048"))
    n = fewest(last, strong)
    if n is not None:
        flag = f" -ot '{_layers_flag(range(n_layer - n, n_layer), 'ffn_(up|down|gate)_exps')}'" if n else ""
        arms.append(Arm("last-N experts on CPU (ik_llama.cpp style), pinned, ubatch 2048", last(n), strong,
                        f"-ngl 99{flag} --no-mmap -ub 2048 -b 2048"))
    return arms


def _ffn_flag(n: int) -> str:
    """--n-cpu-ffn N as llama.cpp spells it for a dense model (-ot; --n-cpu-moe only moves experts)."""
    return f"-ot 'blk\\.({'|'.join(map(str, range(n)))})\\.ffn_(gate|up|down)=CPU'" if n else ""


def baseline_arms(inv: ModelInventory, gpu: str, budget_bytes: int, workload: Workload, overhead_bytes: int
                  ) -> list[Arm]:
    """The baselines at this budget: 1. llama-cpp-python defaults (mmap on, ubatch 512) with the largest -ngl that
    fits; 2. llama.cpp's --fit for a dense model (whole layers, back to front); 3. --n-cpu-ffn with the smallest N that
    fits; 4. those two with pinned memory and ubatch 2048, as a well-read user would write them (left out when they do
    not fit). An arm that does not fit at all has no placement. `overhead_bytes`: memory.gpu_overhead_bytes(profile)."""
    n_layer, units = inv.hparams.n_layer, model_units(inv)

    def largest_ngl(s: Settings) -> int | None:
        return next((n for n in range(n_layer + 1, -1, -1)
                     if fits(inv, units, layer_offload(inv, gpu, n), s, budget_bytes, overhead_bytes)), None)

    def fewest_cpu_ffn(s: Settings) -> int | None:
        return next((n for n in range(n_layer + 1)
                     if fits(inv, units, n_cpu_ffn(inv, gpu, n), s, budget_bytes, overhead_bytes)), None)

    default = Settings(512, True, False, workload.n_ctx, workload.type_k, workload.type_v)
    strong = Settings(2048, True, True, workload.n_ctx, workload.type_k, workload.type_v)
    if inv.hparams.n_expert:
        return kv_flags(moe_baselines(inv, gpu, units, budget_bytes, overhead_bytes, default, strong), workload)
    ngl, n_ffn = largest_ngl(default), fewest_cpu_ffn(default)
    offload = layer_offload(inv, gpu, ngl) if ngl is not None else None
    arms = [Arm("llama-cpp-python defaults", offload, default,
                f"-ngl {ngl} -ub 512 -b 512" if ngl is not None else "does not fit"),
            Arm("llama.cpp --fit (layer offload)", offload, default,
                f"-ngl {ngl} -ub 512 -b 2048" if ngl is not None else "does not fit"),
            Arm("--n-cpu-ffn", n_cpu_ffn(inv, gpu, n_ffn) if n_ffn is not None else None, default,
                f"-ngl 99 {_ffn_flag(n_ffn)} -ub 512" if n_ffn is not None else "does not fit")]
    ngl, n_ffn = largest_ngl(strong), fewest_cpu_ffn(strong)
    if ngl is not None:
        arms.append(Arm("-ngl, pinned, ubatch 2048", layer_offload(inv, gpu, ngl), strong,
                        f"-ngl {ngl} -lm none -ub 2048 -b 2048"))
    if n_ffn is not None:
        arms.append(Arm("--n-cpu-ffn, pinned, ubatch 2048", n_cpu_ffn(inv, gpu, n_ffn), strong,
                        f"-ngl 99 {_ffn_flag(n_ffn)} -lm none -ub 2048 -b 2048"))
    return kv_flags(arms, workload)


def kv_flags(arms: list[Arm], workload: Workload) -> list[Arm]:
    """The arms' flags with the workload's KV cache types, as a user would add them to each (llama.cpp's default is
    f16), and flash attention on for a quantized V, which llama.cpp needs (bench runs every arm with it on)."""
    if (workload.type_k, workload.type_v) == ("f16", "f16"):
        return arms
    fa = " -fa on" if needs_flash_attn(workload.type_v) else ""
    return [replace(a, flags=f"{a.flags} -ctk {workload.type_k} -ctv {workload.type_v}{fa}") if a.placement else a
            for a in arms]


def moe_baselines(inv: ModelInventory, gpu: str, units, budget_bytes: int, overhead_bytes: int, default: Settings,
                  strong: Settings) -> list[Arm]:
    """A mixture-of-experts model's baselines: llama-cpp-python's defaults with the largest -ngl that fits (and the
    same pinned with ubatch 2048), then moe_arms. The dense --n-cpu-ffn arms are left out (they move no experts)."""
    def fits_with(placement: dict[str, str], s: Settings) -> bool:
        return fits(inv, units, placement, s, budget_bytes, overhead_bytes)

    def largest_ngl(s: Settings) -> int | None:
        return next((n for n in range(inv.hparams.n_layer + 1, -1, -1)
                     if fits_with(layer_offload(inv, gpu, n), s)), None)
    ngl = largest_ngl(default)
    arms = [Arm("llama-cpp-python defaults", layer_offload(inv, gpu, ngl) if ngl is not None else None, default,
                f"-ngl {ngl} -ub 512 -b 512" if ngl is not None else "does not fit")]
    arms += moe_arms(inv, gpu, fits_with, default, strong)
    ngl = largest_ngl(strong)
    if ngl is not None:
        arms.append(Arm("-ngl, pinned, ubatch 2048", layer_offload(inv, gpu, ngl), strong,
                        f"-ngl {ngl} -lm none -ub 2048 -b 2048"))
    return arms


def greedy_arm(inv: ModelInventory, cost: CostModel, budget_bytes: int, workload: Workload, s: Settings) -> Arm:
    """Units by time saved per byte, best first, while they fit: the plan's settings, no integer program."""
    return Arm(GREEDY, greedy(inv, cost, budget_bytes, workload, s), s)


def validation_arms(inv: ModelInventory, gpu: str, workload: Workload) -> list[Arm]:
    """Three placements that stress different parts of the cost model (`oatoplan profile validate`): all on the
    GPU; layer offload of half the layers; every layer's attention on the GPU with the first half's FFN on the CPU.
    Pinned host memory, op offload, ubatch 512 (2048 for longer prompts)."""
    half = inv.hparams.n_layer // 2
    s = Settings(512 if workload.n_prompt <= 512 else 2048, True, True, workload.n_ctx)
    return [Arm("all on GPU", all_on(inv, gpu), s),
            Arm(f"layer offload -ngl {half + 1}", layer_offload(inv, gpu, half + 1), s),
            Arm(f"attention on GPU, FFN of layers 0-{half - 1} on CPU", n_cpu_ffn(inv, gpu, half), s)]


def calibration_arms(inv: ModelInventory, gpu: str | None, s: Settings) -> list[Arm]:
    """The placements decode calibration measures (calibrate.py says what each exercises). Without a GPU: all on
    the CPU, with llama.cpp's defaults (mmap on)."""
    if gpu is None:
        return [Arm("all on CPU", all_on(inv, CPU), replace(s, pinned=False))]
    half = inv.hparams.n_layer // 2

    def cpu_where(test) -> dict[str, str]:
        return {u.key: CPU if u.layer is not None and u.layer < half and test(u) else gpu for u in model_units(inv)}
    return [Arm("all on GPU", all_on(inv, gpu), s),
            Arm(f"FFN of layers 0-{half - 1} on CPU", cpu_where(is_ffn), s),
            Arm(f"attention weights of layers 0-{half - 1} on CPU",
                cpu_where(lambda u: role_info(role(u)) == (ATTENTION, MATRIX)), s),
            Arm(f"layers 0-{half - 1} on CPU (layer offload)", cpu_where(lambda u: True), s)]
