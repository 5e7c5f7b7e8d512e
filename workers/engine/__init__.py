"""The quantization engine: pure torch, no Celery, no Flask, no SQL.

It streams one decoder layer at a time from safetensors shards, quantizes it,
checkpoints the packed tensors into a blob store and resumes from them.
"""

# In every checkpoint fingerprint: bump it with any change that can alter a result, so an
# older checkpoint fails closed instead of resuming into different bytes.
ENGINE_VERSION = "0.2.0"
