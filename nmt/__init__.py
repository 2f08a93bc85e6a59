"""nmt: train, translate and evaluate Transformer translation models from plain parallel text.

Data flow, one module per step:
text files (corpus) → tokenizer → id cache (cache) → batches (batching) → model → trainer (train)
→ model directory (checkpoint) → search → translate → metrics.
"""

__version__ = "0.1.0"
