"""The synthetic demo dataset: determinism, findings visible in the pixels, reports and the finding parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2gen_mamba.cli import main
from r2gen_mamba.data import check_images, load_annotation_dataset
from r2gen_mamba.processing_r2gen_mamba import clean_report
from r2gen_mamba.synthetic import FINDING_LABELS, finding_accuracy, generate_demo_dataset, parse_findings


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_studies=200, image_size=64, seed=3)
    annotation = json.loads(path.read_text())
    return path, annotation, [r for split in annotation.values() for r in split]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    first = generate_demo_dataset(tmp_path / "a", num_studies=12, image_size=48, seed=5).parent
    second = generate_demo_dataset(tmp_path / "b", num_studies=12, image_size=48, seed=5).parent
    other = generate_demo_dataset(tmp_path / "c", num_studies=12, image_size=48, seed=6).parent
    files = _files(first)
    assert len(files) == 1 + 12 * 2
    assert files == _files(second)
    other_files = _files(other)
    assert files.keys() == other_files.keys()
    assert sum(files[name] != other_files[name] for name in files) > 12


def test_annotation_format_and_splits(demo):
    path, annotation, records = demo
    assert list(annotation) == ["train", "val", "test"]
    assert [len(annotation[s]) for s in ("train", "val", "test")] == [140, 20, 40]
    for split, split_records in annotation.items():
        for record in split_records:
            assert record["split"] == split
            assert record["image_path"] == [f"{record['id']}/0.png", f"{record['id']}/1.png"]
            assert set(record["findings"]) <= set(FINDING_LABELS)
    dataset = check_images(load_annotation_dataset(path, num_views=2), num_views=2, decode=True)
    assert dataset["test"]["findings"] == [r["findings"] for r in annotation["test"]]
    with Image.open(dataset["train"][0]["image_paths"][1]) as image:
        assert image.mode == "L" and image.size == (64, 64)


def test_every_finding_and_normal_occur(demo):
    _, _, records = demo
    counts = {label: sum(label in r["findings"] for r in records) for label in FINDING_LABELS}
    assert all(count >= 20 for count in counts.values()), counts
    assert sum(not r["findings"] for r in records) >= 20


def test_parse_findings_recovers_ground_truth(demo):
    _, _, records = demo
    for record in records:
        truth = set(record["findings"])
        assert parse_findings(record["report"]) == truth, record["report"]
        # Decoded model output is the R2Gen-cleaned form ("the heart is enlarged . no pneumothorax .").
        assert parse_findings(clean_report(record["report"])) == truth, record["report"]


def test_reports_vary_and_stay_short(demo):
    _, _, records = demo
    lengths = [len(clean_report(r["report"]).split()) for r in records]
    assert 10 <= min(lengths) and max(lengths) <= 30
    # Normal studies are written in more than one way.
    normal = {r["report"] for r in records if not r["findings"]}
    assert len(normal) >= 3


def test_parse_findings_negation_and_sides():
    assert parse_findings("No pleural effusion or pneumothorax. Heart size is normal.") == set()
    assert parse_findings("there are bilateral pleural effusions .") == {"left_effusion", "right_effusion"}
    assert parse_findings("Small right pleural effusion. There is cardiomegaly.") == {"right_effusion", "cardiomegaly"}
    assert parse_findings("No focal consolidation or nodule. A pneumothorax is present.") == {"pneumothorax"}
    assert parse_findings("Pleural effusion.") == {"left_effusion", "right_effusion"}  # no side: both


def test_finding_accuracy():
    texts = ["The heart is enlarged. No pneumothorax.", "No pleural effusion.", "There is a nodule in the lung."]
    assert finding_accuracy(texts, [["cardiomegaly"], [], ["nodule"]]) == 1.0
    # Exact set match: a missing or an extra finding makes the study wrong.
    assert finding_accuracy(texts, [["cardiomegaly", "nodule"], [], []]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="3 generated texts but 2"):
        finding_accuracy(texts, [[], []])


def _region(image: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    size = image.shape[0]
    return image[int(y0 * size) : int(y1 * size), int(x0 * size) : int(x1 * size)]


def test_findings_are_visible(demo):
    """Simple pixel features separate every finding from its absence on every study (frontal and lateral)."""
    path, _, records = demo
    features: dict[str, tuple[list[float], list[float]]] = {}

    def add(name: str, present: bool, value: float) -> None:
        features.setdefault(name, ([], []))[present].append(value)

    for record in records:
        findings = set(record["findings"])
        frontal, lateral = (
            np.asarray(Image.open(path.parent / "images" / p), dtype=np.float32) for p in record["image_path"]
        )
        heart = np.median(_region(frontal, 0.48, 0.56, 0.62, 0.70))  # the heart is there in every study
        # Patient's left is the image right on a PA view.
        if "cardiomegaly" not in findings:  # an enlarged heart covers the left base
            add("left_effusion", "left_effusion" in findings, _region(frontal, 0.68, 0.74, 0.68, 0.74).mean() / heart)
        add("right_effusion", "right_effusion" in findings, _region(frontal, 0.26, 0.32, 0.68, 0.74).mean() / heart)
        heart_row = _region(frontal, 0.25, 0.9, 0.63, 0.67) > 0.93 * heart
        add("cardiomegaly", "cardiomegaly" in findings, heart_row.mean())
        add("pneumothorax", "pneumothorax" in findings, -_region(frontal, 0.19, 0.25, 0.40, 0.50).mean() / heart)
        lungs = max(_region(frontal, 0.12, 0.40, 0.25, 0.52).max(), _region(frontal, 0.60, 0.88, 0.25, 0.52).max())
        add("nodule", "nodule" in findings, lungs / heart)
        # Lateral view: the enlarged heart reaches further forward; fluid fills the posterior sulcus.
        lateral_heart = np.median(_region(lateral, 0.32, 0.40, 0.62, 0.70))
        add("lateral cardiomegaly", "cardiomegaly" in findings, _region(lateral, 0.17, 0.22, 0.64, 0.68).mean())
        effusion = bool(findings & {"left_effusion", "right_effusion"})
        add("lateral effusion", effusion, _region(lateral, 0.62, 0.68, 0.62, 0.68).mean() / lateral_heart)

    for name, (absent, present) in features.items():
        assert len(absent) >= 10 and len(present) >= 10, name
        assert min(present) > max(absent), f"{name}: present {min(present):.3f} <= absent {max(absent):.3f}"


def test_make_demo_data_command(tmp_path, capsys):
    output = tmp_path / "demo"
    argv = ["make-demo-data", "--output", str(output), "--num-studies", "10", "--image-size", "48", "--seed", "2"]
    assert main(argv + ["--num-views", "1"]) == 0
    assert "train 7, val 1, test 2" in capsys.readouterr().out
    annotation = json.loads((output / "annotation.json").read_text())
    assert all(len(r["image_path"]) == 1 for split in annotation.values() for r in split)
    reference = generate_demo_dataset(tmp_path / "ref", num_studies=10, image_size=48, seed=2, num_views=1)
    assert json.loads(reference.read_text()) == annotation
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        generate_demo_dataset(tmp_path / "bad", image_size=16)
