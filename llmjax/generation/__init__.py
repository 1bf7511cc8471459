"""Decoding internals; the public entry point is :func:`llmjax.generate.generate`.

``config`` (GenerationConfig), ``processors`` (temperature / top-k / top-p / min-new-tokens),
``beam`` (beam-search bookkeeping), ``families`` (how T5 and decoder models prefill and step).
"""
