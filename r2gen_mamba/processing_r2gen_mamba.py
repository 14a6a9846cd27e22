"""Processing for R2Gen-Mamba: the R2Gen tokenizer, X-ray image loading and processing, and the joint processor.

Everything here reproduces the official R2Gen preprocessing (`zhjohnchan/R2Gen`, `modules/tokenizers.py` and
`modules/dataloaders.py`; see `docs/architecture.md` of the project, "Vocabulary and tokens" and "Recipe") so that a
checkpoint carries its own vocabulary and transforms instead of rebuilding them from an annotation file at load time.

This file is pushed to the Hub as remote code: it imports nothing else from the package.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, PreTrainedTokenizer, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging

logger = logging.get_logger(__name__)

DATASET_NAMES = ("iu_xray", "mimic_cxr")
# R2Gen's `max_seq_length` per dataset (length of `[0] + ids + [0]` after truncation).
DEFAULT_MAX_LENGTH = {"iu_xray": 60, "mimic_cxr": 100}
# R2Gen's vocabulary `threshold` per dataset (minimum count of a token in the train split).
DEFAULT_THRESHOLD = {"iu_xray": 3, "mimic_cxr": 10}

# ----------------------------------------------------------------------------------------------------------------
# Report cleaning (byte-for-byte the official `clean_report_iu_xray` / `clean_report_mimic_cxr`)
# ----------------------------------------------------------------------------------------------------------------

# Numbered-list markers. Applied after the dot collapsing, in this order. Note that "1. " is removed anywhere
# (so "11. " becomes "1"), and " 2. " .. " 5. " become ". " (a sentence break), exactly as R2Gen does.
_NUMBERING = (
    ("1. ", "", 1),
    (". 2. ", ". ", 1),
    (". 3. ", ". ", 1),
    (". 4. ", ". ", 1),
    (". 5. ", ". ", 1),
    (" 2. ", ". ", 1),
    (" 3. ", ". ", 1),
    (" 4. ", ". ", 1),
    (" 5. ", ". ", 1),
)
# (old, new, passes): `passes` successive `str.replace` calls. The fixed number of passes (not "until stable") is
# part of the behaviour: three passes of ".." -> "." collapse up to 8 dots, a run of 9 leaves "..".
_IU_XRAY_PASSES = (("..", ".", 3),) + _NUMBERING
_MIMIC_CXR_PASSES = (("\n", " ", 1), ("__", "_", 7), ("  ", " ", 6), ("..", ".", 8)) + _NUMBERING

# The official regex class is `[.,?;*!%^&_+():-\[\]{}]`. Inside it `:-\[` is a *range* (':' to '['), so besides
# the listed punctuation it deletes ';<=>?@', 'A'-'Z' (already lowercased by then) and '['; '-' itself is kept.
_R2GEN_CHAR_CLASS = ".,?;*!%^&_+()" + "".join(chr(c) for c in range(ord(":"), ord("[") + 1)) + "]{}"
_SENTENCE_PUNCTUATION = re.compile("[" + re.escape(_R2GEN_CHAR_CLASS) + "]")


def _clean_sentence(sentence: str) -> str:
    sentence = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "")
    return _SENTENCE_PUNCTUATION.sub("", sentence.strip().lower())


def clean_report(text: str, dataset_name: str = "iu_xray") -> str:
    """R2Gen's report cleaning, byte-for-byte (including its quirks).

    Collapses dots and numbered-list markers, lowercases, splits into sentences on ". ", strips quotes/slashes and
    the punctuation class from each sentence and joins them with " . ", ending with " .". Empty sentences are *kept*
    (the official filter compares a string to `[]`, which never matches), and spaces left by deleted characters stay,
    so the result can contain double spaces; `.split()` gives the tokens.

    Args:
        text (`str`): the raw report.
        dataset_name (`str`): `"iu_xray"` or `"mimic_cxr"` (MIMIC also folds newlines, repeated `_` and spaces first).

    Returns:
        `str`: the cleaned report, e.g. `"the heart is normal . no acute disease ."`.
    """
    if not isinstance(text, str):
        raise TypeError(f"a report must be a str, got {type(text).__name__}")
    if dataset_name == "iu_xray":
        passes = _IU_XRAY_PASSES
    elif dataset_name == "mimic_cxr":
        passes = _MIMIC_CXR_PASSES
    else:
        raise ValueError(f"dataset_name must be one of {DATASET_NAMES}, got {dataset_name!r}")
    for old, new, repeat in passes:
        for _ in range(repeat):
            if old not in text:  # later passes of the same replacement would change nothing either
                break
            text = text.replace(old, new)
    return " . ".join([_clean_sentence(s) for s in text.strip().lower().split(". ")]) + " ."


def build_vocabulary(reports: Iterable[str], dataset_name: str = "iu_xray", threshold: int = 3) -> list[str]:
    """R2Gen's vocabulary: cleaned tokens with count >= `threshold`, plus `<unk>`, sorted (id = position + 1)."""
    if not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be a positive integer, got {threshold!r}")
    counter: Counter[str] = Counter()
    for report in reports:
        counter.update(clean_report(report, dataset_name).split())
    vocab = [token for token, count in counter.items() if count >= threshold]
    vocab.append(UNK_TOKEN)
    vocab.sort()
    return vocab


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

# Id 0 is bos = eos = pad = decoder start. Cleaning deletes '<', '>' and '/', so neither special string can ever be
# produced by a report.
SPECIAL_TOKEN = "<bos/eos/pad>"
UNK_TOKEN = "<unk>"
VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}


class R2GenMambaTokenizer(PreTrainedTokenizer):
    r"""
    The R2Gen word-level tokenizer: R2Gen's report cleaning, a vocabulary of the train split's frequent tokens, and
    id 0 shared by bos, eos and padding.

    `tokenizer(report)["input_ids"]` is R2Gen's encoding `[0] + ids + [0]`; unknown tokens map to `<unk>`'s id.
    `len(tokenizer)` is the vocabulary size plus one (id 0) and equals the model's `config.vocab_size`.

    Truncation (`truncation=True`, `max_length` defaulting to `model_max_length`: 60 IU X-Ray / 100 MIMIC-CXR) is
    R2Gen's when `r2gen_truncation=True` (the default, what training uses): the whole `[0] + ids + [0]` is cut to
    `max_length`, so a long report loses its final 0. With `r2gen_truncation=False` the usual `transformers`
    truncation keeps the final 0.

    `decode(ids, skip_special_tokens=True)` is R2Gen's decoding of a generated sequence: a leading 0 is dropped and
    decoding stops at the next id <= 0 (so -100 label padding also ends it). With `skip_special_tokens=False` every id
    is shown, id 0 as `"<bos/eos/pad>"`.

    A Python (not `tokenizers`-backed) tokenizer on purpose: the cleaning is a fixed sequence of `str.replace` passes,
    Python `str.strip`/`str.lower` and per-sentence stripping, which a Rust normalizer chain would only approximate
    (different whitespace and Unicode lowercasing rules).

    Args:
        vocab_file (`str`, *optional*): `vocab.json` mapping token -> id (ids 1..N), as written by `save_pretrained`.
        vocab (`list[str]` or `dict[str, int]`, *optional*): the vocabulary itself instead of a file (a sorted list
            gets ids 1..N). Use [`~R2GenMambaTokenizer.from_annotation`] or [`~R2GenMambaTokenizer.from_reports`] to
            build it the official way.
        dataset_name (`str`, defaults to `"iu_xray"`): cleaning variant, `"iu_xray"` or `"mimic_cxr"`.
        r2gen_truncation (`bool`, defaults to `True`): truncate like R2Gen (see above).
        model_max_length (`int`, *optional*): defaults to 60 for IU X-Ray and 100 for MIMIC-CXR.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        vocab: Sequence[str] | dict[str, int] | None = None,
        dataset_name: str = "iu_xray",
        r2gen_truncation: bool = True,
        bos_token: str = SPECIAL_TOKEN,
        eos_token: str = SPECIAL_TOKEN,
        pad_token: str = SPECIAL_TOKEN,
        unk_token: str = UNK_TOKEN,
        **kwargs: Any,
    ):
        if dataset_name not in DATASET_NAMES:
            raise ValueError(f"dataset_name must be one of {DATASET_NAMES}, got {dataset_name!r}")
        if (vocab_file is None) == (vocab is None):
            raise ValueError("pass exactly one of `vocab_file` or `vocab`")
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        if not isinstance(vocab, dict):
            vocab = {token: index + 1 for index, token in enumerate(vocab)}
        self.encoder: dict[str, int] = dict(vocab)
        self._check_vocab(self.encoder, str(unk_token), str(pad_token))
        self.decoder: dict[int, str] = {index: token for token, index in self.encoder.items()}
        self._special_token = str(pad_token)
        self.dataset_name = dataset_name
        self.r2gen_truncation = r2gen_truncation
        kwargs.setdefault("model_max_length", DEFAULT_MAX_LENGTH[dataset_name])
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            dataset_name=dataset_name,
            r2gen_truncation=r2gen_truncation,
            special_tokens_pattern="bos_eos",
            **kwargs,
        )

    @staticmethod
    def _check_vocab(encoder: dict[str, int], unk_token: str, special_token: str) -> None:
        if unk_token not in encoder:
            raise ValueError(f"the vocabulary must contain the unknown token {unk_token!r}")
        if special_token in encoder:
            raise ValueError(f"{special_token!r} is id 0 and must not be in the vocabulary")
        if sorted(encoder.values()) != list(range(1, len(encoder) + 1)):
            raise ValueError("vocabulary ids must be exactly 1..N (id 0 is bos/eos/pad)")

    # -- construction the official way ----------------------------------------------------------------------------

    clean_report = staticmethod(clean_report)

    @classmethod
    def from_reports(
        cls,
        reports: Iterable[str],
        dataset_name: str = "iu_xray",
        threshold: int | None = None,
        **kwargs: Any,
    ) -> R2GenMambaTokenizer:
        """Build R2Gen's vocabulary from the *train split* reports (`threshold` defaults to 3 IU / 10 MIMIC)."""
        if dataset_name not in DATASET_NAMES:
            raise ValueError(f"dataset_name must be one of {DATASET_NAMES}, got {dataset_name!r}")
        threshold = DEFAULT_THRESHOLD[dataset_name] if threshold is None else threshold
        vocab = build_vocabulary(reports, dataset_name=dataset_name, threshold=threshold)
        return cls(vocab=vocab, dataset_name=dataset_name, **kwargs)

    @classmethod
    def from_annotation(
        cls,
        path: str | os.PathLike,
        dataset_name: str = "iu_xray",
        threshold: int | None = None,
        **kwargs: Any,
    ) -> R2GenMambaTokenizer:
        """Build R2Gen's vocabulary from an `annotation.json` (`{"train": [{"report": ...}, ...], ...}`).

        Only the `"train"` split is read, as in R2Gen.
        """
        with open(path, encoding="utf-8") as f:
            annotation = json.load(f)
        if not isinstance(annotation, dict) or not isinstance(annotation.get("train"), list):
            raise ValueError(f"{path}: expected an annotation with a 'train' list of records")
        reports = []
        for index, record in enumerate(annotation["train"]):
            if not isinstance(record, dict) or not isinstance(record.get("report"), str):
                raise ValueError(f"{path}: train record {index} has no string 'report'")
            reports.append(record["report"])
        return cls.from_reports(reports, dataset_name=dataset_name, threshold=threshold, **kwargs)

    # -- the PreTrainedTokenizer interface ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.encoder) + 1

    def get_vocab(self) -> dict[str, int]:
        return {self._special_token: 0, **self.encoder}

    def prepare_for_tokenization(self, text: str, is_split_into_words: bool = False, **kwargs: Any):
        return clean_report(text, self.dataset_name), kwargs

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        if index == 0:
            return self._special_token
        if index not in self.decoder:
            raise ValueError(f"token id {index} is outside the vocabulary (ids 0..{len(self.encoder)})")
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def prepare_for_model(self, ids: list[int], pair_ids: list[int] | None = None, **kwargs: Any) -> Any:
        truncation = kwargs.get("truncation", False)
        if not self.r2gen_truncation or pair_ids is not None or truncation in (False, None, "do_not_truncate"):
            return super().prepare_for_model(ids, pair_ids=pair_ids, **kwargs)
        # R2Gen: `tokenizer(report)[:max_seq_length]`, cutting the full sequence, final 0 included.
        max_length = kwargs.get("max_length") or self.model_max_length
        sequence = self.build_inputs_with_special_tokens(ids) if kwargs.get("add_special_tokens", True) else ids
        kwargs.update(truncation=False, add_special_tokens=False)
        return super().prepare_for_model(sequence[:max_length], **kwargs)

    def encode_r2gen(self, reports: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """R2Gen's encoding without the generic `transformers` machinery (about 10x faster for whole datasets).

        Returns one `[0] + ids + [0]` list per report, cut to `max_length` when given (R2Gen truncation, the final
        0 may be lost), exactly what `tokenizer(reports, truncation=True, max_length=max_length)` gives with
        `r2gen_truncation=True`.
        """
        reports = [reports] if isinstance(reports, str) else reports
        encoder, unk_id, dataset_name = self.encoder, self.encoder[str(self.unk_token)], self.dataset_name
        encoded = []
        for report in reports:
            ids = [0] + [encoder.get(token, unk_id) for token in clean_report(report, dataset_name).split()] + [0]
            encoded.append(ids[:max_length] if max_length is not None else ids)
        return encoded

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(i) for i in token_ids]
        if skip_special_tokens:
            # R2Gen's decode (applied to sequences without the leading 0): join tokens up to the first id <= 0.
            if token_ids and token_ids[0] == 0:
                token_ids = token_ids[1:]
            words = []
            for index in token_ids:
                if index <= 0:
                    break
                words.append(self._convert_id_to_token(index))
            return " ".join(words)
        return " ".join(self._convert_id_to_token(i) for i in token_ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary path {save_directory} should be a directory")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_file = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        ordered = dict(sorted(self.encoder.items(), key=lambda item: item[1]))
        with open(vocab_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(ordered, ensure_ascii=False, indent=0) + "\n")
        return (vocab_file,)


# ----------------------------------------------------------------------------------------------------------------
# Image loading
# ----------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Refuse images larger than this (decompression bombs). Chest X-rays are up to ~4300 x 3500 (15 MP).
DEFAULT_MAX_PIXELS = 50_000_000

ImageLike: TypeAlias = "str | os.PathLike | Image.Image | np.ndarray"


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"image file {os.fspath(image)!r}"
    if isinstance(image, np.ndarray):
        return f"array of shape {image.shape} and dtype {image.dtype}"
    return f"{type(image).__name__} image"


def _check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{what} has {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb; raise max_pixels if the image is genuine)"
        )


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Scale an integer or float array to 8 bits over the *full range of its type* (16-bit: v / 257, rounded)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    low, high = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{what}: float images must be in [0, 1], got values in [{low}, {high}]")
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}: unsupported pixel type {array.dtype}")
    if low < 0:
        raise ValueError(f"{what}: negative pixel values ({low}) are not supported")
    if high <= 255 and array.dtype.itemsize == 1:
        return array.astype(np.uint8)
    if high > 65535:
        raise ValueError(f"{what}: integer pixels above 65535 ({high}) are not supported")
    # 16-bit full range: 65535 / 255 == 257, so 8-bit values stored as v * 257 come back exactly.
    return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, what: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(_to_uint8(array, what), mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        # Alpha is dropped, as PIL's `convert("RGB")` does in R2Gen.
        return Image.fromarray(np.ascontiguousarray(_to_uint8(array[..., :3], what)), mode="RGB")
    raise ValueError(f"{what}: expected an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")


def _pil_to_rgb(image: Image.Image, what: str) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # PIL's convert("RGB") clips these to 255; scale the full 16-bit range instead.
        return _array_to_rgb(np.asarray(image), what)
    # L, LA, P, RGBA, CMYK, YCbCr, 1: PIL's own conversion, as R2Gen's `.convert("RGB")`.
    return image.convert("RGB")


def _is_dicom_file(path: str) -> bool:
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            header = f.read(132)
    except OSError:
        return False
    return header[128:132] == b"DICM"


def _first(value: Any) -> float:
    """A DICOM value that may be multi-valued (e.g. two window centers): the first one, as a float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def load_dicom(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a DICOM radiograph as an 8-bit RGB image (needs `pydicom`: `pip install "r2gen-mamba[dicom]"`).

    Monochrome images get the modality LUT (`RescaleSlope`, `RescaleIntercept`), then the VOI window of the file
    (`WindowCenter`/`WindowWidth`, the DICOM linear function) or, without one, the full min..max range; MONOCHROME1
    (white = low values) is inverted so that bone is bright as in MONOCHROME2.
    """
    path = os.fspath(path)
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(
            f'reading the DICOM file {path!r} needs pydicom; install it with `pip install "r2gen-mamba[dicom]"`'
        ) from err
    what = f"DICOM file {path!r}"
    try:
        dataset = pydicom.dcmread(path)
    except Exception as err:
        raise ValueError(f"cannot read {what}: {err}") from err
    if "PixelData" not in dataset:
        raise ValueError(f"{what} has no pixel data")
    _check_pixels(int(dataset.Columns), int(dataset.Rows), max_pixels, what)
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{what} has {dataset.NumberOfFrames} frames; expected a single radiograph")
    try:
        pixels = dataset.pixel_array
    except Exception as err:
        raise ValueError(f"cannot decode the pixel data of {what}: {err}") from err

    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB",) or photometric.startswith("YBR"):
        return _array_to_rgb(np.asarray(pixels), what)  # pydicom already converted YBR to RGB
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{what}: unsupported PhotometricInterpretation {photometric!r}")

    values = pixels.astype(np.float64) * _first(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    values += _first(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    center = getattr(dataset, "WindowCenter", None)
    width = getattr(dataset, "WindowWidth", None)
    if center is not None and width is not None and _first(width) >= 1:
        # DICOM PS3.3 C.11.2.1.2.1, linear VOI function, output range [0, 1].
        c, w = _first(center), _first(width)
        scaled = np.clip(((values - (c - 0.5)) / (w - 1) + 0.5) if w > 1 else (values > c - 0.5) * 1.0, 0.0, 1.0)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    gray = np.round(scaled * 255.0).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def load_image(image: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an X-ray as an 8-bit RGB `PIL.Image` (what R2Gen's `Image.open(path).convert("RGB")` gives).

    Args:
        image: a path (PNG/JPEG/any PIL format, or DICOM: `.dcm` or a `DICM` header), a `PIL.Image` of any mode
            (L, I;16, I, F, RGB, RGBA, P, ...) or a numpy array (H, W[, 1|3|4]) of uint8, uint16 or float in [0, 1].
            16-bit data are scaled over the full 16-bit range (v / 257), not clipped; alpha is dropped.
        max_pixels: refuse images with more pixels than this (decompression bombs); `None` disables the check.

    Raises:
        `ValueError` naming the file for unreadable, truncated or oversized images.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, _describe(image))
        return _pil_to_rgb(image, _describe(image))
    if isinstance(image, np.ndarray):
        what = _describe(image)
        if image.ndim >= 2:
            _check_pixels(image.shape[1], image.shape[0], max_pixels, what)
        return _array_to_rgb(image, what)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"cannot load an image from {type(image).__name__}; pass a path, PIL image or numpy array")
    path = os.fspath(image)
    what = _describe(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} does not exist")
    if _is_dicom_file(path):
        return load_dicom(path, max_pixels=max_pixels)
    try:
        with Image.open(path) as opened:
            # The size is known from the header: check it before decoding anything.
            _check_pixels(opened.width, opened.height, max_pixels, what)
            opened.load()
            return _pil_to_rgb(opened, what).copy()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{what} is too large to load safely (possible decompression bomb): {err}") from err
    except UnidentifiedImageError as err:
        raise ValueError(f"{what} is not a readable image: {err}") from err
    except OSError as err:
        raise ValueError(f"cannot read {what} (truncated or corrupt?): {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------


class R2GenMambaImageProcessor(BaseImageProcessor):
    r"""
    R2Gen's image transforms as a `transformers` image processor, on PIL (no torchvision needed).

    Eval (default): resize to `size` (224 x 224) with PIL bilinear, scale to [0, 1], normalise with ImageNet mean/std
    - what torchvision's `Resize((224, 224))`, `ToTensor()`, `Normalize(...)` do on a PIL image. Train
    (`augment=True`): resize the shorter side to `train_resize_shortest_edge` (256), take a random `size` crop, flip
    horizontally with probability 0.5, then the same scaling and normalisation (torchvision's `Resize(256)`,
    `RandomCrop(224)`, `RandomHorizontalFlip()`). Random draws use `torch` (a given `torch.Generator`, else the global
    generator) in the order torchvision >= 0.8 draws them (crop top, crop left, flip), so with the global generator
    the crops and flips are those a torchvision pipeline seeded the same way would make.

    Inputs are anything [`load_image`] accepts: paths (PNG, JPEG, DICOM), PIL images of any mode, numpy arrays.

    Args:
        size (`dict`, defaults to `{"height": 224, "width": 224}`): output size.
        train_resize_shortest_edge (`int`, defaults to 256): shorter side before the random crop (train only).
        do_flip (`bool`, defaults to `True`): random horizontal flip (train only).
        image_mean / image_std (defaults to ImageNet's `(0.485, 0.456, 0.406)` / `(0.229, 0.224, 0.225)`).
        max_pixels (`int`, defaults to 50,000,000): larger images are refused (decompression bombs).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        train_resize_shortest_edge: int = 256,
        do_flip: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **kwargs: Any,
    ):
        size = dict(size) if size is not None else {"height": 224, "width": 224}
        if set(size) != {"height", "width"} or min(size.values()) < 1:
            raise ValueError(f"size must be {{'height': H, 'width': W}} with positive H, W, got {size}")
        if train_resize_shortest_edge < max(size.values()):
            raise ValueError(
                f"train_resize_shortest_edge ({train_resize_shortest_edge}) must be at least the crop size {size}"
            )
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB)")
        super().__init__(**kwargs)
        self.size = size
        self.train_resize_shortest_edge = train_resize_shortest_edge
        self.do_flip = do_flip
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.max_pixels = max_pixels

    def to_dict(self) -> dict[str, Any]:
        output = {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
        output["image_processor_type"] = self.__class__.__name__
        return output

    def _normalize(self, image: Image.Image) -> np.ndarray:
        """`ToTensor` + `Normalize` in float32: uint8 [H, W, 3] -> [3, H, W]."""
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(((array - mean) / std).transpose(2, 0, 1))

    def eval_transform(self, image: ImageLike) -> np.ndarray:
        """Resize to `size` (bilinear) and normalise. Returns float32 [3, height, width]."""
        image = load_image(image, max_pixels=self.max_pixels)
        image = image.resize((self.size["width"], self.size["height"]), Image.BILINEAR)
        return self._normalize(image)

    def train_transform(self, image: ImageLike, generator: torch.Generator | None = None) -> np.ndarray:
        """Shorter side to 256, random crop to `size`, random horizontal flip, normalise. Float32 [3, H, W]."""
        image = load_image(image, max_pixels=self.max_pixels)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.train_resize_shortest_edge, int(self.train_resize_shortest_edge * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(new_size, Image.BILINEAR)
        crop_h, crop_w = self.size["height"], self.size["width"]
        if (image.height, image.width) != (crop_h, crop_w):  # torchvision draws nothing when no crop is needed
            top = int(torch.randint(0, image.height - crop_h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, image.width - crop_w + 1, size=(1,), generator=generator).item())
            image = image.crop((left, top, left + crop_w, top + crop_h))
        if self.do_flip and torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self._normalize(image)

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]],
        augment: bool = False,
        generator: torch.Generator | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one image, a list of images, or a list of studies (lists of the same number of views).

        Returns:
            `BatchFeature` with `pixel_values` [num_images, 3, H, W], or [num_studies, num_views, 3, H, W] for
            nested input.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments for {self.__class__.__name__}: {sorted(kwargs)}")
        transform = (lambda x: self.train_transform(x, generator)) if augment else self.eval_transform
        if _is_single_image(images):
            pixel_values = np.stack([transform(images)])
        elif all(_is_single_image(item) for item in images):
            pixel_values = np.stack([transform(item) for item in images])
        else:
            studies = [list(study) if not _is_single_image(study) else [study] for study in images]
            counts = {len(study) for study in studies}
            if len(counts) != 1:
                raise ValueError(f"all studies need the same number of views, got {[len(s) for s in studies]}")
            pixel_values = np.stack([np.stack([transform(view) for view in study]) for study in studies])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)


def _is_single_image(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike, Image.Image, np.ndarray))


class R2GenMambaImageTransform:
    """An on-the-fly transform for `datasets.Dataset.with_transform` / `set_transform`.

    Reads `image_column` (per example: one image or a list of views, as paths - joined to `image_root` when
    relative - PIL images or arrays) and adds `pixel_values` (per example: float tensor [views, 3, H, W]); other
    columns pass through. `train=True` applies the random augmentation, drawn from `generator` (or the global torch
    generator); `seed` makes a fresh generator.
    """

    def __init__(
        self,
        image_processor: R2GenMambaImageProcessor | None = None,
        train: bool = False,
        image_column: str = "image_path",
        image_root: str | os.PathLike | None = None,
        output_column: str = "pixel_values",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ):
        if generator is not None and seed is not None:
            raise ValueError("pass either a generator or a seed, not both")
        self.image_processor = image_processor if image_processor is not None else R2GenMambaImageProcessor()
        self.train = train
        self.image_column = image_column
        self.image_root = image_root
        self.output_column = output_column
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator

    def _resolve(self, image: Any) -> Any:
        if isinstance(image, (str, os.PathLike)) and self.image_root is not None and not os.path.isabs(image):
            return os.path.join(self.image_root, image)
        return image

    def _one(self, example_images: Any) -> torch.Tensor:
        views = [example_images] if _is_single_image(example_images) else list(example_images)
        if self.train:
            arrays = [self.image_processor.train_transform(self._resolve(v), self.generator) for v in views]
        else:
            arrays = [self.image_processor.eval_transform(self._resolve(v)) for v in views]
        return torch.from_numpy(np.stack(arrays))

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if self.image_column not in batch:
            raise KeyError(f"column {self.image_column!r} not found; columns are {sorted(batch)}")
        output = dict(batch)
        output[self.output_column] = [self._one(images) for images in batch[self.image_column]]
        return output


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class R2GenMambaProcessor(ProcessorMixin):
    r"""
    Image processor + tokenizer of R2Gen-Mamba, producing model inputs for training and generation.

    `processor(images=..., text=...)`:
      - `images`: one image, a list of the views of one study, or a batch of studies (list of lists); each study must
        have exactly `num_views` images. -> `pixel_values` [batch, views, 3, H, W].
      - `text`: a report or a list of reports (one per study). Each is encoded the R2Gen way (`[0] + ids + [0]`, cut
        to `max_length`, default `tokenizer.model_max_length`) and turned into
        `labels` = encoding[1:] padded with -100, `decoder_input_ids` = encoding[:-1] padded with 0 and
        `decoder_attention_mask` = 1 over encoding[:-1], 0 on padding (R2Gen's `seq_mask`).
        An empty or whitespace-only report, or one with no word left after cleaning, raises `ValueError` naming its
        index (R2Gen would silently train on a lone "." target).

    Args:
        image_processor ([`R2GenMambaImageProcessor`]), tokenizer ([`R2GenMambaTokenizer`]).
        num_views (`int`, defaults to 2): images per study (2 IU X-Ray, 1 MIMIC-CXR); must match the model's config.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_views: int = 2, **kwargs: Any):
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        self.num_views = num_views
        super().__init__(image_processor, tokenizer, **kwargs)

    def _studies(self, images: Any) -> list[list[Any]]:
        if _is_single_image(images):
            studies = [[images]]
        elif not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError("images must be an image, a list of views of one study, or a list of studies")
        elif all(_is_single_image(item) for item in images):
            studies = [list(images)]
        elif all(isinstance(item, (list, tuple)) for item in images):
            studies = [list(study) for study in images]
        else:
            raise ValueError("images mixes single images and lists; pass a list of studies (lists of views)")
        for index, study in enumerate(studies):
            if len(study) != self.num_views:
                raise ValueError(
                    f"study {index} has {len(study)} image(s) but the model expects num_views={self.num_views}"
                    + (" (a flat list is one study; pass a list of lists for a batch)" if len(studies) == 1 else "")
                )
        return studies

    def encode_reports(self, text: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """R2Gen encodings `[0] + ids + [0]` cut to `max_length` (default `tokenizer.model_max_length`).

        Raises `ValueError` naming the index of an empty or whitespace-only report, or of one with no word left
        after cleaning (its encoding would be a lone "." target).
        """
        reports = [text] if isinstance(text, str) else list(text)
        for index, report in enumerate(reports):
            if not isinstance(report, str):
                raise TypeError(f"report {index} must be a str, got {type(report).__name__}")
            if not report.strip():
                raise ValueError(f"report {index} is empty or whitespace-only")
        max_length = max_length or self.tokenizer.model_max_length
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (the start id and one target), got {max_length}")
        encoded = self.tokenizer.encode_r2gen(reports, max_length=max_length)
        period_id = self.tokenizer.encoder.get(".")
        dataset_name = self.tokenizer.dataset_name
        for index, ids in enumerate(encoded):
            # Cheap pre-check on the ids, confirmed on the whole cleaned text (truncation may hide later words).
            if not all(i in (0, period_id) for i in ids):
                continue
            if set(clean_report(reports[index], dataset_name).split()) <= {"."}:
                raise ValueError(f"report {index} has no words left after R2Gen cleaning: {reports[index]!r}")
        return encoded

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        augment: bool = False,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Build `pixel_values` and/or `labels`, `decoder_input_ids`, `decoder_attention_mask` (see class doc)."""
        if kwargs:
            raise TypeError(f"unexpected arguments for {self.__class__.__name__}: {sorted(kwargs)}")
        if images is None and text is None:
            raise ValueError("pass images, text or both")
        data: dict[str, Any] = {}
        batch_size = None
        if images is not None:
            studies = self._studies(images)
            batch_size = len(studies)
            flat = [view for study in studies for view in study]
            pixel_values = self.image_processor(flat, augment=augment, generator=generator, return_tensors=None)
            pixel_values = np.asarray(pixel_values["pixel_values"])
            data["pixel_values"] = pixel_values.reshape(batch_size, self.num_views, *pixel_values.shape[1:])
        if text is not None:
            encoded = self.encode_reports(text, max_length=max_length)
            if batch_size is not None and len(encoded) != batch_size:
                raise ValueError(f"got {batch_size} studies but {len(encoded)} reports")
            width = max(len(ids) for ids in encoded) - 1
            labels, decoder_input_ids, decoder_attention_mask = [], [], []
            for ids in encoded:
                pad = width - (len(ids) - 1)
                labels.append(ids[1:] + [-100] * pad)
                decoder_input_ids.append(ids[:-1] + [self.tokenizer.pad_token_id] * pad)
                decoder_attention_mask.append([1] * (len(ids) - 1) + [0] * pad)
            data.update(
                labels=labels, decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask
            )
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "decoder_input_ids", "decoder_attention_mask", "labels"]


__all__ = [
    "R2GenMambaTokenizer",
    "R2GenMambaImageProcessor",
    "R2GenMambaImageTransform",
    "R2GenMambaProcessor",
    "clean_report",
    "build_vocabulary",
    "load_image",
    "load_dicom",
]
