"""Annotation loading and validation, image/report datasets, image checks and the collator (real files on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import write_dicom
from PIL import Image

from r2gen_mamba.data import (
    AnnotationError,
    ImageCheckError,
    R2GenMambaDataCollator,
    check_images,
    load_annotation,
    load_annotation_dataset,
    load_image_text_dataset,
    set_transforms,
)
from r2gen_mamba.processing_r2gen_mamba import R2GenMambaImageProcessor, R2GenMambaProcessor, R2GenMambaTokenizer

REPORTS = [
    "The heart is normal. The lungs are clear.",
    "The heart is enlarged. No pleural effusion.",
    "Small left pleural effusion. The lungs are clear.",
    "No pneumothorax. The heart is normal.",
]


def _png(path: Path, value: int, size: int = 40, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((size, size), value * 257, dtype=np.uint16)).save(path)
    else:
        Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L").save(path)


def _dicom(path: Path, value: int, size: int = 40) -> None:
    write_dicom(path, np.full((size, size), value * 16, dtype=np.uint16))


@pytest.fixture
def tree(tmp_path):
    """An R2Gen-style IU tree: images/<id>/0.png, 1.png (8-bit, 16-bit, DICOM) and annotation.json."""
    images = tmp_path / "images"
    annotation = {"train": [], "val": [], "test": []}
    splits = ["train", "train", "train", "val", "test", "test"]
    for index, split in enumerate(splits):
        study = f"CXR{index}_IM-{index:04d}"
        _png(images / study / "0.png", 40 + index)
        if index == 2:
            _dicom(images / study / "1.dcm", 200)
            second = f"{study}/1.dcm"
        else:
            _png(images / study / "1.png", 150, mode="I;16" if index == 1 else "L")
            second = f"{study}/1.png"
        annotation[split].append(
            {
                "id": study,
                "report": REPORTS[index % len(REPORTS)],
                "image_path": [f"{study}/0.png", second],
                "split": split,
                "findings": ["cardiomegaly"] if index % 2 else [],
            }
        )
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(annotation))
    return path, images, annotation


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------------------------
# load_annotation
# ----------------------------------------------------------------------------------------------------------------


def test_load_annotation_valid(tree):
    path, _, annotation = tree
    data = load_annotation(path)
    assert list(data) == ["train", "val", "test"]
    assert [r["id"] for r in data["train"]] == [r["id"] for r in annotation["train"]]
    assert data["train"][0]["findings"] == [] and data["train"][1]["findings"] == ["cardiomegaly"]
    assert load_annotation(path, splits=["val"]).keys() == {"val"}


def test_malformed_json_names_file_and_position(tmp_path):
    path = _write(tmp_path, '{"train": [\n  {"id": "a", "report": "x",}\n]}')
    with pytest.raises(AnnotationError, match=r"bad\.json: malformed JSON at line 2 column \d+"):
        load_annotation(path)
    with pytest.raises(AnnotationError, match="not found"):
        load_annotation(tmp_path / "missing.json")
    with pytest.raises(AnnotationError, match="expected a JSON object"):
        load_annotation(_write(tmp_path, "[1, 2]"))


def test_missing_split_and_bad_records_are_all_named(tmp_path):
    with pytest.raises(AnnotationError, match=r"missing split\(s\) \['val', 'test'\]"):
        load_annotation(_write(tmp_path, {"train": []}))
    records = [
        {"id": "ok", "report": "Fine.", "image_path": ["ok/0.png"]},
        {"report": "No id.", "image_path": ["a.png"]},
        {"id": "no-report", "image_path": ["b.png"]},
        {"id": "no-image", "report": "Text."},
        {"id": "empty", "report": "   ", "image_path": ["c.png"]},
        "not a record",
    ]
    path = _write(tmp_path, {"train": records, "val": [], "test": []})
    with pytest.raises(AnnotationError) as info:
        load_annotation(path)
    message = str(info.value)
    assert "5 invalid record(s)" in message
    assert "split 'train' record #1: no 'id'" in message
    assert "record #2 (id 'no-report'): no 'report'" in message
    assert "record #3 (id 'no-image'): no 'image_path'" in message
    assert "record #4 (id 'empty'): empty report" in message
    assert "record #5: expected an object, got str" in message
    assert "id 'ok'" not in message


def test_empty_reports_skipped_with_count(tmp_path, caplog):
    records = [
        {"id": "a", "report": "Fine.", "image_path": "a.png"},
        {"id": "b", "report": "", "image_path": ["b.png"]},
        {"id": "c", "report": " \n", "image_path": ["c.png"]},
    ]
    path = _write(tmp_path, {"train": records, "val": [], "test": []})
    with pytest.raises(AnnotationError, match="id 'b'.*empty report"):
        load_annotation(path)
    with caplog.at_level("WARNING", logger="r2gen_mamba.data"):
        data = load_annotation(path, skip_empty_reports=True)
    assert [r["id"] for r in data["train"]] == ["a"]
    assert data["train"][0]["image_path"] == ["a.png"]  # a single path becomes a one-view list


def test_many_problems_are_capped(tmp_path):
    records = [{"id": f"r{i}", "report": "", "image_path": ["x.png"]} for i in range(30)]
    with pytest.raises(AnnotationError) as info:
        load_annotation(_write(tmp_path, {"train": records, "val": [], "test": []}))
    assert "30 invalid record(s)" in str(info.value) and "... and 10 more" in str(info.value)
    assert "id 'r19'" in str(info.value) and "id 'r20'" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# load_annotation_dataset / check_images
# ----------------------------------------------------------------------------------------------------------------


def test_annotation_dataset_columns(tree):
    path, images, annotation = tree
    dataset = load_annotation_dataset(path, images, num_views=2)  # images == <annotation dir>/images
    assert isinstance(dataset, datasets.DatasetDict)
    assert {name: len(split) for name, split in dataset.items()} == {"train": 3, "val": 1, "test": 2}
    assert {"id", "image_paths", "report", "findings", "split"} <= set(dataset["train"].column_names)
    row = dataset["test"][1]
    assert row["id"] == annotation["test"][1]["id"] and row["report"] == annotation["test"][1]["report"]
    assert row["image_paths"] == [str((images / p).resolve()) for p in annotation["test"][1]["image_path"]]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in row["image_paths"])
    # The default image root is <annotation dir>/images.
    assert load_annotation_dataset(path)["train"]["image_paths"] == dataset["train"]["image_paths"]


def test_wrong_number_of_views(tree, caplog):
    path, images, annotation = tree
    annotation["train"][1]["image_path"] = annotation["train"][1]["image_path"][:1]
    path.write_text(json.dumps(annotation))
    with pytest.raises(AnnotationError, match=r"id 'CXR1_IM-0001'\): 1 image\(s\), expected 2"):
        load_annotation_dataset(path, images, num_views=2)
    assert len(load_annotation_dataset(path, images, num_views=2, skip_wrong_views=True)["train"]) == 2
    # check_images gives the same treatment.
    dataset = load_annotation_dataset(path, images)
    with pytest.raises(ImageCheckError, match=r"id 'CXR1_IM-0001': 1 view\(s\), expected 2"):
        check_images(dataset, num_views=2)
    assert len(check_images(dataset, num_views=2, skip=True)["train"]) == 2


def test_check_images_reports_every_bad_record(tree, caplog):
    path, images, _ = tree
    dataset = load_annotation_dataset(path, images)
    assert check_images(dataset, decode=True) is dataset  # PNG 8/16-bit and DICOM all readable
    (images / "CXR0_IM-0000" / "1.png").unlink()  # missing
    (images / "CXR3_IM-0003" / "0.png").write_bytes(b"not a png")  # unreadable
    data = (images / "CXR4_IM-0004" / "1.png").read_bytes()
    (images / "CXR4_IM-0004" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    (images / "CXR2_IM-0002" / "1.dcm").write_bytes(b"\0" * 200)  # not DICOM
    with pytest.raises(ImageCheckError) as info:
        check_images(dataset, decode=True)
    message = str(info.value)
    assert "4 of 6 record(s)" in message
    assert "split 'train' id 'CXR0_IM-0000'" in message and "1.png: missing" in message
    assert "split 'val' id 'CXR3_IM-0003'" in message and "unreadable" in message
    assert "id 'CXR4_IM-0004'" in message and "id 'CXR2_IM-0002'" in message
    assert "id 'CXR1_IM-0001'" not in message and "id 'CXR5_IM-0005'" not in message
    with caplog.at_level("WARNING", logger="r2gen_mamba.data"):
        kept = check_images(dataset, skip=True, decode=True)
    assert {name: split["id"] for name, split in kept.items()} == {
        "train": ["CXR1_IM-0001"],
        "val": [],
        "test": ["CXR5_IM-0005"],
    }
    assert "skipped 4 of 6" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# load_image_text_dataset
# ----------------------------------------------------------------------------------------------------------------


def test_image_text_dataset_from_image_features(tmp_path):
    frontal = [Image.fromarray(np.full((24, 24), 30 + i, dtype=np.uint8)) for i in range(3)]
    lateral = [Image.fromarray(np.full((24, 24), 200 + i, dtype=np.uint8)) for i in range(3)]
    source = datasets.Dataset.from_dict(
        {
            "frontal": frontal,
            "lateral": lateral,
            "text": REPORTS[:3],
            "study": ["s0", "s1", "s2"],
            "age": [50, 60, 70],
        },
        features=datasets.Features(
            {
                "frontal": datasets.Image(),
                "lateral": datasets.Image(),
                "text": datasets.Value("string"),
                "study": datasets.Value("string"),
                "age": datasets.Value("int32"),
            }
        ),
    )
    datasets.DatasetDict({"train": source, "test": source.select([0])}).save_to_disk(tmp_path / "saved")
    loaded = load_image_text_dataset(
        tmp_path / "saved", image_column=["frontal", "lateral"], text_column="text", id_column="study"
    )
    assert set(loaded) == {"train", "test"}
    train = loaded["train"]
    assert set(train.column_names) == {"id", "report", "images", "age"}
    assert train["id"] == ["s0", "s1", "s2"] and train["report"] == REPORTS[:3] and train["age"] == [50, 60, 70]
    assert len(train[1]["images"]) == 2 and isinstance(train[1]["images"][0]["bytes"], bytes)
    assert check_images(loaded, num_views=2) is loaded
    # Without an id column the row index is the id, prefixed with the split name.
    one_view = load_image_text_dataset(tmp_path / "saved", image_column="frontal", text_column="text")
    assert one_view["train"]["id"] == ["train-0", "train-1", "train-2"] and one_view["test"]["id"] == ["test-0"]
    with pytest.raises(ValueError, match=r"column\(s\) \['missing'\] not found"):
        load_image_text_dataset(tmp_path / "saved", image_column="missing", text_column="text")


def test_image_text_dataset_from_csv_paths(tmp_path):
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", 10 * i)
    csv = tmp_path / "data.csv"
    csv.write_text("path,findings\n" + "".join(f"img/{i}.png,{REPORTS[i]!r}\n" for i in range(3)).replace("'", '"'))
    dataset = load_image_text_dataset(
        csv, image_column="path", text_column="findings", split="train", image_dir=tmp_path
    )
    assert dataset["id"] == ["0", "1", "2"]
    assert dataset[2]["image_paths"] == [str((tmp_path / "img" / "2.png").resolve())]
    assert dataset[2]["report"] == REPORTS[2]
    (tmp_path / "img" / "1.png").unlink()
    with pytest.raises(ImageCheckError, match="id '1'"):
        check_images(dataset)
    assert check_images(dataset, skip=True)["id"] == ["0", "2"]


# ----------------------------------------------------------------------------------------------------------------
# Collator and lazy transforms
# ----------------------------------------------------------------------------------------------------------------


def _processor(annotation: Path, size: int = 32) -> R2GenMambaProcessor:
    tokenizer = R2GenMambaTokenizer.from_annotation(annotation, threshold=1)
    image_processor = R2GenMambaImageProcessor(size={"height": size, "width": size}, train_resize_shortest_edge=36)
    return R2GenMambaProcessor(image_processor, tokenizer, num_views=2)


def test_collator_from_raw_rows(tree):
    path, images, _ = tree
    dataset = load_annotation_dataset(path, images)
    processor = _processor(path)
    rows = [dataset["train"][i] for i in range(3)]
    batch = R2GenMambaDataCollator(processor, train=False)(rows)
    assert set(batch) == {"pixel_values", "labels", "decoder_input_ids", "decoder_attention_mask"}
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    expected = processor(text=[r["report"] for r in rows], return_tensors="pt")
    for key in ("labels", "decoder_input_ids", "decoder_attention_mask"):
        assert torch.equal(batch[key], expected[key])
    assert (batch["labels"] == -100).any()  # reports of different lengths are padded
    # Each view is the processor's eval transform of that file (16-bit PNG and DICOM included).
    for row_index, row in enumerate(rows):
        for view, image_path in enumerate(row["image_paths"]):
            reference = processor.image_processor.eval_transform(image_path)
            assert torch.allclose(batch["pixel_values"][row_index, view], torch.from_numpy(reference))
    # Train mode draws random crops: same shape, and reproducible from a seeded generator.
    first = R2GenMambaDataCollator(processor, train=True, generator=torch.Generator().manual_seed(1))(rows)
    second = R2GenMambaDataCollator(processor, train=True, generator=torch.Generator().manual_seed(1))(rows)
    assert first["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    short = R2GenMambaDataCollator(processor, max_length=4)(rows)
    assert short["labels"].shape == (3, 3)


def test_set_transforms_and_collator_agree(tree):
    path, images, _ = tree
    dataset = load_annotation_dataset(path, images)
    processor = _processor(path)
    transformed = set_transforms(dataset, processor)
    row = transformed["test"][0]
    assert row["pixel_values"].shape == (2, 3, 32, 32) and row["id"] == dataset["test"][0]["id"]
    collator = R2GenMambaDataCollator(processor)
    from_transform = collator([transformed["test"][i] for i in range(2)])
    from_paths = collator([dataset["test"][i] for i in range(2)])
    assert torch.equal(from_transform["pixel_values"], from_paths["pixel_values"])
    assert torch.equal(from_transform["labels"], from_paths["labels"])
    # The train split gets the augmentation (random crop of the 36-px resize), the others the plain resize.
    assert transformed["train"][0]["pixel_values"].shape == (2, 3, 32, 32)


def test_collator_with_image_features(tmp_path, tree):
    path, _, _ = tree
    frontal = [Image.fromarray(np.full((24, 24), 30 * i, dtype=np.uint8)) for i in range(2)]
    source = datasets.Dataset.from_dict(
        {"a": frontal, "b": frontal, "report": REPORTS[:2]},
        features=datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "report": datasets.Value("string")}),
    )
    source.save_to_disk(tmp_path / "single")
    dataset = load_image_text_dataset(tmp_path / "single", image_column=["a", "b"])
    batch = R2GenMambaDataCollator(_processor(path))([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32)
    assert batch["pixel_values"][0].mean() < batch["pixel_values"][1].mean()  # darker first study


def test_dataloader_batches_feed_the_model(tree):
    """A torch DataLoader over the dataset with the collator gives batches the model trains on."""
    from helpers import tiny_config

    from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration

    path, images, _ = tree
    processor = _processor(path)
    dataset = load_annotation_dataset(path, images)["train"]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=R2GenMambaDataCollator(processor, train=True), shuffle=False
    )
    model = R2GenMambaForConditionalGeneration(tiny_config(vocab_size=len(processor.tokenizer), image_size=32))
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 1]
    output = model(**batches[0])
    assert torch.isfinite(output.loss)
    assert output.logits.shape[:2] == batches[0]["labels"].shape
    output.loss.backward()


def test_mixed_field_types_and_duplicate_ids(tmp_path, caplog):
    records = [
        {"id": "a", "report": "Fine.", "image_path": ["a.png"], "age": 50},
        {"id": "a", "report": "Fine.", "image_path": ["b.png"], "age": "fifty"},
    ]
    (tmp_path / "images").mkdir()
    path = _write(tmp_path, {"train": records, "val": [], "test": []})
    with caplog.at_level("WARNING", logger="r2gen_mamba.data"):
        with pytest.raises(AnnotationError, match=r"bad\.json split 'train': cannot build a table"):
            load_annotation_dataset(path)
    assert "1 duplicate id(s): 'a' (train and train)" in caplog.text


def test_check_images_detects_dicom_as_the_loader_does(tmp_path):
    # `load_image` reads `.dicom` files and files with a DICM header whatever their name; the check must too.
    for name in ("a.dicom", "b.img"):
        _dicom(tmp_path / name, 100)
    dataset = datasets.Dataset.from_dict(
        {"id": ["s0"], "image_paths": [[str(tmp_path / "a.dicom"), str(tmp_path / "b.img")]], "report": ["x"]}
    )
    assert check_images(dataset, decode=True) is dataset
