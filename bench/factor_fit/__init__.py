"""Factor-fit benchmark: the EK-FAC fit in one process against the fit sharded over ranks.

``python -m bench.factor_fit [--quick] [--out DIR] [--note TEXT]``

On the same rows of one adapter: the one-process fit (``eraser.factors.fit``, the existing
path, in this process), and the distributed fit (``eraser.distributed``: spawned ranks,
gloo on loopback) with 1 and 2 ranks. Each figure is the fit's own seconds (the two passes
and their reductions, as rank 0 records them in the cache's history) and the wall time of
the whole call (starting the ranks, loading the model in each, writing the cache). The
caches are compared with the one-process cache (the Kronecker sums, and the solve of
random vectors). Models: the tiny Llama built on the spot (a few hundred rows) and
SmolLM2-135M-Instruct (a few dozen rows). Results: ``<out>/factor_fit[-quick].json`` and ``.md``.
"""

from bench.factor_fit.run import Settings, main

__all__ = ["Settings", "main"]
