"""Influence-function unlearning for PEFT adapters (the LLMEraser method).

The engine never imports grpc, vllm or prometheus: the sidecar builds on it.
"""

__version__ = "0.1.0"
