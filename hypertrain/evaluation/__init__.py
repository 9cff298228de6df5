"""Evaluation: S-NI generation metrics (exact match, ROUGE-L) and P3 rank classification, in training
(:func:`hypertrain.evaluation.runner.evaluate_in_training`, every rank) and standalone (``hypertrain eval``).

Modules: ``metrics`` (pure metric functions), ``data`` (evaluation sets), ``adapters`` (one interface over HART and
PHA), ``sni`` (generation), ``p3`` (rank classification), ``runner`` (distributed work split, gather, reports),
``cli``. See ``docs/evaluation.md``. Nothing is imported here, so ``hypertrain --help`` stays fast.
"""
