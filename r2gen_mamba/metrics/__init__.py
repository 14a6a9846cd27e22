"""NLG metrics (pycocoevalcap, as R2Gen) and the offline `evaluate` module that wraps them.

Importing this package is light: `evaluate` is imported only by `load_metric()`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .nlg import NLG_KEYS, build_coco_inputs, compute_nlg_metrics, normalize_report

if TYPE_CHECKING:
    import evaluate

# The `evaluate` module file, shipped as package data (setup.cfg: `metrics/*.py`).
METRIC_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "r2gen_nlg.py")


def load_metric(**kwargs) -> evaluate.EvaluationModule:
    """The R2Gen NLG metric as an `evaluate` module, loaded from the installed file (no Hub access).

    `load_metric().compute(predictions=[...], references=[...])` returns
    `{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}`. Keyword arguments go to `evaluate.load`.
    """
    import evaluate

    return evaluate.load(METRIC_SCRIPT, **kwargs)


__all__ = ["METRIC_SCRIPT", "NLG_KEYS", "build_coco_inputs", "compute_nlg_metrics", "load_metric", "normalize_report"]
