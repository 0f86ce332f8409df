"""The patched CUDA build against the CPU (issue #7): greedy tokens of the same model all on the GPU and all on the
CPU, in one process; reports the first divergence, the share of identical tokens, and the top-1 agreement rate
(the GPU's argmax at every step of the CPU's greedy sequence, teacher-forced, so that one early divergence does not
count for every later token). Prints one JSON line.

    python3 -m benchmarks.gpu_patched_check MODEL.gguf [N_TOKENS]
"""

from __future__ import annotations

import json
import sys

from oatoplan.machine import loaded_series
from oatoplan.testing import PROMPT, greedy, top1_agreement


def main(argv: list[str]) -> int:
    model, n = argv[0], int(argv[1]) if len(argv) > 1 else 32
    gpu, cpu = greedy(model, 99, n), greedy(model, 0, n)
    first = next((i for i, (a, b) in enumerate(zip(gpu, cpu)) if a != b), None)
    print(json.dumps({"model": model, "series": loaded_series(), "prompt": PROMPT, "n_tokens": n,
                      "identical": gpu == cpu, "first_divergence": first,
                      "same_position_share": sum(a == b for a, b in zip(gpu, cpu)) / n,
                      "gpu_top1_agreement_on_cpu_sequence": top1_agreement(model, 99, cpu),
                      "cpu_top1_agreement_on_cpu_sequence": top1_agreement(model, 0, cpu),
                      "gpu": gpu, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
