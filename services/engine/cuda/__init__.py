"""The engine's CUDA path: a Triton paged-attention kernel, flash prefill, CUDA graphs for decode.

Imported only when an engine runs on ``cuda`` (``model_runner.create_runner``), so a machine
without a GPU or without Triton never imports any of it.
"""
