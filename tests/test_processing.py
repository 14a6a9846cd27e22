"""Tests of the R2Gen tokenizer, image loading/processing and R2GenMambaProcessor (real files written by the tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import write_dicom
from PIL import Image

import r2gen_mamba
from r2gen_mamba import (
    R2GenMambaImageProcessor,
    R2GenMambaImageTransform,
    R2GenMambaProcessor,
    R2GenMambaTokenizer,
    build_vocabulary,
    clean_report,
    load_image,
)
from r2gen_mamba.processing_r2gen_mamba import load_dicom

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_REPORTS = [
    "The heart is normal. No effusion.",
    "The heart is normal. Lungs are clear.",
    "Heart size is normal. No pneumothorax.",
    "The lungs are clear. No effusion.",
]
# Tokens only in val/test: they must not enter the vocabulary.
VAL_REPORTS = ["Cardiomegaly cardiomegaly cardiomegaly. Effusion effusion effusion."]


@pytest.fixture
def tokenizer() -> R2GenMambaTokenizer:
    return R2GenMambaTokenizer.from_reports(TRAIN_REPORTS, threshold=2)


@pytest.fixture
def processor(tokenizer) -> R2GenMambaProcessor:
    return R2GenMambaProcessor(R2GenMambaImageProcessor(), tokenizer, num_views=2)


def _rgb_image(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


# ----------------------------------------------------------------------------------------------------------------
# Cleaning (expected strings checked once against the official R2Gen `Tokenizer`)
# ----------------------------------------------------------------------------------------------------------------


def test_clean_report_architecture_example():
    text = "The heart is normal. 1. No acute disease. 2. Stable (mild) cardiomegaly; x-ray @ 3:45..  "
    expected = "the heart is normal . no acute disease . stable mild cardiomegaly x-ray  345 ."
    assert clean_report(text) == expected
    assert R2GenMambaTokenizer.clean_report(text, dataset_name="iu_xray") == expected
    assert clean_report(text, "mimic_cxr") == expected


def test_clean_report_character_range_quirk():
    # ':-\[' in the official regex is a range: ';<=>?@' and '[' go too, '-' stays.
    assert clean_report("a;b<c=d>e?f@g [h] {i} x-ray") == "abcdefg h i x-ray ."
    assert clean_report("a,b.c!d%e^f&g*h+i(j)k:l_m") == "abcdefghijklm ."


def test_clean_report_deleted_character_set_is_the_official_class():
    official = re.compile("[.,?;*!%^&_+():-\\[\\]{}]")
    chars = [chr(c) for c in range(0x250)] + ["\u0130", "\u03a3", "\u2003", "\uff21"]
    for char in chars:
        # Per sentence the class is applied after lowercasing; check the raw character class itself here.
        assert clean_report(f"x{char}y", "iu_xray") == clean_report_reference_sentence(official, f"x{char}y"), char
    deleted = {c for c in map(chr, range(128)) if official.sub("", c) == ""}
    assert deleted == set(".,?;*!%^&_+():<=>@[]{}") | set(map(chr, range(ord("A"), ord("Z") + 1)))


def clean_report_reference_sentence(pattern: re.Pattern, sentence: str) -> str:
    """One sentence through R2Gen's steps (enough for inputs without '. ' or numbering)."""
    text = sentence.strip().lower()
    text = re.sub(
        pattern, "", text.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    )
    return text + " ."


def test_clean_report_uppercase_is_lowercased_before_the_range_deletes_it():
    # The A-Z part of the range never bites: the sentence is lowercased first.
    assert clean_report("ABC Def") == "abc def ."


def test_clean_report_keeps_double_spaces_and_empty_sentences():
    assert clean_report("x-ray @ 3:45") == "x-ray  345 ."
    assert clean_report("normal. . heart") == "normal .  . heart ."
    assert clean_report("") == " ."
    assert clean_report("   ") == " ."


def test_clean_report_numbered_lists():
    assert (
        clean_report("1. Normal heart. 2. Clear lungs. 3. No effusion.")
        == "normal heart . clear lungs . no effusion ."
    )
    assert clean_report("heart ok 2. lungs ok") == "heart ok . lungs ok ."
    assert clean_report("normal. 4. heart. 5. ok") == "normal . heart . ok ."
    assert clean_report("Item 11. normal") == "item 1normal ."  # '1. ' is removed anywhere


def test_clean_report_quotes_slashes_and_dots():
    assert clean_report('He said "no" w/o it\'s fine\\ok') == "he said no wo its fineok ."
    assert clean_report("normal.... heart") == "normal . heart ."


def test_clean_report_mimic_newlines_underscores_spaces():
    text = "FINDINGS:\nHeart  normal.\n\nLungs __ clear___"
    assert clean_report(text, "mimic_cxr") == "findings heart normal . lungs  clear ."
    # The IU variant leaves newlines alone, so "normal.\n" is not a sentence break there.
    assert clean_report(text, "iu_xray") == "findings\nheart  normal\n\nlungs  clear ."


def test_clean_report_rejects_unknown_dataset_and_non_strings():
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        clean_report("x", "chexpert")
    with pytest.raises(TypeError, match="must be a str"):
        clean_report(None)


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _tokens_by_id(tokenizer) -> list[str]:
    """Vocabulary tokens in id order, without id 0."""
    return [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])][1:]


def _write_annotation(path, train, val=(), test=()):
    def records(reports, split):
        return [
            {"id": f"{split}{i}", "report": r, "image_path": [f"{split}{i}/0.png"], "split": split}
            for i, r in enumerate(reports)
        ]

    path.write_text(
        json.dumps({"train": records(train, "train"), "val": records(val, "val"), "test": records(test, "test")})
    )
    return path


def test_vocabulary_from_annotation_train_split_threshold_sorted(tmp_path):
    annotation = _write_annotation(tmp_path / "annotation.json", TRAIN_REPORTS, VAL_REPORTS, VAL_REPORTS)
    tokenizer = R2GenMambaTokenizer.from_annotation(annotation, dataset_name="iu_xray", threshold=2)
    # Counts in the train split: the 8, heart 3, is 3, normal 3, no 3, effusion 2, lungs 2, are 2, clear 2,
    # size 1, pneumothorax 1; val-only "cardiomegaly" never counts.
    expected = sorted([".", "the", "heart", "is", "normal", "no", "effusion", "lungs", "are", "clear", "<unk>"])
    vocab = tokenizer.get_vocab()
    assert _tokens_by_id(tokenizer) == expected
    assert {vocab[token] for token in expected} == set(range(1, len(expected) + 1))
    assert vocab["<bos/eos/pad>"] == 0
    assert len(tokenizer) == len(expected) + 1 == tokenizer.vocab_size
    assert tokenizer.model_max_length == 60 and tokenizer.dataset_name == "iu_xray"
    assert build_vocabulary(TRAIN_REPORTS, threshold=2) == expected

    tokenizer3 = R2GenMambaTokenizer.from_annotation(annotation, threshold=3)
    assert _tokens_by_id(tokenizer3) == sorted([".", "the", "heart", "is", "normal", "no", "<unk>"])


def test_vocabulary_mimic_defaults(tmp_path):
    reports = ["Heart normal.\nLungs clear."] * 10 + ["Rare finding."] * 9
    tokenizer = R2GenMambaTokenizer.from_reports(reports, dataset_name="mimic_cxr")  # threshold 10
    assert sorted(tokenizer.get_vocab()) == sorted(
        ["<bos/eos/pad>", ".", "<unk>", "clear", "heart", "lungs", "normal"]
    )
    assert tokenizer.model_max_length == 100


def test_bad_annotation_is_rejected(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({"train": [{"report": 3}]}))
    with pytest.raises(ValueError, match="train record 0 has no string 'report'"):
        R2GenMambaTokenizer.from_annotation(path)
    path.write_text(json.dumps({"val": []}))
    with pytest.raises(ValueError, match="'train' list"):
        R2GenMambaTokenizer.from_annotation(path)


def test_encode_is_official_encoding(tokenizer):
    vocab = tokenizer.get_vocab()
    report = "The heart is enlarged. No effusion."
    ids = [vocab[t] for t in ["the", "heart", "is"]] + [vocab["<unk>"], vocab["."], vocab["no"], vocab["effusion"]]
    assert tokenizer.encode(report) == [0] + ids + [vocab["."], 0]
    assert tokenizer(report)["input_ids"] == [0] + ids + [vocab["."], 0]
    assert tokenizer.pad_token_id == tokenizer.bos_token_id == tokenizer.eos_token_id == 0
    assert tokenizer.unk_token_id == vocab["<unk>"]


def test_r2gen_truncation_drops_final_zero(tokenizer):
    report = "The heart is normal. No effusion."  # 8 tokens + the two zeros
    full = tokenizer.encode(report)
    assert len(full) == 10
    assert tokenizer(report, truncation=True, max_length=5)["input_ids"] == full[:5]
    assert tokenizer(report, truncation=True)["input_ids"] == full  # model_max_length 60
    assert tokenizer(report, truncation=True, max_length=10)["input_ids"] == full
    batch = tokenizer([report, "heart"], truncation=True, max_length=5, padding=True)["input_ids"]
    assert batch == [full[:5], tokenizer.encode("heart") + [0] * (5 - len(tokenizer.encode("heart")))]

    # The fast path gives the same ids as the transformers call.
    reports = [report, "heart", "Unknown words here. 1. The heart. 2. Lungs clear.", "  "]
    for max_length in (None, 3, 5, 60):
        via_call = tokenizer(reports, truncation=max_length is not None, max_length=max_length)["input_ids"]
        assert tokenizer.encode_r2gen(reports, max_length=max_length) == via_call
    assert tokenizer.encode_r2gen(report) == [full]

    keep_eos = R2GenMambaTokenizer(vocab=list(tokenizer.encoder), r2gen_truncation=False)
    assert keep_eos(report, truncation=True, max_length=5)["input_ids"] == full[:4] + [0]


def test_decode_matches_official_decoding(tokenizer):
    report = "The heart is enlarged. No effusion."
    ids = tokenizer.encode(report)
    official_tokens = clean_report(report).split()
    official_tokens[3] = "<unk>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(official_tokens)
    # A generated sequence: starts with 0, stops at the next 0 (anything after is ignored).
    generated = ids + [5, 6, 0, 0]
    assert tokenizer.decode(generated, skip_special_tokens=True) == " ".join(official_tokens)
    assert tokenizer.decode(torch.tensor(generated), skip_special_tokens=True) == " ".join(official_tokens)
    # Labels (no leading 0) with -100 padding.
    assert tokenizer.decode(ids[1:] + [-100, -100], skip_special_tokens=True) == " ".join(official_tokens)
    assert tokenizer.decode([0, 0, 4], skip_special_tokens=True) == ""
    assert tokenizer.decode(ids).startswith("<bos/eos/pad> the heart") and tokenizer.decode(ids).endswith(
        ". <bos/eos/pad>"
    )
    assert tokenizer.batch_decode([ids, tokenizer.encode("heart")], skip_special_tokens=True) == [
        " ".join(official_tokens),
        "heart .",
    ]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, len(tokenizer)], skip_special_tokens=True)


def test_tokenizer_save_load_roundtrip(tmp_path, tokenizer):
    mimic = R2GenMambaTokenizer(vocab=list(tokenizer.encoder), dataset_name="mimic_cxr")
    mimic.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["processing_r2gen_mamba.py", "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["dataset_name"] == "mimic_cxr" and config["model_max_length"] == 100
    assert config["auto_map"]["AutoTokenizer"][0] == "processing_r2gen_mamba.R2GenMambaTokenizer"

    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is R2GenMambaTokenizer
    assert loaded.get_vocab() == mimic.get_vocab() and len(loaded) == len(mimic)
    assert loaded.dataset_name == "mimic_cxr" and loaded.model_max_length == 100 and loaded.r2gen_truncation
    text = "FINDINGS:\nThe heart is normal.\n\nNo effusion__"
    assert loaded.encode(text) == mimic.encode(text)


def _run_fresh_python(code: str, tmp_path) -> str:
    """Run `code` in a new interpreter that never imports r2gen_mamba (remote-code loading as on a user machine)."""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_remote_code_loading_without_the_package(tmp_path, processor):
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    image_path = tmp_path / "view.png"
    _rgb_image().save(image_path)
    out = _run_fresh_python(
        f"""
        import json, sys
        from transformers import AutoProcessor, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(saved)!r}, trust_remote_code=True)
        proc = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert "r2gen_mamba" not in sys.modules
        batch = proc(images=[{str(image_path)!r}] * 2, text="The heart is normal.")
        print(json.dumps({{"tok": type(tok).__name__, "proc": type(proc).__name__, "views": proc.num_views,
                          "ids": tok.encode("The heart is normal."), "labels": batch["labels"].tolist(),
                          "shape": list(batch["pixel_values"].shape), "sum": float(batch["pixel_values"].sum())}}))
        """,
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    local = processor(images=[str(image_path)] * 2, text="The heart is normal.")
    assert result["tok"] == "R2GenMambaTokenizer" and result["proc"] == "R2GenMambaProcessor"
    assert result["views"] == 2
    assert result["ids"] == processor.tokenizer.encode("The heart is normal.")
    assert result["labels"] == local["labels"].tolist()
    assert result["shape"] == [1, 2, 3, 224, 224]
    assert result["sum"] == pytest.approx(float(local["pixel_values"].sum()), rel=1e-6)


def test_processor_save_load_roundtrip(tmp_path, tokenizer):
    from transformers import AutoImageProcessor, AutoProcessor

    processor = R2GenMambaProcessor(
        R2GenMambaImageProcessor(size={"height": 64, "width": 64}, train_resize_shortest_edge=72),
        tokenizer,
        num_views=1,
    )
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_views"] == 1
    assert config["auto_map"]["AutoProcessor"] == "processing_r2gen_mamba.R2GenMambaProcessor"
    assert (
        config["image_processor"]["auto_map"]["AutoImageProcessor"]
        == "processing_r2gen_mamba.R2GenMambaImageProcessor"
    )

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is R2GenMambaProcessor and loaded.num_views == 1
    assert loaded.image_processor.size == {"height": 64, "width": 64}
    assert loaded.image_processor.train_resize_shortest_edge == 72
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    image = _rgb_image()
    a, b = processor(images=image, text="Heart is normal."), loaded(images=image, text="Heart is normal.")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(image_processor) is R2GenMambaImageProcessor


def test_image_processor_is_the_same_when_torchvision_is_installed(tmp_path, monkeypatch):
    # On a machine with torchvision, transformers 5 prefers the "torchvision" backend; ours must still load.
    from transformers import AutoImageProcessor
    from transformers.models.auto import image_processing_auto

    R2GenMambaImageProcessor().save_pretrained(tmp_path)
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is R2GenMambaImageProcessor
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is R2GenMambaImageProcessor


# ----------------------------------------------------------------------------------------------------------------
# Image loading: every mode written to disk
# ----------------------------------------------------------------------------------------------------------------


def test_png_8bit_gray_rgb_rgba_and_jpeg(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    loaded = np.asarray(load_image(tmp_path / "gray.png"))
    assert loaded.shape == (12, 10, 3) and loaded.dtype == np.uint8
    assert all(np.array_equal(loaded[..., c], gray) for c in range(3))

    rgb = np.asarray(_rgb_image(1))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "rgb.png"))), rgb)

    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgb)  # alpha dropped, as convert("RGB")

    Image.fromarray(gray, mode="L").save(tmp_path / "gray.jpg", quality=95)
    jpeg = np.asarray(load_image(tmp_path / "gray.jpg"))
    assert jpeg.shape == (12, 10, 3) and np.abs(jpeg[..., 0].astype(int) - gray).max() <= 8


def test_png_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000], [32768, 60000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as check:
        assert check.mode.startswith("I")  # a real 16-bit PNG
    loaded = np.asarray(load_image(tmp_path / "gray16.png"))
    assert loaded.shape == (2, 3, 3)
    # v / 257 rounded: 1000 -> 4 (PIL's convert("RGB") would clip it to 255).
    assert loaded[..., 0].tolist() == [[0, 1, 4], [128, 233, 255]]
    # Mode "I" (32-bit) images and uint16 arrays go the same way.
    assert np.array_equal(np.asarray(load_image(Image.fromarray(values.astype(np.int32), mode="I"))), loaded)
    assert np.array_equal(np.asarray(load_image(values)), loaded)


def test_numpy_inputs():
    assert np.asarray(load_image(np.full((4, 5), 1.0))).max() == 255
    assert np.asarray(load_image(np.zeros((4, 5, 1), dtype=np.uint8))).shape == (4, 5, 3)
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        load_image(np.full((4, 5), 2.0))
    with pytest.raises(ValueError, match="expected an array of shape"):
        load_image(np.zeros((4, 5, 2), dtype=np.uint8))


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    pytest.importorskip("pydicom")
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    # Modality LUT: 2 * v - 1000 -> [[-1000, 1000], [3000, 7190]]; window c=1000 w=2001 spans [-0.5, 1999.5].
    write_dicom(tmp_path / "mono2.dcm", stored, slope=2, intercept=-1000, center=1000, width=2001)
    windowed = np.asarray(load_image(tmp_path / "mono2.dcm"))
    assert windowed.shape == (2, 2, 3)
    assert windowed[..., 0].tolist() == [[0, 128], [255, 255]]  # (1000 - 999.5) / 2000 + 0.5 -> 127.56 -> 128

    write_dicom(
        tmp_path / "mono1.dcm", stored, photometric="MONOCHROME1", slope=2, intercept=-1000, center=1000, width=2001
    )
    assert np.asarray(load_image(tmp_path / "mono1.dcm"))[..., 0].tolist() == [[255, 127], [0, 0]]

    # No window: the full min..max range of the rescaled values; a file without the .dcm suffix is found by header.
    write_dicom(tmp_path / "plain", stored)
    assert np.asarray(load_image(tmp_path / "plain"))[..., 0].tolist() == [[0, 62], [125, 255]]
    assert np.array_equal(np.asarray(load_dicom(tmp_path / "plain")), np.asarray(load_image(tmp_path / "plain")))


def test_dicom_without_pydicom_gives_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    write_dicom(tmp_path / "x.dcm", np.zeros((2, 2), dtype=np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"x\.dcm.*needs pydicom.*r2gen-mamba\[dicom\]"):
        load_image(tmp_path / "x.dcm")


# ----------------------------------------------------------------------------------------------------------------
# Image processor and transforms
# ----------------------------------------------------------------------------------------------------------------


def test_eval_transform_matches_transformers_pil_reference():
    from transformers import ViTImageProcessorPil

    image = _rgb_image(2, size=(300, 257))
    reference = ViTImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )(image, return_tensors="np")["pixel_values"][0]
    ours = R2GenMambaImageProcessor()(image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    # ImageNet normalisation of a known pixel: 255 -> (1 - mean) / std.
    white = R2GenMambaImageProcessor()(Image.new("RGB", (10, 10), (255, 255, 255)), return_tensors="np")
    np.testing.assert_allclose(
        white["pixel_values"][0, :, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], rtol=1e-6
    )


def _position_image(width: int, height: int) -> Image.Image:
    """R = x, G = y, B = 0: a crop's top-left pixel tells where it was cut."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8), mode="RGB")


def _denormalize(pixels: np.ndarray) -> np.ndarray:
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    return np.round((pixels * std + mean) * 255).astype(int)


def test_train_transform_random_crop_and_flip_are_seeded():
    image_processor = R2GenMambaImageProcessor()
    image = _position_image(256, 250)  # shorter side 250 -> resized to 256 x 262 before the crop
    crops = []
    for seed in range(12):
        out = image_processor.train_transform(image, generator=torch.Generator().manual_seed(seed))
        again = image_processor.train_transform(image, generator=torch.Generator().manual_seed(seed))
        assert out.shape == (3, 224, 224) and np.array_equal(out, again)
        crops.append(_denormalize(out))
    # Flipped crops run right-to-left in x; unflipped left-to-right.
    directions = {int(np.sign(c[0, 0, -1] - c[0, 0, 0])) for c in crops}
    assert directions == {-1, 1}
    assert len({(c[0, 0, 0], c[1, 0, 0]) for c in crops}) > 6  # crops differ between seeds

    big = image_processor.train_transform(_rgb_image(3, size=(600, 400)), generator=torch.Generator().manual_seed(0))
    assert big.shape == (3, 224, 224)
    batch = image_processor([image, image], augment=True, generator=torch.Generator().manual_seed(0))
    assert batch["pixel_values"].shape == (2, 3, 224, 224)


def test_image_transform_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    for name in ("a0.png", "a1.png", "b0.png", "b1.png"):
        _rgb_image(len(name)).save(tmp_path / name)
    dataset = datasets.Dataset.from_dict(
        {"image_path": [["a0.png", "a1.png"], ["b0.png", "b1.png"]], "id": ["a", "b"]}
    )
    train = dataset.with_transform(R2GenMambaImageTransform(train=True, image_root=str(tmp_path), seed=0))
    item = train[0]
    assert item["id"] == "a" and item["pixel_values"].shape == (2, 3, 224, 224)
    evaluation = dataset.with_transform(R2GenMambaImageTransform(image_root=str(tmp_path)))
    expected = R2GenMambaImageProcessor()([str(tmp_path / "b0.png"), str(tmp_path / "b1.png")])["pixel_values"]
    assert torch.equal(evaluation[1]["pixel_values"], expected)
    again = dataset.with_transform(R2GenMambaImageTransform(train=True, image_root=str(tmp_path), seed=0))
    assert torch.equal(again[0]["pixel_values"], item["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


def test_processor_shapes_one_study_and_batch(processor, tmp_path):
    views = [_rgb_image(0), _rgb_image(1)]
    one = processor(images=views, text="The heart is normal.")
    assert one["pixel_values"].shape == (1, 2, 3, 224, 224) and one["pixel_values"].dtype == torch.float32
    path = tmp_path / "v.png"
    views[1].save(path)
    batch = processor(
        images=[views, [views[0], str(path)], views], text=["A.", "The heart is normal.", "No effusion."]
    )
    assert batch["pixel_values"].shape == (3, 2, 3, 224, 224)
    assert torch.equal(batch["pixel_values"][1], one["pixel_values"][0])
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == batch["decoder_attention_mask"].shape

    single_view = R2GenMambaProcessor(R2GenMambaImageProcessor(), processor.tokenizer, num_views=1)
    assert single_view(images=views[0])["pixel_values"].shape == (1, 1, 3, 224, 224)
    assert single_view(images=[[views[0]], [views[1]]])["pixel_values"].shape == (2, 1, 3, 224, 224)


def test_processor_label_conventions(processor):
    tokenizer = processor.tokenizer
    reports = ["The heart is normal. No effusion.", "Heart."]
    long_ids, short_ids = tokenizer.encode(reports[0]), tokenizer.encode(reports[1])
    out = processor(text=reports)
    assert set(out) == {"labels", "decoder_input_ids", "decoder_attention_mask"}
    width = len(long_ids) - 1
    assert out["labels"].tolist() == [long_ids[1:], short_ids[1:] + [-100] * (width - len(short_ids) + 1)]
    assert out["decoder_input_ids"].tolist() == [long_ids[:-1], short_ids[:-1] + [0] * (width - len(short_ids) + 1)]
    assert out["decoder_attention_mask"].tolist() == [
        [1] * width,
        [1] * (len(short_ids) - 1) + [0] * (width - len(short_ids) + 1),
    ]
    # R2Gen truncation: cut [0] + ids + [0] to max_length, the final 0 is lost.
    cut = processor(text=reports[0], max_length=5)
    assert cut["labels"].tolist() == [long_ids[1:5]] and cut["decoder_input_ids"].tolist() == [long_ids[:4]]
    assert 0 not in cut["labels"].tolist()[0]
    assert processor.batch_decode(out["labels"], skip_special_tokens=True) == [
        "the heart is normal . no effusion .",
        "heart .",
    ]
    plain = processor(text=reports, return_tensors=None)
    assert plain["labels"][1][: len(short_ids) - 1] == short_ids[1:]


def test_processor_output_trains_the_model(tokenizer):
    pytest.importorskip("r2gen_mamba.modeling_r2gen_mamba")
    from helpers import tiny_config

    from r2gen_mamba import R2GenMambaForConditionalGeneration

    config = tiny_config(vocab_size=len(tokenizer))
    model = R2GenMambaForConditionalGeneration(config)
    processor = R2GenMambaProcessor(
        R2GenMambaImageProcessor(size={"height": 64, "width": 64}, train_resize_shortest_edge=72),
        tokenizer,
        num_views=config.num_views,
    )
    studies = [[_rgb_image(0), _rgb_image(1)], [_rgb_image(2), _rgb_image(3)]]
    batch = processor(
        images=studies,
        text=["The heart is normal. No effusion.", "Lungs are clear."],
        augment=True,
        generator=torch.Generator().manual_seed(0),
    )
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert out.logits.shape[:2] == batch["labels"].shape


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_truncated_and_unreadable_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    _rgb_image(0, size=(64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.png"):
        load_image(truncated)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.jpg.*not a readable image"):
        load_image(garbage)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    bad_dicom = tmp_path / "bad.dcm"
    bad_dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\1\2\3")
    with pytest.raises(ValueError, match=r"bad\.dcm"):
        load_image(bad_dicom)
    processor = R2GenMambaProcessor(R2GenMambaImageProcessor(), R2GenMambaTokenizer(vocab=["<unk>"]), num_views=2)
    with pytest.raises(ValueError, match=r"truncated\.png"):
        processor(images=[str(good), str(truncated)])


def test_pixel_limit_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    with pytest.raises(ValueError, match=r"big\.png' has 300x200 = 60000 pixels, over the limit of 50000"):
        load_image(path, max_pixels=50_000)
    image_processor = R2GenMambaImageProcessor(max_pixels=50_000)
    with pytest.raises(ValueError, match="over the limit of 50000"):
        image_processor(str(path))
    with pytest.raises(ValueError, match="over the limit"):
        image_processor(np.zeros((300, 200), dtype=np.uint8))
    assert load_image(path, max_pixels=None).size == (300, 200)
    # PIL's own bomb check also comes back naming the file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    with pytest.raises(ValueError, match=r"big\.png' is too large to load safely"):
        load_image(path, max_pixels=None)


def test_empty_reports_are_rejected_with_their_index(processor):
    with pytest.raises(ValueError, match="report 1 is empty or whitespace-only"):
        processor(text=["The heart is normal.", "  \n "])
    with pytest.raises(ValueError, match="report 0 is empty or whitespace-only"):
        processor(text="")
    with pytest.raises(ValueError, match="report 0 has no words left after R2Gen cleaning"):
        processor(text="... ;;")
    with pytest.raises(TypeError, match="report 0 must be a str"):
        processor(text=[None])


def test_view_count_mismatch(processor):
    image = _rgb_image()
    with pytest.raises(ValueError, match=r"study 0 has 1 image\(s\) but the model expects num_views=2"):
        processor(images=image)
    with pytest.raises(ValueError, match=r"study 1 has 3 image\(s\) but the model expects num_views=2"):
        processor(images=[[image, image], [image, image, image]])
    with pytest.raises(ValueError, match="got 2 studies but 1 reports"):
        processor(images=[[image, image], [image, image]], text=["Heart."])
    with pytest.raises(ValueError, match="mixes single images and lists"):
        processor(images=[image, [image, image]])


def test_package_registers_auto_classes():
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    config_class = r2gen_mamba.R2GenMambaConfig
    assert TOKENIZER_MAPPING[config_class] is R2GenMambaTokenizer
    assert IMAGE_PROCESSOR_MAPPING[config_class]["pil"] is R2GenMambaImageProcessor
    assert IMAGE_PROCESSOR_MAPPING[config_class]["torchvision"] is R2GenMambaImageProcessor
    assert PROCESSOR_MAPPING[config_class] is R2GenMambaProcessor
    assert R2GenMambaTokenizer._auto_class == AutoTokenizer.__name__
    assert R2GenMambaImageProcessor._auto_class == AutoImageProcessor.__name__
    assert R2GenMambaProcessor._auto_class == AutoProcessor.__name__
