"""`r2gen-mamba generate`: reports for one study or a batch of studies from image files (PNG, JPEG, DICOM).

    r2gen-mamba generate --model DIR_OR_HUB_ID frontal.png lateral.png          # one study, prints the report
    r2gen-mamba generate --model M --csv studies.csv --output preds.csv         # columns id, image..., [reference]
    r2gen-mamba generate --model M --annotation annotation.json --image-dir images --split test --output preds.csv
    r2gen-mamba generate --model M --folder studies/ --output preds.json        # one sub-folder per study

The output (CSV or JSON) has `id`, `generated` and, when the input knows it, `reference`: the CSV form is what
`r2gen-mamba evaluate --predictions` reads. References are written as R2Gen scores them (encoded by the model's
tokenizer - cleaned, cut to its max length - and decoded), unless `--raw-references` is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .pipeline_r2gen_mamba import RadiologyReportGenerationPipeline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
# Several images in one CSV cell are separated by this character.
CSV_PATH_SEPARATOR = ";"


@dataclass
class Study:
    id: str
    images: list[str]
    reference: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="the views of ONE study, in the model's order")
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    source = parser.add_argument_group("batch input (instead of IMAGE ...)")
    source.add_argument("--csv", help="CSV with an `id` column, image column(s) named image*, optional `reference`")
    source.add_argument("--annotation", help="R2Gen annotation.json ({split: [{id, report, image_path}]})")
    source.add_argument("--folder", help="folder with one sub-folder of images per study (sorted by file name)")
    source.add_argument("--image-dir", help="root of relative image paths (default: the CSV's / annotation's folder)")
    source.add_argument("--split", default="test", help="split of --annotation (default: test)")
    parser.add_argument("--output", help="write predictions to this .csv or .json file")
    parser.add_argument(
        "--raw-references",
        action="store_true",
        help="write references as given instead of R2Gen's decoded form (cleaned, cut to the tokenizer's max length)",
    )
    parser.add_argument("--num-beams", type=int, help="beam size (default: the model's generation_config)")
    parser.add_argument("--max-length", type=int, help="maximum report length in tokens incl. the start token")
    parser.add_argument("--batch-size", type=int, default=8, help="studies per forward pass (default: 8)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running code stored with the model (Hub remote code); the classes of the installed r2gen_mamba "
        "still take precedence for R2Gen-Mamba models (transformers prefers explicitly registered classes)",
    )


def load_pipeline(
    model: str, device: str | None = None, trust_remote_code: bool = False
) -> RadiologyReportGenerationPipeline:
    """The report-generation pipeline for a model folder or Hub id (model + processor via the Auto classes)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    return RadiologyReportGenerationPipeline(model=loaded.eval(), processor=processor, device=torch.device(device))


def _resolve(path: str, root: Path) -> str:
    return path if os.path.isabs(path) else str(root / path)


def studies_from_csv(path: str | os.PathLike, image_dir: str | None = None) -> list[Study]:
    """Studies of a CSV: `id`, image columns (names starting with `image`, in order; `;` separates several paths in
    one cell), optional `reference` (or `report`)."""
    path = Path(path)
    root = Path(image_dir) if image_dir else path.parent
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        image_columns = [name for name in columns if name.lower().startswith("image")]
        if "id" not in columns or not image_columns:
            raise ValueError(f"{path}: need an `id` column and image column(s) named image*, got columns {columns}")
        reference_column = next((name for name in ("reference", "report") if name in columns), None)
        studies = []
        for line, row in enumerate(reader, start=2):
            images = [
                _resolve(part.strip(), root)
                for name in image_columns
                for part in (row[name] or "").split(CSV_PATH_SEPARATOR)
                if part.strip()
            ]
            if not images:
                raise ValueError(f"{path} line {line} (id {row['id']!r}): no image path")
            reference = row[reference_column] if reference_column else None
            studies.append(Study(row["id"], images, reference))
    return studies


def studies_from_annotation(path: str | os.PathLike, image_dir: str | None, split: str) -> list[Study]:
    """Studies of one split of an R2Gen annotation.json (`id`, `image_path` list, `report` as the reference)."""
    path = Path(path)
    root = Path(image_dir) if image_dir else path.parent
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read annotation {path}: {error}") from error
    if not isinstance(annotation, dict) or split not in annotation:
        found = sorted(annotation) if isinstance(annotation, dict) else type(annotation).__name__
        raise ValueError(f"{path} has no split {split!r} (found {found})")
    studies = []
    for index, record in enumerate(annotation[split]):
        if not isinstance(record, dict) or "id" not in record or not record.get("image_path"):
            raise ValueError(f"{path} {split}[{index}]: a record needs `id` and a non-empty `image_path` list")
        images = record["image_path"]
        images = [images] if isinstance(images, str) else images
        studies.append(Study(str(record["id"]), [_resolve(p, root) for p in images], record.get("report")))
    return studies


def studies_from_folder(path: str | os.PathLike) -> list[Study]:
    """One study per sub-folder (id = its name), its images sorted by file name (e.g. 0.png frontal, 1.png lateral)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    studies = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        images = sorted(str(p) for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"study folder {sub} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        studies.append(Study(sub.name, images))
    if not studies:
        raise ValueError(f"{path} has no sub-folders (expected one sub-folder of images per study)")
    return studies


def check_studies(studies: list[Study], num_views: int) -> None:
    """Fail before any generation on a missing file or a wrong number of views, naming the study and file."""
    for study in studies:
        if len(study.images) != num_views:
            raise ValueError(
                f"study {study.id!r} has {len(study.images)} image(s) {study.images}, the model expects {num_views}"
            )
        for image in study.images:
            if not os.path.isfile(image):
                raise ValueError(f"study {study.id!r}: image file {image} does not exist")


def r2gen_reference(processor: Any, report: str, study_id: str) -> str:
    """A reference as R2Gen scores it: encoded by the tokenizer (cleaned, cut to its max length), then decoded."""
    try:
        labels = processor(text=[report], return_tensors=None)["labels"]
    except ValueError as error:
        raise ValueError(f"study {study_id!r}: bad reference report: {error}") from error
    return processor.batch_decode([[max(token, 0) for token in labels[0]]], skip_special_tokens=True)[0]


def write_predictions(path: str | os.PathLike, rows: list[dict[str, str]]) -> None:
    """Write `rows` (id, generated[, reference]) as CSV or JSON, chosen by the file suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    fields = ["id", "generated"] + (["reference"] if rows and "reference" in rows[0] else [])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def generate_reports(
    pipe: RadiologyReportGenerationPipeline, studies: list[Study], batch_size: int = 8, **generate_kwargs
) -> list[dict[str, str]]:
    """Generate one report per study (progress bar on stderr); rows of id, generated and reference if known."""
    from tqdm.auto import tqdm

    rows = []
    with tqdm(total=len(studies), desc="generating", unit="study", file=sys.stderr) as progress:
        for start in range(0, len(studies), batch_size):
            chunk = studies[start : start + batch_size]
            outputs = pipe([s.images for s in chunk], batch_size=len(chunk), **generate_kwargs)
            for study, output in zip(chunk, outputs):
                row = {"id": study.id, "generated": output[0]["generated_text"]}
                if study.reference is not None:
                    row["reference"] = study.reference
                rows.append(row)
            progress.update(len(chunk))
    return rows


def run(args: argparse.Namespace) -> int:
    sources = [name for name in ("csv", "annotation", "folder") if getattr(args, name)] + (
        ["IMAGE"] if args.images else []
    )
    if len(sources) != 1:
        print("error: give the images of one study, or exactly one of --csv, --annotation, --folder", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    generate_kwargs = {}
    if args.num_beams is not None:
        generate_kwargs["num_beams"] = args.num_beams
    if args.max_length is not None:
        generate_kwargs["max_length"] = args.max_length
    try:
        if args.csv:
            studies = studies_from_csv(args.csv, args.image_dir)
        elif args.annotation:
            studies = studies_from_annotation(args.annotation, args.image_dir, args.split)
        elif args.folder:
            studies = studies_from_folder(args.folder)
        else:
            studies = [Study("study", list(args.images))]
        pipe = load_pipeline(args.model, args.device, args.trust_remote_code)
        check_studies(studies, pipe.model.config.num_views)
        if not args.raw_references:
            for study in studies:
                if study.reference is not None:
                    study.reference = r2gen_reference(pipe.processor, study.reference, study.id)
        if args.images and not args.output:
            print(pipe(list(args.images), **generate_kwargs)[0]["generated_text"])
            return 0
        rows = generate_reports(pipe, studies, args.batch_size, **generate_kwargs)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.output:
        write_predictions(args.output, rows)
        print(f"wrote {len(rows)} report(s) to {args.output}", file=sys.stderr)
    else:
        for row in rows:
            print(f"{row['id']}\t{row['generated']}")
    return 0
