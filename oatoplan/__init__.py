"""oatoplan: place a GGUF model's tensors, KV cache and compute between the CPU and a GPU that is too small for it.

    import oatoplan
    llm = oatoplan.load("model.gguf", "plan.json")   # a llama_cpp.Llama with exactly the plan's placement
"""

__version__ = "0.1.0"

from .load import load  # noqa: E402  (the design card's entry point: oatoplan.load(model, plan))

__all__ = ["load", "__version__"]
