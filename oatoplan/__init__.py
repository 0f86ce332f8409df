"""oatoplan: place a GGUF model's tensors, KV cache and compute between the CPU and a GPU that is too small for it."""

__version__ = "0.1.0"
