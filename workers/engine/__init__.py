"""The quantization engine: pure torch, no Celery, no Flask, no SQL.

It streams one decoder layer at a time from safetensors shards, quantizes it,
checkpoints the packed tensors into a blob store and resumes from them.
"""

ENGINE_VERSION = "0.1.0"
