"""Quality evaluation of quantized models: `d2moe eval ppl` (held-out perplexity per bit-width).

Torch-free at import; `ppl` and `cmd` import torch inside their functions.
"""
