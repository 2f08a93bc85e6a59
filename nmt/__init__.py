"""nmt: train, translate and evaluate Transformer translation models from plain parallel text.

Data flow, one module per step:
text files (corpus) → tokenizer → id cache (cache) → batches (batching) → model → trainer (train)
→ model directory (checkpoint) → search → translate → metrics.

The Python API is `nmt.load(directory)` → `nmt.Model` (`nmt.api`).
"""

__version__ = "0.1.0"

from nmt.api import Model, load  # noqa: E402  (light: torch is imported inside load)

__all__ = ["Model", "load", "__version__"]
