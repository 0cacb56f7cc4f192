"""Integrations of fused_ce with other libraries, each imported on demand.

* :mod:`fused_ce.integrations.transformers` -- Hugging Face causal LMs:
  ``fused_ce.integrations.transformers.apply(model)`` (needs the ``hf`` extra).

Nothing here is imported by ``import fused_ce``, and importing this package imports
none of the libraries.
"""
