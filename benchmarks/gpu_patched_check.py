"""The patched CUDA build against the CPU: greedy tokens of the same model all on the GPU and all on the CPU, in one
process; reports the first divergence and the share of identical tokens. Prints one JSON line.

    python3 -m benchmarks.gpu_patched_check MODEL.gguf [N_TOKENS]
"""

from __future__ import annotations

import itertools
import json
import sys


def greedy(model: str, n_gpu_layers: int, n_tokens: int, prompt: str) -> list[int]:
    import llama_cpp
    llm = llama_cpp.Llama(model, n_gpu_layers=n_gpu_layers, n_ctx=256, seed=0, verbose=False)
    tokens = list(itertools.islice(llm.generate(llm.tokenize(prompt.encode()), temp=0.0), n_tokens))
    llm.close()
    return tokens


def main(argv: list[str]) -> int:
    from oatoplan.build import loaded_series
    model, n = argv[0], int(argv[1]) if len(argv) > 1 else 32
    prompt = "The three primary colors are"
    gpu, cpu = greedy(model, 99, n, prompt), greedy(model, 0, n, prompt)
    first = next((i for i, (a, b) in enumerate(zip(gpu, cpu)) if a != b), None)
    print(json.dumps({"model": model, "series": loaded_series(), "n_tokens": n, "identical": gpu == cpu,
                      "first_divergence": first, "same_position_share": sum(a == b for a, b in zip(gpu, cpu)) / n,
                      "gpu": gpu, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
