"""`r2gen-mamba evaluate` end to end on CSV files written here, with and without a tiny CheXbert checkpoint."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_chexbert import write_tiny_chexbert
from test_metrics import PREDICTIONS, REFERENCES

from r2gen_mamba.chexbert import CONDITIONS, CheXbertLabeler, compute_ce_metrics
from r2gen_mamba.cli import main
from r2gen_mamba.evaluation import shuffled_order
from r2gen_mamba.metrics import NLG_KEYS, compute_nlg_metrics

N = 12
IDS = [f"CXR{i:04d}_IM-{i}" for i in range(N)]
# Messy inputs as they come out of real pipelines: a newline, capitals, and one empty generation.
GENERATED = [p.capitalize() for p in PREDICTIONS[:N]]
GENERATED[1] = GENERATED[1].replace(" . ", " .\n", 1)
REFS = list(REFERENCES[:N])


def write_csv(path: Path, rows: list[list[str]], header=("id", "reference", "generated")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def predictions_csv(tmp_path) -> str:
    assert "" in GENERATED and any("\n" in g for g in GENERATED)
    return write_csv(tmp_path / "preds.csv", [list(r) for r in zip(IDS, REFS, GENERATED)])


def test_shuffled_order_is_a_seeded_derangement():
    order = shuffled_order(50, seed=3)
    assert sorted(order) == list(range(50))
    assert all(j != i for i, j in enumerate(order))
    assert order == shuffled_order(50, seed=3) and order != shuffled_order(50, seed=4)
    assert shuffled_order(2, seed=0) == [1, 0]
    with pytest.raises(ValueError):
        shuffled_order(1, seed=0)


def test_nlg_only_with_meteor_and_baseline(tmp_path, predictions_csv, capsys):
    output = tmp_path / "out" / "metrics.json"
    assert main(["evaluate", "--predictions", predictions_csv, "--output", str(output), "--baseline-seed", "7"]) == 0
    metrics = json.loads(output.read_text())
    assert metrics["num_studies"] == N
    expected = compute_nlg_metrics(GENERATED, REFS, meteor=False)
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
        assert metrics[key] == expected[key], key
    assert 0 < metrics["meteor"] < 1
    assert "ce_f1" not in metrics and metrics["files"] == {}
    baseline = metrics["baseline_shuffled"]
    assert baseline["seed"] == 7
    order = shuffled_order(N, 7)
    expected_baseline = compute_nlg_metrics([REFS[j] for j in order], REFS, meteor=False)
    for key in ("bleu_4", "rouge_l", "cider"):
        assert baseline[key] == expected_baseline[key], key
    assert 0 < baseline["meteor"] < 1
    assert "pycocoevalcap" in metrics["conventions"]["nlg"] and metrics["conventions"]["clean"] == "none"
    table = capsys.readouterr().out
    assert "bleu_4" in table and "shuffled refs" in table


@pytest.mark.parametrize("observations", ["all", "common5"])
def test_with_tiny_chexbert_and_cleaning(tmp_path, predictions_csv, capsys, observations):
    from r2gen_mamba.processing_r2gen_mamba import clean_report

    checkpoint = write_tiny_chexbert(str(tmp_path / "chexbert"))
    output = tmp_path / "metrics.json"
    argv = ["evaluate", "--predictions", predictions_csv, "--output", str(output), "--chexbert", checkpoint]
    argv += ["--bert-tokenizer", str(tmp_path / "chexbert"), "--num-attention-heads", "2", "--clean", "iu_xray"]
    argv += ["--skip-meteor", "--uncertain", "positive", "--average", "micro", "--observations", observations]
    assert main(argv) == 0
    metrics = json.loads(output.read_text())

    cleaned_refs = [clean_report(r, "iu_xray") for r in REFS]
    cleaned_gen = [clean_report(g, "iu_xray") for g in GENERATED]
    expected = compute_nlg_metrics(cleaned_gen, cleaned_refs, meteor=False)
    assert metrics["bleu_4"] == expected["bleu_4"] and metrics["cider"] == expected["cider"]
    assert metrics["meteor"] is None

    labeler = CheXbertLabeler.from_pretrained(checkpoint, num_attention_heads=2)
    ref_labels, gen_labels = labeler(cleaned_refs), labeler(cleaned_gen)
    ce = compute_ce_metrics(ref_labels, gen_labels, uncertain="positive", average="micro", observations=observations)
    for key in ("ce_precision", "ce_recall", "ce_f1"):
        assert metrics[key] == ce[key], key
    assert metrics["ce_per_observation"] == ce["per_observation"]
    assert len(metrics["ce_per_observation"]) == (14 if observations == "all" else 5)
    assert metrics["conventions"]["ce"]["uncertain"] == "positive"
    assert metrics["conventions"]["ce"]["average"] == "micro"

    # The baseline's CE uses the reference labels in shuffled order (labels depend only on the text).
    order = shuffled_order(N, 0)
    ce_base = compute_ce_metrics(
        ref_labels, ref_labels[order], uncertain="positive", average="micro", observations=observations
    )
    assert metrics["baseline_shuffled"]["ce_f1"] == ce_base["ce_f1"]

    with open(metrics["files"]["labels_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * N and list(rows[0]) == ["id", "source", *CONDITIONS]
    generated_rows = [r for r in rows if r["source"] == "generated"]
    assert [r["id"] for r in generated_rows] == IDS
    for row, labels in zip(generated_rows, gen_labels):
        assert [r if r else "nan" for r in (row[c] for c in CONDITIONS)] == [
            "nan" if math.isnan(v) else str(int(v)) for v in labels
        ]
    with Image.open(metrics["files"]["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    out = capsys.readouterr().out
    assert "Cardiomegaly" in out and "ce_f1" in out


def test_bad_inputs_exit_with_a_message(tmp_path, capsys):
    bad = write_csv(tmp_path / "bad.csv", [["a", "ref"]], header=("id", "reference"))
    assert main(["evaluate", "--predictions", bad, "--output", str(tmp_path / "m.json")]) == 1
    err = capsys.readouterr().err
    assert "missing column(s) ['generated']" in err and bad in err
    dup = write_csv(tmp_path / "dup.csv", [["a", "x y", "x"], ["a", "y z", "y"]])
    assert main(["evaluate", "--predictions", dup, "--output", str(tmp_path / "m.json")]) == 1
    assert "duplicate id(s) ['a']" in capsys.readouterr().err
    missing = str(tmp_path / "nowhere.csv")
    assert main(["evaluate", "--predictions", missing, "--output", str(tmp_path / "m.json")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", "--output", str(tmp_path / "m.json")]) == 2
    assert not (tmp_path / "m.json").exists()


def test_generates_predictions_with_a_model_first(tmp_path, capsys):
    inference_utils = pytest.importorskip("inference_utils")
    model_dir = inference_utils.save_tiny_model(tmp_path / "model")
    records = []
    for i, report in enumerate(inference_utils.REPORTS * 2):
        study = f"s{i}"
        inference_utils.write_study(tmp_path / "images" / study, ("png", "png"), seed=i)
        records.append({"id": study, "report": report, "image_path": [f"{study}/0.png", f"{study}/1.png"]})
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"train": records[:2], "val": [], "test": records}))
    output = tmp_path / "metrics.json"
    argv = ["evaluate", "--model", str(model_dir), "--annotation", str(annotation), "--image-dir"]
    argv += [str(tmp_path / "images"), "--output", str(output), "--skip-meteor", "--batch-size", "3"]
    assert main(argv) == 0
    metrics = json.loads(output.read_text())
    predictions = Path(metrics["predictions"])
    assert predictions.name == "metrics_predictions.csv"
    with open(predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [r["id"] for r in records]

    # References are R2Gen's decoded ones (cleaned, cut to max length); generated equals one-at-a-time generation.
    processor = inference_utils.tiny_processor()
    model = inference_utils.tiny_model(len(processor.tokenizer))
    studies = [[str(tmp_path / "images" / r["id"] / f"{v}.png") for v in (0, 1)] for r in records]
    assert [r["generated"] for r in rows] == inference_utils.reference_reports(model, processor, studies)
    labels = processor(text=[r["report"] for r in records], return_tensors="np")["labels"]
    decoded = processor.batch_decode(np.where(labels < 0, 0, labels).tolist(), skip_special_tokens=True)
    assert [r["reference"] for r in rows] == decoded
    assert rows[0]["reference"].startswith("the heart is normal in size .")
    expected = compute_nlg_metrics([r["generated"] for r in rows], decoded, meteor=False)
    assert {k: metrics[k] for k in NLG_KEYS} == expected
