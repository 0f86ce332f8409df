"""The patched CUDA build against the CPU (issue #7): greedy tokens of the same model all on the GPU and all on the
CPU, in one process; reports the first divergence, the share of identical tokens, and the top-1 agreement rate
(the GPU's argmax at every step of the CPU's greedy sequence, teacher-forced, so that one early divergence does not
count for every later token). Prints one JSON line.

    python3 -m benchmarks.gpu_patched_check MODEL.gguf [N_TOKENS]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys

import numpy as np

PROMPT = "The three primary colors are"


@contextlib.contextmanager
def no_repack(active: bool):
    """llama-cpp-python does not expose llama_model_params.use_extra_bufts (llama.cpp's --no-repack)."""
    import llama_cpp.llama as llama_module
    original = llama_module.llama_cpp.llama_model_default_params

    def without_repack():
        params = original()
        params.use_extra_bufts = False
        return params
    if active:
        llama_module.llama_cpp.llama_model_default_params = without_repack
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def _load(model: str, n_gpu_layers: int, repack: bool):
    import llama_cpp
    with no_repack(not repack):
        return llama_cpp.Llama(model, n_gpu_layers=n_gpu_layers, n_ctx=256, seed=0, verbose=False)


def greedy(model: str, n_gpu_layers: int = 0, n_tokens: int = 32, prompt: str = PROMPT, repack: bool = True) -> list[int]:
    llm = _load(model, n_gpu_layers, repack)
    tokens = list(itertools.islice(llm.generate(llm.tokenize(prompt.encode()), temp=0.0), n_tokens))
    llm.close()
    return tokens


def top1_agreement(model: str, n_gpu_layers: int, reference: list[int], prompt: str = PROMPT) -> float:
    """Share of steps at which the model's argmax equals `reference`'s next token, given reference's prefix, one
    token at a time (the decode path that greedy generation takes)."""
    llm = _load(model, n_gpu_layers, True)
    llm.eval(llm.tokenize(prompt.encode()))
    hits = 0
    for token in reference:   # llama-cpp-python keeps no logits without logits_all: read llama.cpp's last row
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        hits += int(np.argmax(last) == token)
        llm.eval([token])
    llm.close()
    return hits / len(reference)


def main(argv: list[str]) -> int:
    from oatoplan.build import loaded_series
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
