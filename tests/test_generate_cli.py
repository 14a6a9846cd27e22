"""`r2gen-mamba generate` on a saved tiny model and real PNG / JPEG / DICOM files."""

from __future__ import annotations

import csv
import json
import os

import pytest
from inference_utils import reference_reports, save_tiny_model, tiny_model, tiny_processor, write_study

from r2gen_mamba.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("cli") / "model"))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_images")
    kinds = [("png", "dcm"), ("jpg", "png16"), ("dcm", "jpg")]
    return {f"study{i}": write_study(root / f"study{i}", pair, seed=i) for i, pair in enumerate(kinds)}


@pytest.fixture(scope="module")
def expected(studies):
    processor = tiny_processor()
    model = tiny_model(len(processor.tokenizer))  # the same weights save_tiny_model wrote (same seed)
    texts = reference_reports(model, processor, list(studies.values()))
    assert len(set(texts)) == len(texts)
    return dict(zip(studies, texts))


def test_one_study_prints_the_report(model_dir, studies, expected, capsys):
    assert main(["generate", "--model", model_dir, *studies["study0"], "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected["study0"]


def test_csv_batch_to_csv(model_dir, studies, expected, tmp_path):
    table = tmp_path / "in.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image_frontal", "image_lateral", "reference"])
        for study_id, (first, second) in studies.items():
            writer.writerow([study_id, first, second, f"The lungs are clear. Mild cardiomegaly in {study_id}!"])
    output = tmp_path / "preds.csv"
    argv = ["generate", "--model", model_dir, "--csv", str(table), "--output", str(output), "--batch-size", "2"]
    assert main(argv) == 0
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == list(studies)
    assert {row["id"]: row["generated"] for row in rows} == expected
    # R2Gen's decoded form: cleaned, lower-cased, unknown words -> <unk> (the tiny vocabulary lacks "study0").
    assert all(row["reference"] == "the lungs are clear . mild cardiomegaly in <unk> ." for row in rows)
    raw = tmp_path / "raw.csv"
    assert main(["generate", "--model", model_dir, "--csv", str(table), "--output", str(raw), "--raw-references"]) == 0
    with open(raw, newline="") as handle:
        assert next(csv.DictReader(handle))["reference"] == "The lungs are clear. Mild cardiomegaly in study0!"


def test_csv_with_paths_in_one_cell_relative_to_the_csv(model_dir, studies, expected, tmp_path):
    table = tmp_path / "in.csv"
    lines = ["id,image_path"]
    for study_id, paths in studies.items():
        lines.append(f"{study_id},{';'.join(os.path.relpath(p, tmp_path) for p in paths)}")
    table.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "preds.json"
    assert main(["generate", "--model", model_dir, "--csv", str(table), "--output", str(output)]) == 0
    rows = json.loads(output.read_text())
    assert rows == [{"id": k, "generated": v} for k, v in expected.items()]


def test_annotation_split_to_json_with_references(model_dir, studies, expected, tmp_path):
    image_dir = tmp_path / "images"
    records = []
    for study_id, paths in studies.items():
        for index, path in enumerate(paths):
            target = image_dir / study_id / f"{index}{path[path.rindex('.') :]}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(open(path, "rb").read())
        names = sorted(p.name for p in (image_dir / study_id).iterdir())
        records.append(
            {"id": study_id, "report": "Mild cardiomegaly.", "image_path": [f"{study_id}/{n}" for n in names]}
        )
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"train": records[:1], "val": [], "test": records[1:]}))
    output = tmp_path / "preds.json"
    argv = ["generate", "--model", model_dir, "--annotation", str(annotation), "--image-dir", str(image_dir)]
    assert main([*argv, "--split", "test", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())
    reference = "mild cardiomegaly ."  # R2Gen's decoded form of "Mild cardiomegaly."
    assert rows == [{"id": k, "generated": expected[k], "reference": reference} for k in ("study1", "study2")]
    assert main([*argv, "--split", "nope"]) == 1


def test_folder_of_study_folders(model_dir, studies, expected, tmp_path, capsys):
    root = next(iter(studies.values()))[0].rsplit("/", 2)[0]
    assert main(["generate", "--model", model_dir, "--folder", root]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{k}\t{v}" for k, v in expected.items()]


def test_num_beams_and_max_length(model_dir, studies, capsys):
    processor = tiny_processor()
    model = tiny_model(len(processor.tokenizer))
    (text,) = reference_reports(model, processor, [studies["study1"]], num_beams=1, max_length=4)
    argv = ["generate", "--model", model_dir, *studies["study1"], "--num-beams", "1", "--max-length", "4"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == text
    assert len(text.split()) <= 3


def test_bad_inputs_fail_with_the_file_named(model_dir, studies, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    assert main(["generate", "--model", model_dir, studies["study0"][0], str(broken)]) == 1
    assert "broken.jpg" in capsys.readouterr().err

    assert main(["generate", "--model", model_dir, studies["study0"][0]]) == 1
    err = capsys.readouterr().err
    assert "expects 2" in err and "0.png" in err

    table = tmp_path / "three.csv"
    table.write_text(f"id,image\nsA,{';'.join(studies['study0'] + studies['study1'][:1])}\n")
    assert main(["generate", "--model", model_dir, "--csv", str(table)]) == 1
    assert "'sA' has 3 image(s)" in capsys.readouterr().err

    table.write_text(f"id,image\nsB,{studies['study0'][0]};{tmp_path / 'gone.png'}\n")
    assert main(["generate", "--model", model_dir, "--csv", str(table)]) == 1
    assert "gone.png does not exist" in capsys.readouterr().err

    table.write_text("name,path\nx,y\n")
    assert main(["generate", "--model", model_dir, "--csv", str(table)]) == 1
    assert "need an `id` column" in capsys.readouterr().err

    assert main(["generate", "--model", str(tmp_path / "no_model"), *studies["study0"]]) == 1
    assert "no_model" in capsys.readouterr().err

    assert main(["generate", "--model", model_dir]) == 2
    assert main(["generate", "--model", model_dir, "--csv", str(table), "--folder", str(tmp_path)]) == 2
