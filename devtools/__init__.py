"""What the demo, the tests and the benchmarks share, apart from the product: the end-to-end
demo (``make demo``), ``make serve``, a local vLLM process, tiny models built on the spot and
synthetic facts. Not installed with the product; run from the repository root."""
