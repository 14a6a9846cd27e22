"""The `radiology-report-generation` pipeline on real PNG / 16-bit PNG / JPEG / DICOM files the tests write."""

from __future__ import annotations

import json

import pytest
import torch
from inference_utils import reference_reports, tiny_model, tiny_processor, write_study
from PIL import Image
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from r2gen_mamba import RadiologyReportGenerationPipeline
from r2gen_mamba.pipeline_r2gen_mamba import TASK, as_studies


@pytest.fixture(scope="module")
def parts():
    processor = tiny_processor()
    return tiny_model(len(processor.tokenizer)), processor


@pytest.fixture(scope="module")
def pipe(parts):
    model, processor = parts
    return pipeline(TASK, model=model, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    kinds = [("png", "dcm"), ("jpg", "png16"), ("dcm", "dcm"), ("png", "jpg")]
    return [write_study(root / f"s{i}", pair, seed=i) for i, pair in enumerate(kinds)]


def test_task_is_registered_with_the_pipeline_class(pipe):
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    assert isinstance(pipe, RadiologyReportGenerationPipeline)


def test_one_study_matches_direct_generate(parts, pipe, studies):
    model, processor = parts
    expected = reference_reports(model, processor, studies)
    assert len(set(expected)) > 1  # the tiny model's reports depend on the images
    for study, text in zip(studies, expected):
        output = pipe(study)
        assert output == [{"generated_text": text}]
        assert len(text.split()) > 3


def test_batch_of_studies_matches_one_by_one(parts, pipe, studies):
    model, processor = parts
    expected = reference_reports(model, processor, studies)
    for batch_size in (1, 3):
        outputs = pipe(studies, batch_size=batch_size)
        assert [out[0]["generated_text"] for out in outputs] == expected
        assert all(len(out) == 1 for out in outputs)


def test_pil_images_and_paths_give_the_same_report(pipe, studies):
    from r2gen_mamba import load_image

    images = [load_image(path) for path in studies[0]]
    assert all(isinstance(image, Image.Image) for image in images)
    assert pipe(images) == pipe(studies[0])


def test_generation_kwargs_pass_through(parts, pipe, studies):
    model, processor = parts
    for kwargs in ({"num_beams": 1, "max_length": 5}, {"num_beams": 3, "max_length": 8}):
        expected = reference_reports(model, processor, studies[:2], **kwargs)
        assert [out[0]["generated_text"] for out in pipe(studies[:2], **kwargs)] == expected
        assert all(len(text.split()) <= kwargs["max_length"] - 1 for text in expected)
    with torch.no_grad():
        pixel_values = processor(images=[studies[0]], return_tensors="pt")["pixel_values"]
        ids = model.generate(pixel_values=pixel_values, num_beams=3, num_return_sequences=2, max_length=8)
    output = pipe(studies[0], num_beams=3, num_return_sequences=2, max_length=8)
    assert [o["generated_text"] for o in output] == processor.batch_decode(ids, skip_special_tokens=True)


def test_wrong_view_count_names_the_files(pipe, studies):
    with pytest.raises(ValueError, match=r"expects 2 view\(s\) per study, got 1.*0\.png"):
        pipe(studies[0][0])
    with pytest.raises(ValueError, match="got 3"):
        pipe(studies[0] + studies[1][:1])
    with pytest.raises(ValueError, match="got 1"):
        pipe([studies[0], studies[1][:1]])


def test_unreadable_and_missing_files_name_the_file(pipe, studies, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        pipe([studies[0][0], str(broken)])
    fake_dicom = tmp_path / "fake.dcm"
    fake_dicom.write_text("not a dicom file")
    with pytest.raises(ValueError, match="fake.dcm"):
        pipe([str(fake_dicom), studies[0][0]])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe([studies[0][0], str(tmp_path / "missing.png")])


def test_input_forms():
    assert as_studies("a.png") == ([("a.png",)], False)
    assert as_studies(["a.png", "b.dcm"]) == ([("a.png", "b.dcm")], False)
    assert as_studies([["a.png", "b.png"], ("c.png", "d.png")]) == ([("a.png", "b.png"), ("c.png", "d.png")], True)
    for bad in ([], ["a.png", ["b.png"]], [[]], 3, {"image": "a.png"}):
        with pytest.raises(ValueError):
            as_studies(bad)


def test_pipeline_save_pretrained_declares_the_custom_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_r2gen_mamba.RadiologyReportGenerationPipeline"
    assert config["custom_pipelines"][TASK]["pt"] == ["AutoModelForImageTextToText"]
    assert (tmp_path / "saved" / "pipeline_r2gen_mamba.py").is_file()
    assert (tmp_path / "saved" / "modeling_r2gen_mamba.py").is_file()
