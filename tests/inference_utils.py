"""Tiny saved models and real image files (PNG 8/16-bit, JPEG, DICOM) for the inference and Hub tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from helpers import tiny_config
from helpers import write_dicom as write_dicom_pixels
from PIL import Image
from transformers import GenerationConfig

from r2gen_mamba import (
    R2GenMambaForConditionalGeneration,
    R2GenMambaImageProcessor,
    R2GenMambaProcessor,
    R2GenMambaTokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64
REPORTS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion.",
    "Mild cardiomegaly. No focal consolidation. No pneumothorax.",
    "The lungs are clear. Heart size is normal. No acute disease.",
    "Small left pleural effusion. Mild cardiomegaly.",
]


def tiny_processor(num_views: int = 2, max_length: int = 60) -> R2GenMambaProcessor:
    tokenizer = R2GenMambaTokenizer.from_reports(REPORTS, dataset_name="iu_xray", threshold=1)
    tokenizer.model_max_length = max_length
    image_processor = R2GenMambaImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return R2GenMambaProcessor(image_processor=image_processor, tokenizer=tokenizer, num_views=num_views)


def tiny_model(vocab_size: int, num_views: int = 2, seed: int = 0) -> R2GenMambaForConditionalGeneration:
    """A tiny random model whose reports are long and differ from image to image, so that a swapped study or a wrong
    token shows in the text: the end token's logit is pushed down (generation runs to `max_length`), and the Mamba
    output and patch embedding are scaled up (at init the encoder output is ~0.01 and barely reaches the decoder)."""
    torch.manual_seed(seed)
    model = R2GenMambaForConditionalGeneration(
        tiny_config(vocab_size=vocab_size, num_views=num_views, image_size=IMAGE_SIZE)
    )
    with torch.no_grad():
        model.lm_head.bias[0] -= 4.0
        model.model.encoder.layers[0].mixer.out_proj.weight *= 30.0
        model.model.patch_embed.proj.weight *= 3.0
    model.generation_config = GenerationConfig(
        num_beams=2, max_length=12, bos_token_id=0, eos_token_id=0, pad_token_id=0, decoder_start_token_id=0
    )
    return model.eval()


def save_tiny_model(folder: str | Path, num_views: int = 2, seed: int = 0) -> Path:
    """Write a tiny model + processor with `save_pretrained` (the layout train.py and convert-official write)."""
    folder = Path(folder)
    processor = tiny_processor(num_views)
    tiny_model(len(processor.tokenizer), num_views, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _pixels(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth random gray image in [0, 1] (height, width)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 5))
    image = Image.fromarray((coarse * 255).astype(np.uint8)).resize(size[::-1], Image.BILINEAR)
    return np.asarray(image, dtype=np.float64) / 255.0


def write_png(path: str | Path, seed: int, bits: int = 8) -> str:
    values = _pixels(seed)
    if bits == 16:
        Image.fromarray((values * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((values * 255).astype(np.uint8), mode="L").save(path)
    return str(path)


def write_jpeg(path: str | Path, seed: int) -> str:
    Image.fromarray((_pixels(seed) * 255).astype(np.uint8), mode="L").convert("RGB").save(path, quality=95)
    return str(path)


def write_dicom(path: str | Path, seed: int) -> str:
    """A 12-bit MONOCHROME2 DICOM radiograph (uncompressed) written with pydicom."""
    return write_dicom_pixels(path, (_pixels(seed) * 4095).astype(np.uint16), modality="DX")


WRITERS = {
    "png": lambda path, seed: write_png(path, seed),
    "png16": lambda path, seed: write_png(path, seed, bits=16),
    "jpg": write_jpeg,
    "dcm": write_dicom,
}


def write_study(folder: str | Path, kinds: tuple[str, ...], seed: int) -> list[str]:
    """Write one study's views (`kinds` such as ("png", "dcm")) as 0.<ext>, 1.<ext>, ... in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, kind in enumerate(kinds):
        suffix = {"png16": "png"}.get(kind, kind)
        paths.append(WRITERS[kind](folder / f"{index}.{suffix}", seed * 10 + index))
    return paths


def reference_reports(
    model: R2GenMambaForConditionalGeneration, processor: R2GenMambaProcessor, studies: list[list], **generate_kwargs
) -> list[str]:
    """What the model generates for each study, one study at a time, without the pipeline."""
    texts = []
    for study in studies:
        pixel_values = processor(images=[study], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ids = model.generate(pixel_values=pixel_values, **generate_kwargs)
        texts.append(processor.batch_decode(ids, skip_special_tokens=True)[0])
    return texts


def load_push_to_hub_script() -> ModuleType:
    """The repository's `push_to_hub.py` (a script beside the package, not importable by name) as a module."""
    spec = importlib.util.spec_from_file_location("push_to_hub_script", ROOT / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
