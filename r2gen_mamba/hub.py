"""Hub layout, model card and upload of a trained R2Gen-Mamba model (the library side of `push_to_hub.py`).

The folder written by `save_hub_folder` is self-contained remote code: `config.json` (with `auto_map` and
`custom_pipelines`), `model.safetensors`, `generation_config.json`, the tokenizer and processor files, and the model,
processing and pipeline `.py` files, so that it loads with `trust_remote_code=True` where `r2gen_mamba` is not
installed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging

from .modeling_r2gen_mamba import GENERATION_DEFAULTS
from .pipeline_r2gen_mamba import TASK, RadiologyReportGenerationPipeline

logger = logging.get_logger(__name__)

# The remote code of a Hub model: what `trust_remote_code=True` imports, all with relative imports only.
REMOTE_CODE_FILES = (
    "configuration_r2gen_mamba.py",
    "modeling_r2gen_mamba.py",
    "mamba_block.py",
    "packed_linear.py",
    "processing_r2gen_mamba.py",
    "pipeline_r2gen_mamba.py",
)
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "README.md") + REMOTE_CODE_FILES

TAGS = ["radiology", "medical", "chest-x-ray", "mamba", "report-generation", "r2gen-mamba", "custom_code"]

# Metric keys of `r2gen-mamba evaluate`'s metrics.json (`bleu_4`, ...) and of train.py's test_results.json
# (`test_bleu_4`, ...) -> (model-index metric type, display name).
METRICS = {
    "bleu_1": ("bleu", "BLEU-1"),
    "bleu_2": ("bleu", "BLEU-2"),
    "bleu_3": ("bleu", "BLEU-3"),
    "bleu_4": ("bleu", "BLEU-4"),
    "meteor": ("meteor", "METEOR"),
    "rouge_l": ("rouge", "ROUGE-L"),
    "cider": ("cider", "CIDEr-D"),
    "ce_precision": ("precision", "CE precision (CheXbert)"),
    "ce_recall": ("recall", "CE recall (CheXbert)"),
    "ce_f1": ("f1", "CE F1 (CheXbert)"),
}

DATASETS = {
    "iu_xray": ("IU X-Ray", "Indiana University chest X-ray collection (OpenI), frontal + lateral views"),
    "mimic_cxr": ("MIMIC-CXR", "MIMIC-CXR (PhysioNet, credentialed access), one view per study"),
}

CITATION = """@article{sun2024r2genmamba,
  title   = {R2Gen-Mamba: A Selective State Space Model for Radiology Report Generation},
  author  = {Sun, Yongheng and Lee, Yueh Z. and Woodard, Genevieve A. and Zhu, Hongtu and Lian, Chunfeng and
             Liu, Mingxia},
  journal = {arXiv preprint arXiv:2410.18135},
  year    = {2024}
}

@inproceedings{chen2020r2gen,
  title     = {Generating Radiology Reports via Memory-driven Transformer},
  author    = {Chen, Zhihong and Song, Yan and Chang, Tsung-Hui and Wan, Xiang},
  booktitle = {Proceedings of the 2020 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  year      = {2020}
}"""


def _normalise_metric_key(key: str) -> str:
    key = key.lower().replace("-", "_")
    for prefix in ("test_", "eval_", "predict_"):
        key = key.removeprefix(prefix)
    aliases = {f"bleu{n}": f"bleu_{n}" for n in range(1, 5)} | {"rougel": "rouge_l", "rouge": "rouge_l"}
    return aliases.get(key, key)


def read_eval_results(path: str | os.PathLike) -> dict[str, float]:
    """Read the metrics of `r2gen-mamba evaluate` (metrics.json) or of train.py (test_results.json).

    Returns the known metrics (see `METRICS`) under normalised keys (`bleu_4`, `meteor`, ...); nested entries
    (per-observation scores, the shuffled baseline) and run statistics (loss, runtime) are left out.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read eval results {path}: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"eval results {path} must be a JSON object of metric name -> value")
    metrics = {}
    for key, value in raw.items():
        name = _normalise_metric_key(key)
        if name in METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"eval results {path}: {key} is {value}, expected a finite number")
            metrics[name] = float(value)
    if not metrics:
        raise ValueError(
            f"eval results {path} hold none of the known metrics ({', '.join(METRICS)}, optionally prefixed "
            f"with 'test_'); keys found: {sorted(raw)}"
        )
    return metrics


def guess_dataset(num_views: int) -> str:
    """The benchmark a model was most likely trained on: IU X-Ray uses 2 views, MIMIC-CXR 1."""
    return "iu_xray" if num_views == 2 else "mimic_cxr"


def build_model_card(
    repo_id: str,
    config: Any,
    generation_config: Any = None,
    metrics: dict[str, float] | None = None,
    dataset: str = "iu_xray",
    split: str = "test",
    license: str = "apache-2.0",
) -> ModelCard:
    """The model card: Hub metadata (tags, datasets, metrics, `model-index`) and the text a user needs."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    dataset_name, dataset_description = DATASETS[dataset]
    model_name = repo_id.split("/")[-1]
    eval_results = [
        EvalResult(
            task_type="image-text-to-text",
            task_name="Radiology report generation",
            dataset_type=dataset,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=METRICS[key][0],
            metric_name=METRICS[key][1],
            metric_value=round(value, 4),
        )
        for key, value in (metrics or {}).items()
    ]
    base_model = getattr(config, "vision_model_name_or_path", None)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        tags=TAGS,
        datasets=[dataset],
        metrics=sorted({METRICS[key][0] for key in metrics}) if metrics else None,
        base_model=base_model if base_model and not os.path.exists(base_model) else None,
        eval_results=eval_results or None,
    )
    num_beams = getattr(generation_config, "num_beams", None) or GENERATION_DEFAULTS["num_beams"]
    max_length = getattr(generation_config, "max_length", None) or GENERATION_DEFAULTS["max_length"]
    example = "['frontal.png', 'lateral.png']" if config.num_views == 2 else "'frontal.dcm'"
    if config.encoder_type == "mamba":
        encoder = (
            f"{config.encoder_layers} Mamba block(s) (d_state {config.d_state}, d_conv {config.d_conv}, "
            f"expand {config.expand}) over the concatenated patch tokens of the views"
        )
    else:
        encoder = f"{config.encoder_layers}-layer Transformer encoder (R2Gen's, the paper's baseline)"
    schedule = (
        "100 epochs with the learning rate x0.1 after epoch 50"
        if dataset == "iu_xray"
        else "30 epochs with the learning rate x0.8 every epoch"
    )
    views = "frontal + lateral (2 views)" if config.num_views == 2 else f"{config.num_views} view(s)"
    results_table = "\n".join(f"| {METRICS[key][1]} | {value:.4f} |" for key, value in (metrics or {}).items())
    results = (
        f"Scores on the {dataset_name} {split} split (pycocoevalcap, as in R2Gen; reports decoded, cleaned and cut "
        f"as the tokenizer does):\n\n| metric | value |\n|---|---|\n{results_table}"
        if metrics
        else "No evaluation results were supplied with this upload."
    )
    content = f"""---
{card_data.to_yaml()}
---

# {model_name}

R2Gen-Mamba radiology report generation for chest X-rays: a ResNet-101 visual extractor, a Mamba encoder over the
patch tokens and R2Gen's memory-driven Transformer decoder (relational memory + MCLN). Input: one study with
{views} at {config.image_size} px; output: a free-text findings report. Vocabulary of {config.vocab_size - 1}
tokens (R2Gen tokenizer: lower-cased, punctuation removed, id 0 = begin/end/padding).

## Not for clinical use

This model is a research artefact. It is **not a medical device**, has not been validated clinically and must not be
used to diagnose, triage or treat patients, or to replace a radiologist's reading. Generated reports can omit
findings, invent findings that are not in the image, and copy phrasing typical of the training set. It was trained on
{dataset_name} only; other hospitals, scanners, patient groups, views or image types are out of distribution.

## Intended use

Research on automatic radiology report generation: reproducing and comparing R2Gen-family models, studying
efficient (state-space) encoders, and building evaluation tooling. Reports should be read as model output, never
as a description of a real patient's condition.

## How to use

The code lives in this repository (remote code), so pass `trust_remote_code=True`. Pin the `revision` to a commit
you have reviewed, so that neither the weights nor the code can change under you (take the hash from the
"Files and versions" tab; `push_to_hub.py` prints it after the upload):

```python
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

repo, revision = "{repo_id}", "COMMIT_SHA"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, revision=revision)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)

pipe = pipeline("{TASK}", model=repo, trust_remote_code=True, revision=revision)
print(pipe({example}))  # [{{"generated_text": "..."}}]
```

Images may be PNG, JPEG (8/16 bit) or DICOM. With the `r2gen-mamba` package installed the same works without
remote code (`import r2gen_mamba`), and from the shell:
`r2gen-mamba generate --model {repo_id} IMAGE [IMAGE ...]`.

## Architecture and training recipe

This checkpoint: ResNet visual extractor (stage widths {config.vision_config.hidden_sizes}, depths
{config.vision_config.depths}); {encoder}; {config.decoder_layers}-layer memory-driven decoder (d_model
{config.d_model}, {config.num_heads} heads, d_ff {config.d_ff}, {config.rm_num_slots} memory slots); decoding by beam
search with {num_beams} beams up to {max_length} tokens (counting the start token).

The published recipe (paper section 3.2 and the official scripts; `train.py --preset {dataset}` of the
`r2gen-mamba` package follows it): ImageNet-initialised ResNet-101, cross-entropy on the R2Gen-encoded report, Adam
(amsgrad, weight decay 5e-5), learning rate 5e-5 for the visual extractor and 1e-4 for the rest, {schedule}, gradient
values clipped at 0.1, batch size 16, model selected by validation BLEU-4. Images are resized to 256 and randomly
cropped to 224 with horizontal flips for training, resized to 224 x 224 for evaluation, ImageNet normalisation.

## Evaluation

{results}

Data: {dataset_description}.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(content)


def save_hub_folder(model_path: str | os.PathLike, output_dir: str | os.PathLike, **card_kwargs: Any) -> Path:
    """Write the Hub layout of the model in `model_path` (a `save_pretrained` folder) to `output_dir`.

    `card_kwargs` go to `build_model_card` (`repo_id`, `metrics`, `dataset`, `split`, `license`).
    """
    output_dir = Path(output_dir)
    if not (Path(model_path) / "processor_config.json").is_file():
        raise ValueError(
            f"{model_path} has no processor (processor_config.json): the Hub folder needs the tokenizer and image "
            "processor too. Save the processor beside the model (train.py does; convert-official needs --annotation)."
        )
    model = AutoModelForImageTextToText.from_pretrained(model_path)
    processor = AutoProcessor.from_pretrained(model_path)
    # Saving through the pipeline records `custom_pipelines` in config.json and copies the pipeline file beside the
    # model code; the processor then writes its own files and code (the pipeline only saves tokenizer/image processor).
    pipe = RadiologyReportGenerationPipeline(model=model, processor=processor, device=model.device, task=TASK)
    pipe.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    card_kwargs.setdefault("repo_id", output_dir.name)
    build_model_card(config=model.config, generation_config=model.generation_config, **card_kwargs).save(
        output_dir / "README.md"
    )
    check_hub_folder(output_dir)
    return output_dir


def check_hub_folder(folder: str | os.PathLike) -> None:
    """Raise if the folder lacks a file or an `auto_map` entry that loading with `trust_remote_code=True` needs."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"the Hub folder {folder} lacks {missing}")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    auto_map = config.get("auto_map", {})
    for auto_class in ("AutoConfig", "AutoModelForImageTextToText"):
        if auto_class not in auto_map:
            raise RuntimeError(f"{folder / 'config.json'} has no auto_map entry for {auto_class}: {auto_map}")
    if TASK not in config.get("custom_pipelines", {}):
        raise RuntimeError(f"{folder / 'config.json'} does not declare the {TASK} pipeline (custom_pipelines)")
    processor_auto_maps = [
        json.loads(path.read_text(encoding="utf-8")).get("auto_map", {})
        for path in folder.glob("*_config.json")
        if path.name != "generation_config.json"
    ]
    if not any("AutoProcessor" in auto_map for auto_map in processor_auto_maps):
        raise RuntimeError(f"no processor config in {folder} has an auto_map entry for AutoProcessor")


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    commit_message: str = "Upload R2Gen-Mamba model",
) -> CommitInfo:
    """Create the model repo (if needed) and upload the folder in one commit; returns the commit (`.commit_url`,
    `.oid`: the hash to pin as `revision`).

    The token comes from `token`, else from `HF_TOKEN` or the `hf auth login` cache (HfApi's own lookup).
    """
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
    )
    logger.info(f"uploaded {folder} to {repo_id} ({commit.oid})")
    return commit
