"""Unlearning benchmark in the style of TOFU/MUSE: ``python -m bench.unlearning [--quick] [--out DIR] [--device cpu]``.

SmolLM2-135M-Instruct with a LoRA (r=8 on q_proj, v_proj) is fine-tuned with
``eraser.train`` on synthetic facts about fictitious people (``devtools.synthetic``) until it
answers them. Then, on the same data in one run, every method in the registry
(``bench.unlearning.methods``: the original, retraining from scratch and warm, gradient
ascent, LLMEraser with the paper's solver settings, LLMEraser solved to convergence with
CG, the EK-FAC fast path, and the ``+refine`` variants) handles each task:

- instance removal of 1 %, 5 % and 10 % of the people (at least one person each);
- response correction: a share of one group's answers were trained wrong and are corrected;
- query modification: some questions were trained as questions about something else and
  are repaired.

Each is scored on the affected rows (NLL, greedy exact match, on the trained question
and a never-trained paraphrase), on retained and never-trained people (utility), by a
loss-based membership-inference AUC between affected and never-trained rows, by the
cosine of its parameter change with retraining's, and by wall time and peak memory.
Results: ``<out>/unlearning[-quick].json``, ``.md`` and two PNG plots. ``--quick`` is the
smallest size that still learns (a smoke test; it never overwrites the default results).
"""

from bench.unlearning.run import Settings, main

__all__ = ["Settings", "main"]
