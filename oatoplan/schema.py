"""Every artifact oatoplan writes or reads: frozen dataclasses, stored as JSON with a `schema_version`.

Sizes are bytes, times microseconds, unless a name says otherwise. Tensor names are exactly as in the GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# Model inventory (stage 1: what is in a GGUF file)

@dataclass(frozen=True)
class TensorInfo:
    name: str                 # exactly as in GGUF, e.g. "blk.3.ffn_up.weight"
    layer: int | None         # block index for "blk.N.*", None for input/output tensors
    group: str                # "input" (token_embd...), "layer", or "output" (output, output_norm)
    role: str                 # "attn_q", "ffn_down", "ffn_up_exps", "attn_norm", "token_embd", ... or "other"
    param: str                # "weight", "bias", or the suffix after the role
    ggml_type: str            # ggml type name, e.g. "Q4_K"
    shape: tuple[int, ...]    # ggml order: shape[0] is the row length (input features for a matrix)
    n_bytes: int
    op: str                   # ggml op that consumes it: MUL_MAT, MUL_MAT_ID, GET_ROWS, MUL, ADD, ROPE, NONE
    flops_per_token: int      # arithmetic per token of batch (2 per multiply-add); 0 for lookups


@dataclass(frozen=True)
class Hyperparameters:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]    # per layer (some models vary it)
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int                    # sliding-window size, 0 if none
    swa_layers: tuple[int, ...]   # layers that use the sliding window
    n_expert: int                 # 0 for dense models
    n_expert_used: int


@dataclass(frozen=True)
class ModelIdentity:
    """Enough to tell one model file from another without hashing gigabytes of weights."""
    file_name: str
    file_bytes: int
    tensor_table_sha256: str      # over (name, type, shape, offset) of every tensor, in file order


@dataclass(frozen=True)
class ModelInventory:
    schema_version: int
    path: str
    identity: ModelIdentity
    hparams: Hyperparameters
    tensors: tuple[TensorInfo, ...]
    # No `output.weight` in the file: llama.cpp then uses token_embd as the output matrix and loads a second copy
    # of it on the output layer's device (it costs VRAM when the output layer is on a GPU).
    tied_output: bool
    data_offset: int              # where tensor data starts in the file
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def output_matrix(self) -> TensorInfo:
        """The tensor the output MUL_MAT reads: `output.weight`, or `token_embd.weight` when tied."""
        return self.tensor("token_embd.weight" if self.tied_output else "output.weight")


# ---------------------------------------------------------------------------------------------------------------
# Workload and predictions (what `plan` optimises for, and what it expects)

OBJECTIVES = ("total", "ttft", "decode")


@dataclass(frozen=True)
class Workload:
    n_prompt: int = 512           # prompt tokens to prefill
    n_gen: int = 128              # tokens to generate
    n_depth: int = 0              # tokens already in the KV cache before the prompt
    objective: str = "total"      # "total" (prefill + all decode), "ttft" (prefill), "decode" (per token)
    # the context the user asks llama.cpp for (-c, e.g. 32768 for a chat that is usually short); 0: what the
    # workload uses. KV cache and compute buffer are reserved for n_ctx; attention costs follow depth and prompt.
    n_ctx_asked: int = 0
    # the KV cache's K and V types the user asks for (llama.cpp's -ctk / -ctv): what every arm of a bench runs with
    type_k: str = "f16"
    type_v: str = "f16"

    @property
    def n_ctx(self) -> int:
        return max(self.n_ctx_asked, self.n_depth + self.n_prompt + self.n_gen)


@dataclass(frozen=True)
class Prediction:
    prefill_s: float              # the whole prompt: time to first token, less sampling
    decode_s_per_token: float     # averaged over the generated tokens (attention grows with depth)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float                # prefill + n_gen tokens of decode
    gpu_bytes: dict[str, int]     # VRAM by category: weights, kv, compute, pool
    n_crossings: int              # CPU<->GPU crossings in one decode graph


@dataclass(frozen=True)
class BaselinePrediction:
    name: str                     # "llama-cpp-python defaults", "layer offload (--fit)", "--n-cpu-ffn", ...
    flags: str                    # the llama.cpp flags of that arm
    prediction: Prediction | None  # None: does not fit the budget at all
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Plan (what `plan` writes and `load` applies)

@dataclass(frozen=True)
class TensorOverride:
    """Tensors llama.cpp puts on `device` against n_gpu_layers' rule, by their exact GGUF names. The loader passes them
    to llama.cpp as one anchored pattern (plan.override_pattern) written in a subset of regex syntax that Python's `re`
    and llama.cpp's std::regex (ECMAScript) read alike, and checks llama.cpp's load log for each of them. "CPU" means
    host memory (pinned `CUDA_Host` when mmap is off and a GPU is present); a GPU is named as ggml names it
    ("CUDA0")."""
    device: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes llama.cpp is expected to allocate, per device ("CPU" covers every host buffer type)."""
    model_bytes: dict[str, int]
    kv_bytes: dict[str, int]
    compute_bytes: dict[str, int] = field(default_factory=dict)   # empty: not predicted, not checked
    # bytes llama.cpp may or may not add to model_bytes (a tied output copy that the CPU backend repacks)
    model_optional_bytes: dict[str, int] = field(default_factory=dict)
    # VRAM of the weight-streaming staging slots (patches/0005), per GPU; not part of llama.cpp's compute buffer
    stream_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class KvSegment:
    """One segment of the segment KV cache (patches/0007-0008): cells [first_cell, end_cell) of each listed layer's
    cache in a buffer of their own. `device` "layer" keeps them where n_gpu_layers puts the layer's KV cache; "CPU":
    host memory, with the segment's attention run on the CPU (only queries and partial results cross). The last
    segment ends at n_ctx and grows in chunks of `growth_cells` (0: reserved whole). A host segment of at most
    `offload_cells` cells is copied to the layer's GPU for a prompt batch instead, one layer's K/V at a time in
    the compute buffer (patches/0012; 0: never)."""
    first_cell: int
    end_cell: int
    device: str
    type_k: str
    type_v: str
    layers: tuple[int, ...]       # the full-attention layers (a sliding-window layer keeps the stock cache)
    growth_cells: int = 0
    offload_cells: int = 0


@dataclass(frozen=True)
class Plan:
    schema_version: int
    model: ModelIdentity
    # llama.cpp's rule: the last n_gpu_layers - 1 blocks and `output` go to the GPU (`output` counts as a layer);
    # a block's device is also where its KV cache and attention run.
    n_gpu_layers: int
    tensor_overrides: tuple[TensorOverride, ...]
    n_ctx: int
    n_batch: int
    n_ubatch: int
    use_mmap: bool
    op_offload: bool              # copy CPU-resident weights to the GPU for large batches
    flash_attn: bool
    type_k: str                   # KV cache types: "f16", "q8_0", "q4_0"
    type_v: str
    n_threads: int | None         # None: llama-cpp-python's default
    gpu_devices: tuple[str, ...]  # devices the plan places anything on, e.g. ("CUDA0",); () for all-CPU
    llama_cpp_build: str          # build the plan was solved for; "" = made by hand, any build
    # sliding-window layers keep the whole context (llama.cpp's default) or only n_swa + n_ubatch cells
    swa_full: bool = True
    # logit rows llama.cpp reserves per ubatch (0 = all of them, its default); 1 frees n_ubatch x n_vocab x 4 bytes
    # of compute buffer, and the model can then return logits for one token per ubatch (what generation reads)
    n_outputs_max: int = 0
    # weight streaming (patches/0005): with op offload, host weights of a large batch are uploaded on a second stream
    # into stream_slots staging slots of stream_slot_bytes each while the GPU computes; 0 slots: off (stock copies)
    stream_slots: int = 0
    stream_slot_bytes: int = 0
    # llama.cpp RPC servers ("host:port") registered before the load, in this order; their device 0 is RPC[host:port]
    rpc_servers: tuple[str, ...] = ()
    profile_id: str = ""
    budget_bytes: int | None = None
    memory: MemoryPrediction | None = None
    notes: tuple[str, ...] = ()
    # written by `oatoplan plan`: what it was solved for and what it expects
    workload: Workload | None = None
    prediction: Prediction | None = None
    baselines: tuple[BaselinePrediction, ...] = ()
    placement: dict[str, str] = field(default_factory=dict)   # unit key ("blk.3.ffn_up", "blk.3.attn") -> device
    flags: str = ""               # the equivalent llama.cpp flags
    # several devices (split.py): layers per device of gpu_devices, in that order, as llama.cpp's tensor_split (`-ts`)
    # maps the n_gpu_layers layers (output counts as one) to them; () = all on gpu_devices[0]
    tensor_split: tuple[int, ...] = ()
    budgets_bytes: dict[str, int] = field(default_factory=dict)   # per-device budget, when planned for several
    # the segment KV cache's segments, in cell order; () = llama.cpp's own cache
    kv_segments: tuple[KvSegment, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Loader report (what llama.cpp really allocated)

@dataclass(frozen=True)
class BufferAllocation:
    kind: str          # "model", "KV", "compute", "output"
    buffer_type: str   # as llama.cpp names it: "CUDA0", "CUDA_Host", "CPU", "CPU_Mapped", "CPU_REPACK"
    device: str        # "CPU" for every host buffer type, else the GPU's name
    n_bytes: int


@dataclass(frozen=True)
class MemoryCheck:
    kind: str
    device: str
    predicted_bytes: int
    allocated_bytes: int
    ok: bool


@dataclass(frozen=True)
class MemoryReport:
    schema_version: int
    allocations: tuple[BufferAllocation, ...]
    checks: tuple[MemoryCheck, ...]
    # overridden tensors that llama.cpp's load log puts elsewhere than the plan (or does not name at all)
    misplaced: tuple[str, ...] = ()


@dataclass(frozen=True)
class Device:
    name: str            # ggml's name: "CPU", "CUDA0"
    description: str
    type: str            # "CPU", "GPU", "IGPU", "ACCEL"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class RunStats:
    """llama.cpp's own perf counters for one completion."""
    n_prompt_tokens: int
    prompt_ms: float
    n_generated_tokens: int
    generate_ms: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1000.0 * self.n_prompt_tokens / self.prompt_ms if self.prompt_ms else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.n_generated_tokens / self.generate_ms if self.generate_ms else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Profile (what `profile` measures on the user's machine; the planner's cost model reads it)

@dataclass(frozen=True)
class MachineIdentity:
    cpu_model: str
    n_cpu_threads: int            # logical CPUs
    ram_bytes: int
    gpu_name: str                 # "" when profiled without a GPU
    gpu_total_bytes: int
    gpu_driver: str
    pcie_link: str                # e.g. "gen5 x16", "" if unknown
    llama_cpp_build: str


@dataclass(frozen=True)
class OpTiming:
    """Median time of one operator on one device, per copy, from graphs of several independent copies (so that a
    graph launch is not counted as op time and weights are read from memory, not from cache)."""
    device: str                   # "CPU", "CUDA0"
    op: str                       # ggml op: MUL_MAT, FLASH_ATTN_EXT, RMS_NORM, MUL, ADD, GLU, ROPE, SET_ROWS, GET_ROWS
    ggml_type: str                # weight type (MUL_MAT, GET_ROWS), KV type (FLASH_ATTN_EXT, SET_ROWS), else F32
    # MUL_MAT: (K, N) = (input features, output features) of the weight; FLASH_ATTN_EXT: (head_dim, n_head,
    # n_head_kv, n_kv); element-wise ops: (elements per token,)
    shape: tuple[int, ...]
    n_tokens: int
    t_us: float                   # median
    samples_us: tuple[float, ...]


@dataclass(frozen=True)
class TransferTiming:
    direction: str                # "h2d" (host to device) or "d2h"
    memory: str                   # host side: "pinned" or "pageable"
    n_bytes: int
    t_us: float
    samples_us: tuple[float, ...]


@dataclass(frozen=True)
class CalibrationArm:
    """One real llama.cpp decode of the profiled model (`oatoplan profile run --model`), against the isolated-op model."""
    name: str                             # the placement, e.g. "FFN of layers 0-13 on CPU"
    flags: str                            # its llama.cpp flags
    decode_us_per_token: tuple[float, ...]   # measured, one sample per repetition
    components_us: dict[str, float]       # uncalibrated predicted decode time per class (cost.DECODE_CLASSES), "fixed"
    n_crossings: int                      # CPU<->GPU crossings in its decode graph


@dataclass(frozen=True)
class GpuOverheadSample:
    """One fresh process: the model loaded with every weight on the CPU and op offload at `n_ubatch`, one ubatch of
    prefill and a few decode steps; device memory in use then, less before the load, less llama.cpp's GPU buffers."""
    n_ubatch: int
    beyond_buffers_bytes: int     # measured
    pool_bytes: int               # what memory.pool_bytes counts of it


@dataclass(frozen=True)
class StreamSplitSample:
    """One placement of the weight-streaming calibration (calibrate.measure_stream_split): one prefill ubatch of the
    profiled model with some small host tensors (norms) streamed, each its own upload and its own scheduler split."""
    name: str
    n_uploads: float              # streamed uploads per ubatch, as the build counted them (oato_sched_stream_stats)
    n_tokens: int                 # the ubatch
    prefill_us: tuple[float, ...]    # the ubatch's prefill, one sample per repetition


@dataclass(frozen=True)
class StreamSplitCalibration:
    """The fixed cost of one streamed upload's split on the compute stream (the scheduler's split switch, the event
    wait and record, the small kernels around it), fitted to the samples: prefill = split_us x uploads + constant."""
    split_us: float
    samples: tuple[StreamSplitSample, ...] = ()


@dataclass(frozen=True)
class DeviceLink:
    """An accelerator beyond a profile's gpu_device, and the link to it from the host: another local GPU ("CUDA1") or
    an RPC device ("RPC[host:port]", the device 0 of an rpc-server)."""
    device: str
    description: str
    total_bytes: int
    crossing_us: float            # one crossing to or from it in a prefill graph (per ubatch), beside the bytes
    decode_crossing_us: float     # the same in a decode graph (per token)
    h2d_bytes_per_s: float        # activations (and weights) host -> device
    d2h_bytes_per_s: float
    # whose decode calibration (Profile.decode_factors) applies: "gpu", or "cpu" for an RPC device whose mat-vecs run
    # at about the local CPU's speed (a remote CPU: ggml calls every RPC device a GPU)
    decode_class: str = "gpu"


@dataclass(frozen=True)
class Profile:
    schema_version: int
    profile_id: str
    created_utc: str
    machine: MachineIdentity
    n_threads: int                # CPU threads the CPU backend ran with (and a plan must run with)
    gpu_device: str               # ggml device profiled, "" without a GPU
    ops: tuple[OpTiming, ...]
    transfers: tuple[TransferTiming, ...]
    launch_us: dict[str, float]   # one graph of one tiny op, per device: the fixed cost of a graph split
    crossing_us: float            # one CPU<->GPU crossing in a decode graph (half a measured round trip)
    cpu_read_bytes_per_s: float   # weight bytes per second a CPU mat-vec streams (largest weight, 1 token)
    gpu_reserved_bytes: int       # VRAM in use before any buffer (CUDA context, other processes)
    duration_s: float = 0.0
    notes: tuple[str, ...] = ()
    # decode time factors per class of work (cost.DECODE_CLASSES) and the cost of one crossing in a decode graph,
    # fitted to real decodes of a model (oatoplan/calibrate.py); {} and 0: not calibrated
    decode_factors: dict[str, float] = field(default_factory=dict)
    decode_crossing_us: float = 0.0
    calibration: tuple[CalibrationArm, ...] = ()
    calibration_model: str = ""           # file name and sha256 prefix of the model calibrated on
    # GPU memory a llama.cpp process uses beyond llama.cpp's buffers and the pool (memory.pool_bytes), measured in
    # fresh processes by the calibration; 0: not measured (memory.gpu_overhead_bytes then assumes a value)
    gpu_overhead_bytes: int = 0
    gpu_overhead: tuple[GpuOverheadSample, ...] = ()
    # bytes per second the CPU threads read from host memory in a plain sum (profile_moe.host_read_bytes_per_s): what
    # bounds decode from host weights; 0: not measured (the bound then uses cpu_read_bytes_per_s)
    host_read_bytes_per_s: float = 0.0
    # weight streaming's fixed cost per streamed upload (calibrate.measure_stream_split); None: not measured (the cost
    # model then prices streamed splits as before it, by crossings)
    stream_split: StreamSplitCalibration | None = None
    # accelerators beyond gpu_device (more local GPUs, RPC devices), each with its ops in `ops` under its name
    devices: tuple[DeviceLink, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Bench (what `bench` measured)

@dataclass(frozen=True)
class BenchArm:
    name: str                     # "oatoplan plan", "llama-cpp-python defaults", ...
    flags: str                    # the equivalent llama.cpp flags
    plan: Plan                    # exactly what was loaded
    prediction: Prediction | None
    vram_bytes: int               # GPU memory in use after loading and a warm-up, less what was in use before
    prefill_tokens_per_s: tuple[float, ...]   # one sample per repetition
    decode_tokens_per_s: tuple[float, ...]
    # what llama.cpp reported allocating per device (weights, KV, compute, output buffers): unlike vram_bytes, no
    # process-wide allocations (CUDA context, library workspaces) can land in it
    allocated_bytes: dict[str, int] = field(default_factory=dict)
    # a reference, not a rival (the plan with weight streaming off, every unit on the GPU beyond the budget): left out
    # of every "best other arm" comparison
    reference: bool = False
    # weight streaming (ggml.stream_stats) over the timed repetitions: (weights streamed, bytes streamed, host weights
    # copied the stock way while streaming was on, VRAM bytes of this arm's staging rings); () on a build without it
    stream_stats: tuple[int, ...] = ()


@dataclass(frozen=True)
class BenchResult:
    schema_version: int
    created_utc: str
    machine: MachineIdentity
    model: ModelIdentity
    workload: Workload
    budget_bytes: int | None
    reps: int
    mode: str                     # "interleaved" (A B A B ...) or "sequential" (when the arms do not fit together)
    arms: tuple[BenchArm, ...]
    command: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Doctor (what `doctor` found)

@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""                 # what to do when not ok


@dataclass(frozen=True)
class Diagnosis:
    schema_version: int
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class CpuTrace:
    """What oatoplan's CPU op timing (native/ggml-cpu/oato-trace.h) saw since its last reset: graph totals and, per
    ggml op name, thread 0's ns (node start to the end of the barrier after it), nodes (a fused span counts once,
    under its first op), fused spans, and the MUL_MAT weight bytes read."""
    n_graphs: int
    graph_ns: int
    start_ns: int                       # entry to the last thread's arrival, summed over graphs
    op_ns: dict[str, int]
    op_count: dict[str, int]
    op_fused: dict[str, int]
    op_weight_bytes: dict[str, int]
