"""The `radiology-report-generation` pipeline: one chest X-ray study (one or more views) in, one report out.

```python
from transformers import pipeline

pipe = pipeline("radiology-report-generation", model="path/or/hub-id", trust_remote_code=True)
pipe(["frontal.png", "lateral.dcm"])                 # one study -> [{"generated_text": "..."}]
pipe([["a0.png", "a1.png"], ["b0.png", "b1.png"]])   # a batch of studies -> one list per study
pipe("frontal.png", num_beams=1, max_length=40)      # generation kwargs pass through to `generate`
```

This file is pushed to the Hub beside the model files (remote code), so it imports nothing from the package: images
are read by the processor (`load_image`: PNG, JPEG 8/16 bit, DICOM). Importing it registers the task with
`transformers.pipelines.PIPELINE_REGISTRY`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

logger = logging.get_logger(__name__)

TASK = "radiology-report-generation"

# One view: a file path (PNG/JPEG/DICOM, ...) or an already loaded PIL image.
View = str | os.PathLike | Image.Image


def _is_view(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike, Image.Image))


def _view_name(view: View, index: int) -> str:
    return os.fspath(view) if isinstance(view, (str, os.PathLike)) else f"<PIL image #{index}>"


def as_studies(images: View | list) -> tuple[list[tuple[View, ...]], bool]:
    """Normalise the pipeline input to a list of studies (tuples of views); also says whether it was a batch.

    A single view or a flat list of views is ONE study; a list of lists (or tuples) is a batch of studies.
    """
    if _is_view(images):
        return [(images,)], False
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(
            "expected one study (an image path, a PIL image, or a list of those: the views of the study) or a batch "
            f"of studies (a list of such lists), got {type(images).__name__} {images!r:.80}"
        )
    if all(_is_view(item) for item in images):
        return [tuple(images)], False
    studies = []
    for index, study in enumerate(images):
        if not isinstance(study, (list, tuple)) or not study or not all(_is_view(view) for view in study):
            raise ValueError(
                f"study #{index} of the batch must be a non-empty list of image paths or PIL images, got {study!r:.80}"
                " (a batch is a list of studies; a flat list of images is one study)"
            )
        studies.append(tuple(study))
    return studies, True


class RadiologyReportGenerationPipeline(Pipeline):
    """Generates a radiology report for each chest X-ray study with an R2Gen-Mamba model and its processor.

    Input: one study (a path / PIL image, or a list of them: the study's views in the order the model was trained
    with, e.g. frontal then lateral for IU X-Ray) or a batch of studies (a list of such lists). Paths may be PNG, JPEG
    (8 or 16 bit) or DICOM files. Each study must have exactly `model.config.num_views` views.

    Output: `[{"generated_text": report}]` for one study (one entry per returned sequence), a list of those for a
    batch. Keyword arguments of the call (`num_beams`, `max_length`, `num_return_sequences`, ...) are passed to
    `model.generate`, on top of the model's `generation_config` (beam 3, `max_length` 61 for IU X-Ray: the start
    token and up to 60 more).
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"the {TASK} pipeline needs the model's processor (R2GenMambaProcessor)")

    def _sanitize_parameters(self, generate_kwargs: dict | None = None, **kwargs: Any):
        forward_params = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        return {}, forward_params, {}

    def __call__(self, images: View | list, **kwargs: Any) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        """Generate the report of one study or of a batch of studies (see the class docstring for the formats)."""
        studies, batched = as_studies(images)
        if batched:
            # A list is iterated by the base class (and batched with `batch_size`); each study is a tuple of views.
            return super().__call__(studies, **kwargs)
        return super().__call__(studies[0], **kwargs)

    def preprocess(self, study: tuple[View, ...]) -> dict[str, torch.Tensor]:
        num_views = self.model.config.num_views
        if len(study) != num_views:
            names = [_view_name(view, index) for index, view in enumerate(study)]
            raise ValueError(
                f"this model expects {num_views} view(s) per study, got {len(study)}: {names}. "
                "To run several studies at once pass a list of studies (a list of lists of images)."
            )
        # The processor reads the files; its errors name the file that cannot be read.
        pixel_values = self.processor(images=[list(study)], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values.to(self.dtype)}  # [1, views, 3, H, W]

    def _forward(self, model_inputs: dict[str, torch.Tensor], generate_kwargs: dict | None = None):
        pixel_values = model_inputs["pixel_values"]
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {}, return_dict_in_generate=False)
        sequences = self.model.generate(pixel_values=pixel_values, **generate_kwargs)  # [batch * returned, T]
        # [batch, returned, T] so that the base class can split a batch into studies.
        return {"sequences": sequences.reshape(pixel_values.shape[0], -1, sequences.shape[-1])}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        sequences = model_outputs["sequences"]
        texts = self.processor.batch_decode(sequences.reshape(-1, sequences.shape[-1]), skip_special_tokens=True)
        return [{"generated_text": text} for text in texts]


# The installed package and a Hub copy of this file can both be imported in one process; the first one registers.
if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=RadiologyReportGenerationPipeline,
        pt_model=AutoModelForImageTextToText,
        type="multimodal",
    )
