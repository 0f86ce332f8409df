"""llama.cpp's own names for what a plan places: tensor-override patterns (`-ot`), device and buffer-type names
(`-dev`, RPC devices), and the device its layer split (`-ngl`, `-ts`) gives a layer."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from .errors import PlanError
from .graph import CPU
from .inventory import BLOCK_NAME


def split_device(il: int, n_layer: int, n_gpu_layers: int, gpus: tuple[str, ...],
                 tensor_split: tuple[float, ...]) -> str:
    """The device llama.cpp gives layer il (il = n_layer: output) for n_gpu_layers and tensor_split, computed in
    float32 as llama_model::load_tensors does (cumulative shares, upper_bound)."""
    start, active = max(n_layer + 1 - n_gpu_layers, 0), min(n_gpu_layers, n_layer + 1)
    if il < start or il - start >= active:
        return CPU
    splits = np.cumsum(np.asarray(tensor_split, dtype=np.float32), dtype=np.float32)
    splits = splits / splits[-1]
    k = int(np.searchsorted(splits, np.float32(il - start) / np.float32(active), side="right"))
    return gpus[min(k, len(gpus) - 1)]


def _escape(name: str) -> str:
    """A tensor name as a literal in the pattern subset: letters, digits and _ as they are, . and - escaped (an
    identity escape in both dialects); any other character is refused rather than trusted to mean the same."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise PlanError(f"tensor name {name!r} has characters oatoplan does not pass to llama.cpp's patterns; only "
                        f"letters, digits, '_', '.' and '-' are supported")
    return re.sub(r"([.\-])", r"\\\1", name)


# What override_pattern writes: ^(?: ... )$ around literals, \. \-, (?: | ) groups. Python's re and ECMAScript agree on
# every construct of it (no classes, no quantifiers, no anchors but the two ends).
OVERRIDE_PATTERN_SYNTAX = re.compile(r"\^\(\?:(?:[A-Za-z0-9_|]|\\[.\-]|\(\?:|\))*\)\$")


def override_pattern(names: list[str] | tuple[str, ...]) -> str:
    """One anchored pattern matching exactly `names`: block tensors grouped by role, roles with the same layers
    grouped together, e.g. ^(?:blk\\.(?:3|7)\\.(?:ffn_gate\\.weight|ffn_up\\.weight))$ . One pattern per destination
    keeps load time low: llama.cpp compiles every pattern once per tensor."""
    layers_by_suffix: dict[str, set[int]] = defaultdict(set)
    others = []
    for name in names:
        match = BLOCK_NAME.match(name)
        if match:
            layers_by_suffix[match.group(2)].add(int(match.group(1)))
        else:
            others.append(_escape(name))
    suffixes_by_layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for suffix, layers in layers_by_suffix.items():
        suffixes_by_layers[tuple(sorted(layers))].append(_escape(suffix))
    alternatives = [f"blk\\.(?:{'|'.join(map(str, layers))})\\.(?:{'|'.join(sorted(suffixes))})"
                    for layers, suffixes in sorted(suffixes_by_layers.items())]
    return "^(?:" + "|".join(alternatives + sorted(others)) + ")$"


def is_rpc(device: str) -> bool:
    """Whether a plan device is an RPC device, "RPC[host:port]"."""
    return device.startswith("RPC[")


def rpc_endpoint(device: str) -> str:
    """"RPC[host:port]" -> "host:port"."""
    return device[len("RPC["):-1]


def device_flag(device: str, rpc_servers: tuple[str, ...] = ()) -> str:
    """A plan device as llama.cpp's `-dev` names it: an RPC device ("RPC[host:port]") is "RPCn", n its server's place
    in `--rpc` (one device per server)."""
    if is_rpc(device):
        return f"RPC{rpc_servers.index(rpc_endpoint(device))}"
    return device


def buffer_type_flag(device: str) -> str:
    """A plan device as `-ot` names its buffer type: "RPC[host:port]" is "RPC0[host:port]" (device 0 of that
    server), the others keep their names."""
    return f"RPC0[{rpc_endpoint(device)}]" if is_rpc(device) else device
