"""Process-wide settings a command makes before it works: quiet libraries, OpenMP threads
that sleep when idle. Every entry point (the CLIs, the sidecar, the demo, the benchmarks)
calls them; nothing here loads torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Library chatter would bury the one-line error and the JSON line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):  # transformers is a dependency; be lenient all the same
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def passive_openmp_waits() -> None:
    """Let idle OpenMP threads sleep instead of spin; only effective before torch loads.

    With OpenMP's default busy-waiting, a CPU shared with another busy process (vLLM, a
    second job) made every gradient and curvature product 5-15x slower here (measured by
    the demo and the stage benchmark); passive waits removed that. OMP_WAIT_POLICY set by
    the user wins.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
