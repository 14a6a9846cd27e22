"""NLG metric time for a MIMIC-CXR-test-sized set: `python benchmarks/run.py metrics [--json PATH]`.

Scores 3,858 synthetic report pairs (the MIMIC-CXR test split size) of realistic length (about 50-60 words each) with
the steps of `r2gen_mamba.metrics.compute_nlg_metrics` (pycocoevalcap BLEU, METEOR via Java, ROUGE-L, CIDEr-D) and
reports wall and CPU seconds per metric and in total (CPU includes the METEOR JVM; on a shared machine the wall time
depends on the load, which is recorded). Target: under 60 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time

SENTENCES = [
    "the heart size is normal .",
    "the heart is mildly enlarged .",
    "moderate cardiomegaly is unchanged from the prior examination .",
    "the mediastinal and hilar contours are within normal limits .",
    "the aorta is tortuous and calcified .",
    "the lungs are well expanded and clear .",
    "there is no focal consolidation , pleural effusion or pneumothorax .",
    "there is a small right pleural effusion with adjacent atelectasis .",
    "bilateral pleural effusions are moderate in size .",
    "there is mild pulmonary vascular congestion without frank edema .",
    "interstitial markings are increased , consistent with mild pulmonary edema .",
    "patchy opacity in the left lower lobe may represent atelectasis or pneumonia .",
    "bibasilar opacities likely reflect atelectasis .",
    "there is a right upper lobe nodule measuring 8 mm .",
    "the endotracheal tube tip is 4 cm above the carina .",
    "a right internal jugular central venous catheter terminates in the lower svc .",
    "the nasogastric tube courses below the diaphragm and out of view .",
    "a left chest wall pacemaker is present with leads in the right atrium and right ventricle .",
    "median sternotomy wires and mediastinal clips are intact .",
    "no acute osseous abnormality is seen .",
    "degenerative changes are noted in the thoracic spine .",
    "old healed fractures of the left posterior ribs are again seen .",
    "there is no free air under the diaphragm .",
    "the lungs are hyperinflated with flattening of the diaphragms , consistent with copd .",
    "compared to the prior study there is no significant interval change .",
    "the previously seen right basilar opacity has resolved .",
    "there is increased opacity at the left base concerning for pneumonia .",
    "the cardiomediastinal silhouette is stable .",
    "no pneumothorax is identified .",
    "there is blunting of the left costophrenic angle .",
]


def make_report(rng: random.Random, min_words: int = 50, max_words: int = 60, keep: list[str] | None = None) -> str:
    """Sentences drawn from the pool (starting with `keep`) until the report has min..max words."""
    target = rng.randint(min_words, max_words)
    sentences = list(keep or [])
    words = sum(len(s.split()) for s in sentences)
    pool = [s for s in SENTENCES if s not in sentences]
    rng.shuffle(pool)
    for sentence in pool:
        if words >= target:
            break
        sentences.append(sentence)
        words += len(sentence.split())
    return " ".join(sentences)


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(predictions, references): each prediction shares about half of its reference's sentences."""
    rng = random.Random(seed)
    predictions, references = [], []
    for _ in range(n):
        reference = make_report(rng)
        sentences = [s.strip() + " ." for s in reference.split(" .") if s.strip()]
        shared = rng.sample(sentences, max(1, len(sentences) // 2))
        predictions.append(make_report(rng, keep=shared))
        references.append(reference)
    return predictions, references


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-pairs", type=int, default=3858, help="report pairs (default: MIMIC-CXR test, 3858)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-meteor", action="store_true")


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the METEOR JVM is waited for, so it counts)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run(args: argparse.Namespace) -> dict:
    from r2gen_mamba.metrics import nlg

    predictions, references = make_pairs(args.num_pairs, args.seed)
    load_before = os.getloadavg()[0]
    steps = [("inputs", lambda: nlg.build_coco_inputs(predictions, references))]
    steps += [("bleu", lambda: nlg.bleu_scores(gts, res)["bleu_4"])]
    if not args.skip_meteor:
        steps += [("meteor", lambda: nlg.meteor_score(gts, res))]
    steps += [("rouge", lambda: nlg.rouge_score(gts, res)), ("cider", lambda: nlg.cider_score(gts, res))]
    rows, scores = [], {}
    for name, step in steps:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        value = step()
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        if name == "inputs":
            gts, res = value
            value = ""
        else:
            scores[name] = value
        rows.append({"step": name, "wall_s": wall, "cpu_s": cpu, "value": value})
    rows.append(
        {
            "step": "total",
            "wall_s": sum(r["wall_s"] for r in rows),
            "cpu_s": sum(r["cpu_s"] for r in rows),
            "value": "",
        }
    )
    return {
        "rows": rows,
        "num_pairs": args.num_pairs,
        "mean_words_reference": sum(len(r.split()) for r in references) / len(references),
        "mean_words_prediction": sum(len(p.split()) for p in predictions) / len(predictions),
        "scores": scores,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "target_wall_s": 60.0,
    }
