"""Quality evaluation of quantized models: `d2moe eval ppl` (held-out perplexity per bit-width,
`ppl.py`) and perplexity per policy under a budget through the executor's backend
(`policy_ppl.py`, driven by benchmarks/substitution.py).

Torch-free at import; `ppl`, `policy_ppl` and `cmd` import torch inside their functions.
"""
