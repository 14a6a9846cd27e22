"""`r2gen-mamba evaluate`: NLG metrics (as R2Gen) and CheXbert clinical efficacy for generated reports.

    r2gen-mamba evaluate --predictions preds.csv --output metrics.json
    r2gen-mamba evaluate --predictions preds.csv --chexbert chexbert.pth --bert-tokenizer bert-base-uncased/ \
        --output metrics.json
    r2gen-mamba evaluate --model MODEL_DIR --annotation annotation.json --image-dir images --split test \
        --output metrics.json                      # generates the predictions first (written to --predictions)

`preds.csv` has the columns `id,reference,generated` (what `train.py` and `r2gen-mamba generate` write). Outputs:
`metrics.json` (NLG metrics, CE metrics and per-observation scores when a CheXbert checkpoint is given, the
conventions used, and the same metrics for a shuffled-reference baseline), a labels CSV and a per-observation bar
chart (with CheXbert), and a table on stdout.

The shuffled baseline scores each reference against *another* study's reference (a seeded random derangement): the
score a model gets by writing a plausible report that ignores the image. On IU X-Ray test it is reported at about
BLEU-4 0.107, METEOR 0.160, ROUGE-L 0.305, so model scores should be read against it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .metrics import NLG_KEYS, compute_nlg_metrics

CE_KEYS = ("ce_precision", "ce_recall", "ce_f1")
NLG_CONVENTION = (
    "pycocoevalcap Bleu(4) (closest ref length), Meteor 1.5, Rouge (ROUGE-L, beta 1.2), Cider (CIDEr-D) on "
    "whitespace-normalised strings, no PTB tokenizer, one hypothesis per study (as R2Gen modules/metrics.py)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", help="CSV with id,reference,generated (with --model: where to write it)")
    parser.add_argument("--output", required=True, help="metrics JSON to write")
    parser.add_argument("--labels-csv", help="CheXbert labels CSV (default: <output stem>_labels.csv)")
    parser.add_argument("--plot", help="per-observation bar chart PNG (default: <output stem>_per_observation.png)")
    parser.add_argument(
        "--clean",
        choices=["iu_xray", "mimic_cxr", "none"],
        default="none",
        help="apply R2Gen's report cleaning to references and generated reports first (default: none)",
    )
    parser.add_argument("--skip-meteor", action="store_true", help="do not run METEOR (Java); it is reported as null")

    ce = parser.add_argument_group("clinical efficacy (CheXbert)")
    ce.add_argument("--chexbert", help="local chexbert.pth, or a Hub repo id holding it (StanfordAIMI/RRG_scorers)")
    ce.add_argument("--chexbert-filename", default="chexbert.pth", help="file name inside a Hub repo")
    ce.add_argument("--bert-tokenizer", help="folder with vocab.txt or Hub id (default: beside the checkpoint)")
    ce.add_argument("--bert-config", help="BERT config folder or Hub id (default: inferred from the checkpoint)")
    ce.add_argument("--num-attention-heads", type=int, help="with an inferred config (default: hidden // 64)")
    ce.add_argument("--chexbert-batch-size", type=int, default=18, help="reports per CheXbert batch (default 18)")
    ce.add_argument(
        "--uncertain",
        choices=["negative", "positive"],
        default="negative",
        help="uncertain labels count as negative (R2Gen family, default) or positive (CheXbert/RRG)",
    )
    ce.add_argument("--average", choices=["macro", "micro", "example"], default="macro", help="default: macro")
    ce.add_argument(
        "--observations", choices=["all", "common5"], default="all", help="14 observations (default) or common 5"
    )

    base = parser.add_argument_group("shuffled-reference baseline")
    base.add_argument("--baseline-seed", type=int, default=0, help="seed of the reference shuffle (default 0)")
    base.add_argument("--no-baseline", action="store_true", help="skip the shuffled-reference baseline")

    gen = parser.add_argument_group("generate the predictions first")
    gen.add_argument("--model", help="model folder or Hub id")
    gen.add_argument("--annotation", help="R2Gen annotation.json")
    gen.add_argument("--image-dir", help="root of the annotation's image paths (default: the annotation's folder)")
    gen.add_argument("--split", default="test", help="annotation split (default: test)")
    gen.add_argument("--batch-size", type=int, default=8, help="studies per generation batch (default 8)")
    gen.add_argument("--num-beams", type=int, help="beam size (default: the model's generation config)")
    gen.add_argument("--max-length", type=int, help="maximum generated length (default: the model's)")
    gen.add_argument(
        "--raw-references",
        action="store_true",
        help="score against the annotation's raw reports instead of R2Gen's decoded references (cleaned and cut "
        "to the tokenizer's max length, as R2Gen and train.py do)",
    )
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def read_predictions(path: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """Read `id,reference,generated` rows; empty cells are empty strings (an empty generation is scored)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("id", "reference", "generated") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            ids, references, generated = [], [], []
            for line, row in enumerate(reader, start=2):
                if None in row or any(row[c] is None for c in ("id", "reference", "generated")):
                    raise ValueError(f"{path} line {line}: expected {len(reader.fieldnames)} cells, got {row}")
                ids.append(row["id"])
                references.append(row["reference"])
                generated.append(row["generated"])
    except FileNotFoundError:
        raise ValueError(f"predictions file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    if not ids:
        raise ValueError(f"{path} has no rows")
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{path}: duplicate id(s) {duplicates[:10]}")
    return ids, references, generated


def clean_reports(reports: Sequence[str], dataset_name: str) -> list[str]:
    """R2Gen's cleaning (`clean_report` of the tokenizer) applied to each report."""
    from .processing_r2gen_mamba import clean_report

    return [clean_report(report, dataset_name) for report in reports]


def shuffled_order(n: int, seed: int) -> list[int]:
    """A seeded random derangement of range(n) (Sattolo's algorithm: one cycle, so no index maps to itself)."""
    if n < 2:
        raise ValueError("a shuffled baseline needs at least 2 studies")
    rng = np.random.default_rng(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i (not <= i) is what makes it a single cycle
        order[i], order[j] = order[j], order[i]
    return order


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


def score(
    references: Sequence[str],
    generated: Sequence[str],
    reference_labels: np.ndarray | None = None,
    generated_labels: np.ndarray | None = None,
    ce_options: dict | None = None,
    meteor: bool = True,
) -> dict:
    """NLG metrics, plus CE metrics when labels are given (see `r2gen_mamba.chexbert.compute_ce_metrics`)."""
    result = compute_nlg_metrics(list(generated), list(references), meteor=meteor)
    if reference_labels is not None:
        from .chexbert import compute_ce_metrics

        ce = compute_ce_metrics(reference_labels, generated_labels, **(ce_options or {}))
        result.update({key: ce[key] for key in CE_KEYS})
        result["ce_per_observation"] = ce["per_observation"]
        result["ce_conventions"] = ce["conventions"]
    return result


def write_labels_csv(
    path: str | os.PathLike, ids: Sequence[str], reference_labels: np.ndarray, generated_labels: np.ndarray
) -> None:
    """One row per (study, source): CheXpert codes 1 / 0 / -1, blank cell for not mentioned."""
    from .chexbert import CONDITIONS

    def cell(value: float) -> str:
        return "" if math.isnan(value) else str(int(value))

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "source", *CONDITIONS])
        for source, labels in (("reference", reference_labels), ("generated", generated_labels)):
            for study_id, row in zip(ids, labels):
                writer.writerow([study_id, source, *(cell(v) for v in row)])


def plot_per_observation(path: str | os.PathLike, per_observation: dict, title: str) -> None:
    """Horizontal grouped bars (precision, recall, F1) per observation, written as PNG without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(per_observation)
    y = np.arange(len(names))
    figure = Figure(figsize=(8, 0.45 * len(names) + 1.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    height = 0.27
    for k, metric in enumerate(("precision", "recall", "f1")):
        values = [per_observation[name][metric] for name in names]
        axes.barh(y + (k - 1) * height, values, height=height, label=metric)
    # The reference positive count tells how much each bar can be trusted (a 0/0 observation scores 0).
    axes.set_yticks(y, [f"{name} (n+={per_observation[name]['reference_positives']})" for name in names])
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("score")
    axes.set_title(title)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def format_table(metrics: dict) -> str:
    """Model vs shuffled baseline, then the per-observation CE table when present."""
    baseline = metrics.get("baseline_shuffled") or {}
    keys = [k for k in (*NLG_KEYS, *CE_KEYS) if k in metrics]

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"{'metric':<14}{'model':>10}{'shuffled refs':>16}"]
    lines += [f"{k:<14}{fmt(metrics[k]):>10}{fmt(baseline.get(k)) if baseline else '':>16}" for k in keys]
    if metrics.get("meteor_unavailable"):
        lines.append(f"(meteor: {metrics['meteor_unavailable']})")
    per_observation = metrics.get("ce_per_observation")
    if per_observation:
        lines.append("")
        lines.append(f"{'observation':<28}{'P':>8}{'R':>8}{'F1':>8}{'ref+':>7}{'gen+':>7}")
        for name, row in per_observation.items():
            lines.append(
                f"{name:<28}{row['precision']:>8.3f}{row['recall']:>8.3f}{row['f1']:>8.3f}"
                f"{row['reference_positives']:>7}{row['generated_positives']:>7}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Generation (--model)
# ---------------------------------------------------------------------------------------------------------------------


def generate_predictions(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Generate a report for each study of `--annotation`'s `--split` with `--model`; returns ids, refs, generated."""
    from .generation_cli import (
        check_studies,
        generate_reports,
        load_pipeline,
        r2gen_reference,
        studies_from_annotation,
    )

    studies = studies_from_annotation(args.annotation, args.image_dir, args.split)
    if not studies:
        raise ValueError(f"{args.annotation}: split {args.split!r} is empty")
    missing = [s.id for s in studies if not s.reference]
    if missing:
        raise ValueError(f"{args.annotation}: record(s) without a report in split {args.split!r}: {missing[:10]}")
    pipe = load_pipeline(args.model, args.device)
    check_studies(studies, pipe.model.config.num_views)
    # References first, as `r2gen-mamba generate` does: a report the tokenizer rejects fails before the generation.
    references = [s.reference for s in studies]
    if not args.raw_references:
        references = [r2gen_reference(pipe.processor, s.reference, s.id) for s in studies]
    generate_kwargs = {k: v for k, v in (("num_beams", args.num_beams), ("max_length", args.max_length)) if v}
    rows = generate_reports(pipe, studies, args.batch_size, **generate_kwargs)
    return [r["id"] for r in rows], references, [r["generated"] for r in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    stem = os.path.splitext(args.output)[0]
    if args.model and not args.annotation:
        print("error: --model needs --annotation (and usually --image-dir)", file=sys.stderr)
        return 2
    if not args.model and not args.predictions:
        print("error: give --predictions CSV, or --model with --annotation to generate it", file=sys.stderr)
        return 2
    try:
        if args.model:
            ids, references, generated = generate_predictions(args)
            from .training import write_predictions_csv

            args.predictions = args.predictions or f"{stem}_predictions.csv"
            Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
            write_predictions_csv(args.predictions, ids, references, generated)
            print(f"wrote {len(ids)} predictions to {args.predictions}", file=sys.stderr)
        else:
            ids, references, generated = read_predictions(args.predictions)
        if args.clean != "none":
            references = clean_reports(references, args.clean)
            generated = clean_reports(generated, args.clean)

        reference_labels = generated_labels = None
        if args.chexbert:
            from .chexbert import CheXbertLabeler

            labeler = CheXbertLabeler.from_pretrained(
                args.chexbert,
                bert_tokenizer=args.bert_tokenizer,
                bert_config=args.bert_config,
                num_attention_heads=args.num_attention_heads,
                filename=args.chexbert_filename,
                device=args.device,
                batch_size=args.chexbert_batch_size,
            )
            reference_labels = labeler(references)
            generated_labels = labeler(generated)
        ce_options = {"uncertain": args.uncertain, "average": args.average, "observations": args.observations}
        meteor = not args.skip_meteor

        metrics: dict = {"predictions": str(args.predictions), "num_studies": len(ids)}
        metrics.update(score(references, generated, reference_labels, generated_labels, ce_options, meteor))
        metrics["conventions"] = {"nlg": NLG_CONVENTION, "clean": args.clean}
        if args.chexbert:
            metrics["conventions"]["ce"] = metrics.pop("ce_conventions")
            metrics["conventions"]["chexbert"] = args.chexbert

        if args.no_baseline:
            metrics["baseline_shuffled"] = None
        elif len(ids) < 2:
            metrics["baseline_shuffled"] = None
            print("note: one study only, no shuffled baseline", file=sys.stderr)
        else:
            order = shuffled_order(len(ids), args.baseline_seed)
            shuffled = [references[j] for j in order]
            shuffled_labels = None if reference_labels is None else reference_labels[order]
            baseline = score(references, shuffled, reference_labels, shuffled_labels, ce_options, meteor)
            baseline.pop("ce_conventions", None)
            metrics["baseline_shuffled"] = {"seed": args.baseline_seed, **baseline}

        files = {}
        if args.chexbert:
            files["labels_csv"] = args.labels_csv or f"{stem}_labels.csv"
            write_labels_csv(files["labels_csv"], ids, reference_labels, generated_labels)
            files["plot"] = args.plot or f"{stem}_per_observation.png"
            title = f"CheXbert CE per observation (uncertain={args.uncertain}, n={len(ids)})"
            plot_per_observation(files["plot"], metrics["ce_per_observation"], title)
        metrics["files"] = files
    except (ValueError, OSError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    print(format_table(metrics))
    print(f"wrote {args.output}" + "".join(f", {path}" for path in files.values()))
    return 0
