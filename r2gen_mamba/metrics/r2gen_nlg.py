"""`evaluate` metric module: R2Gen's NLG metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) over pycocoevalcap.

Load it offline from the installed package with `r2gen_mamba.load_metric()` (or `evaluate.load(<path of this file>)`).
The scoring itself lives in `r2gen_mamba.metrics.nlg.compute_nlg_metrics`; see that module for the conventions.
"""

import datasets
import evaluate

from r2gen_mamba.metrics.nlg import compute_nlg_metrics

_STRING = datasets.Value("string")

_DESCRIPTION = """\
Report-generation NLG metrics exactly as R2Gen (Chen et al., EMNLP 2020) computes them: pycocoevalcap BLEU-1..4,
METEOR 1.5 and ROUGE-L, plus CIDEr-D, on whitespace-normalised strings without the PTB tokenizer. METEOR needs Java;
without it `meteor` is None and `meteor_unavailable` says why.
"""

_CITATION = """\
@inproceedings{chen-emnlp-2020-r2gen,
  title = {Generating Radiology Reports via Memory-driven Transformer},
  author = {Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang},
  booktitle = {Proceedings of the 2020 Conference on Empirical Methods in Natural Language Processing},
  year = {2020}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated reports (str), one per study.
    references: list of reference reports, one per study: a str or a list of str.
    meteor: bool, default True. False skips METEOR (then None).
Returns:
    dict with bleu_1, bleu_2, bleu_3, bleu_4, meteor, rouge_l, cider.
Examples:
    >>> metric = r2gen_mamba.load_metric()
    >>> metric.compute(predictions=["the heart is normal ."], references=["the heart is normal in size ."])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class R2GenNLG(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": _STRING, "references": datasets.Sequence(_STRING)}),
                datasets.Features({"predictions": _STRING, "references": _STRING}),
            ],
            reference_urls=["https://github.com/salaniz/pycocoevalcap", "https://github.com/zhjohnchan/R2Gen"],
        )

    def _compute(self, predictions, references, meteor: bool = True) -> dict:
        return compute_nlg_metrics(predictions, references, meteor=meteor)
