"""Data: tokenizers (`tokenizer`), parallel preparation into token shards (`prepare`), the
prepared corpus on disk (`dataset`), the embedded corpus (`corpus`) and the loader (`loader`).

Import the submodules directly; this package imports nothing, so that preparation workers
(fresh processes) start without loading jax.
"""
