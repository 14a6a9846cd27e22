"""Report datasets: `annotation.json` (or any image/report dataset) -> `datasets.DatasetDict`, image checks, collator.

Every dataset this module returns has one row per study with the columns

- `id` (str): the study id from the annotation,
- `image_paths` (list[str]): absolute image paths, one per view (for annotation files and path columns), or
  `images` (list of `Image(decode=False)` dicts `{"bytes", "path"}`): one per view (for datasets with `Image` columns),
- `report` (str): the raw report text (the processor cleans and tokenizes it),

plus every extra field of the source records (e.g. the synthetic generator's `findings`). Images are decoded lazily:
either by `R2GenMambaDataCollator` (give it raw rows; use `remove_unused_columns=False` with the Trainer) or by the
transform that `set_transforms` installs with `Dataset.with_transform` (rows then carry `pixel_values`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from transformers.utils import logging

from .processing_r2gen_mamba import R2GenMambaImageTransform, R2GenMambaProcessor, _is_dicom_file

logger = logging.get_logger(__name__)

DEFAULT_SPLITS: tuple[str, ...] = ("train", "val", "test")
# How many problems an error message lists before it only gives the count.
MAX_LISTED = 20


class AnnotationError(ValueError):
    """An annotation file or record is not what the loader expects."""


class ImageCheckError(ValueError):
    """Some records point at missing or unreadable images (or have the wrong number of views)."""


def _listing(problems: Sequence[str]) -> str:
    lines = [f"  - {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------------------------


def _record_name(split: str, index: int, record: Any) -> str:
    if isinstance(record, Mapping) and isinstance(record.get("id"), (str, int)) and str(record["id"]):
        return f"split '{split}' record #{index} (id '{record['id']}')"
    return f"split '{split}' record #{index}"


def load_annotation(
    path: str | os.PathLike,
    splits: Sequence[str] | None = DEFAULT_SPLITS,
    skip_empty_reports: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Read and validate an R2Gen-style `annotation.json` (`{"train": [...], "val": [...], "test": [...]}`).

    Each record needs `id` (str or int), `report` (str) and `image_path` (a path or a non-empty list of paths,
    relative to the image root). All problems are collected and raised together as one `AnnotationError` naming the
    file and each record (split, index and id).

    Args:
        path: the annotation file.
        splits: split keys that must be present (only these are returned); None returns every key of the file.
        skip_empty_reports: drop records whose report is empty or blank (the count is logged) instead of raising.

    Returns:
        `{split: [record, ...]}` with `id` as str and `image_path` always a list; other fields are kept as they are.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: not UTF-8 text ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path}: malformed JSON at line {error.lineno} column {error.colno} (char {error.pos}): {error.msg}"
        ) from None
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path}: expected a JSON object mapping split names to lists of records, got {type(data).__name__}"
        )
    if splits is None:
        splits = list(data)
    missing = [s for s in splits if s not in data]
    if missing:
        raise AnnotationError(f"{path}: missing split(s) {missing}; the file has {sorted(data)}")

    problems: list[str] = []
    result: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    for split in splits:
        records = data[split]
        if not isinstance(records, list):
            problems.append(f"split '{split}' is a {type(records).__name__}, expected a list of records")
            continue
        kept = []
        for index, record in enumerate(records):
            name = _record_name(split, index, record)
            if not isinstance(record, dict):
                problems.append(f"{name}: expected an object, got {type(record).__name__}")
                continue
            errors = []
            record_id = record.get("id")
            if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) or str(record_id) == "":
                errors.append("no 'id' (a non-empty string)")
            report = record.get("report")
            empty_report = False
            if not isinstance(report, str):
                errors.append("no 'report' (a string)" if report is None else "'report' is not a string")
            elif not report.strip():
                empty_report = True
            image_path = record.get("image_path")
            if isinstance(image_path, str):
                image_path = [image_path]
            if (
                not isinstance(image_path, list)
                or not image_path
                or not all(isinstance(p, str) and p for p in image_path)
            ):
                errors.append("no 'image_path' (a path or a non-empty list of paths)")
            if empty_report and not skip_empty_reports:
                errors.append("empty report")
            if errors:
                problems.append(f"{name}: {'; '.join(errors)}")
                continue
            if empty_report:
                skipped += 1
                continue
            kept.append({**record, "id": str(record_id), "image_path": list(image_path)})
        result[split] = kept
    if problems:
        raise AnnotationError(f"{path}: {len(problems)} invalid record(s):\n{_listing(problems)}")
    seen: dict[str, str] = {}
    duplicates = []
    for split, records in result.items():
        for record in records:
            if record["id"] in seen:
                duplicates.append(f"'{record['id']}' ({seen[record['id']]} and {split})")
            seen.setdefault(record["id"], split)
    if duplicates:
        # Not fatal (some annotations reuse ids), but an id in two splits usually means train/test leakage.
        logger.warning(f"{path}: {len(duplicates)} duplicate id(s): {', '.join(duplicates[:MAX_LISTED])}")
    if skipped:
        logger.warning(f"{path}: skipped {skipped} record(s) with an empty report")
    return result


def _default_image_dir(annotation_path: Path) -> Path:
    # The synthetic generator writes <dir>/annotation.json beside <dir>/images; R2Gen layouts pass --image-dir.
    images = annotation_path.parent / "images"
    return images if images.is_dir() else annotation_path.parent


def _to_dataset(records: list[dict[str, Any]], columns: Sequence[str], source: str) -> datasets.Dataset:
    if not records:
        features = datasets.Features(
            {
                "id": datasets.Value("string"),
                "image_paths": datasets.List(datasets.Value("string")),
                "report": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_dict({"id": [], "image_paths": [], "report": []}, features=features)
    # `from_list` takes its columns from the first record: give every record every column.
    try:
        return datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in records])
    except (TypeError, ValueError) as error:  # pyarrow's errors subclass these
        raise AnnotationError(
            f"{source}: cannot build a table from the records (a field with mixed types across records?): {error}"
        ) from None


def load_annotation_dataset(
    annotation: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    num_views: int | None = None,
    skip_empty_reports: bool = False,
    skip_wrong_views: bool = False,
) -> datasets.DatasetDict:
    """`annotation.json` + image root -> `DatasetDict` with `id`, `image_paths` (absolute, one per view), `report`.

    Args:
        annotation: the annotation file (validated by `load_annotation`).
        image_dir: root the records' `image_path` entries are relative to; defaults to `<annotation dir>/images`
            when that folder exists, else the annotation's folder.
        splits: split keys to load (all must be present).
        num_views: when given, records with a different number of images raise (or are dropped with
            `skip_wrong_views`).
        skip_empty_reports: drop records with an empty report instead of raising.
        skip_wrong_views: drop records with the wrong number of views instead of raising.

    Images are not opened here; run `check_images` before training.
    """
    annotation = Path(annotation)
    data = load_annotation(annotation, splits=splits, skip_empty_reports=skip_empty_reports)
    root = Path(image_dir) if image_dir is not None else _default_image_dir(annotation)
    if not root.is_dir():
        raise AnnotationError(f"image directory not found: {root} (for {annotation})")
    root = root.resolve()
    result = {}
    wrong_views: list[str] = []
    for split, records in data.items():
        rows = []
        for index, record in enumerate(records):
            paths = record.pop("image_path")
            if num_views is not None and len(paths) != num_views:
                wrong_views.append(
                    f"{_record_name(split, index, record)}: {len(paths)} image(s), expected {num_views}"
                )
                continue
            rows.append({"id": record.pop("id"), "image_paths": [str(root / p) for p in paths], **record})
        columns = ["id", "image_paths", "report"]
        columns += sorted({key for row in rows for key in row} - set(columns))
        result[split] = _to_dataset(rows, columns, f"{annotation} split '{split}'")
    if wrong_views:
        message = (
            f"{annotation}: {len(wrong_views)} record(s) with the wrong number of views:\n{_listing(wrong_views)}"
        )
        if not skip_wrong_views:
            raise AnnotationError(message)
        logger.warning(f"{annotation}: skipped {len(wrong_views)} record(s) without {num_views} view(s)")
    return datasets.DatasetDict(result)


# ----------------------------------------------------------------------------------------------------------------
# Any image/report dataset (local files, a saved dataset or a Hub dataset)
# ----------------------------------------------------------------------------------------------------------------


def _load_any(name_or_path: str, split: str | None, **kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:
    path = Path(name_or_path)
    # A folder written by `save_to_disk` has dataset_dict.json or state.json; `load_dataset` cannot read it.
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if split is not None:
            if not isinstance(loaded, datasets.DatasetDict):
                raise ValueError(f"{name_or_path} holds a single dataset; do not pass split={split!r}")
            if split not in loaded:
                raise ValueError(f"{name_or_path} has no split {split!r}; it has {list(loaded)}")
            return loaded[split]
        return loaded
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{name_or_path}: cannot load a dataset from a {path.suffix} file")
        return datasets.load_dataset(builder, data_files=str(path), split=split, **kwargs)
    return datasets.load_dataset(name_or_path, split=split, **kwargs)


def _normalise(
    dataset: datasets.Dataset,
    image_columns: list[str],
    text_column: str,
    id_column: str | None,
    image_dir: Path | None,
    source: str,
    id_prefix: str = "",
) -> datasets.Dataset:
    if id_column is None and "id" in dataset.features:
        id_column = "id"
    missing = [
        c for c in [*image_columns, text_column, *([id_column] if id_column else [])] if c not in dataset.features
    ]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; the dataset has {list(dataset.features)}")
    kinds = set()
    for column in image_columns:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image):
            kinds.add("image")
        elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            kinds.add("path")
        elif isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList)) and (
            isinstance(feature.feature, datasets.Image)
            or (isinstance(feature.feature, datasets.Value) and feature.feature.dtype in ("string", "large_string"))
        ):
            kinds.add("image" if isinstance(feature.feature, datasets.Image) else "path")
        else:
            raise ValueError(f"{source}: column {column!r} must hold images or image paths, got {feature}")
    if len(kinds) > 1:
        raise ValueError(f"{source}: image columns {image_columns} mix Image features and path strings")
    kind = kinds.pop()
    if kind == "image":
        for column in image_columns:
            target = datasets.Image(decode=False)
            if not isinstance(dataset.features[column], datasets.Image):
                target = datasets.List(target)
            dataset = dataset.cast_column(column, target)

    def views(row: dict[str, Any]) -> list[Any]:
        out = []
        for column in image_columns:
            value = row[column]
            out.extend(value if isinstance(value, list) else [value])
        return out

    def to_row(row: dict[str, Any], index: int) -> dict[str, Any]:
        report = row[text_column]
        new = {"id": str(row[id_column]) if id_column else f"{id_prefix}{index}", "report": report}
        if kind == "path":
            paths = views(row)
            base = image_dir or Path.cwd()
            new["image_paths"] = [p if p is None else str((base / p).resolve()) for p in paths]
        else:
            new["images"] = views(row)
        return new

    output_column = "image_paths" if kind == "path" else "images"
    drop = [c for c in {*image_columns, text_column} if c not in ("id", "report", output_column)]
    if id_column and id_column != "id":
        drop.append(id_column)
    features = dataset.features.copy()
    for column in [*drop, "id", "report", output_column]:
        features.pop(column, None)
    features["id"] = datasets.Value("string")
    features["report"] = dataset.features[text_column]
    features[output_column] = (
        datasets.List(datasets.Value("string")) if kind == "path" else datasets.List(datasets.Image(decode=False))
    )
    return dataset.map(to_row, with_indices=True, remove_columns=drop, features=features, desc="Normalising")


def load_image_text_dataset(
    name_or_path: str | os.PathLike,
    image_column: str | Sequence[str] = "image",
    text_column: str = "report",
    split: str | None = None,
    id_column: str | None = None,
    image_dir: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict | datasets.Dataset:
    """Load any image/report dataset and bring it to this module's columns.

    Args:
        name_or_path: a Hub dataset name, a local dataset folder (`load_dataset` or `save_to_disk` layout) or a
            .json/.jsonl/.csv/.parquet file.
        image_column: the column with the images, or several columns (one per view, in view order). A column may
            hold `Image` features or path strings, single or lists (several views).
        text_column: the column with the report text.
        split: one split (returns a `Dataset`), or None for all splits (a `DatasetDict`).
        id_column: column with study ids; defaults to `id` when the dataset has one, else the row index
            (prefixed with the split name, `train-0`, when loading several splits).
        image_dir: root for relative image paths (defaults to the current directory).
        **load_kwargs: passed to `datasets.load_dataset` (e.g. `revision`, `cache_dir`).

    Returns:
        Rows with `id`, `report` and either `image_paths` (absolute) or `images` (`Image(decode=False)` per view),
        other columns kept.
    """
    source = str(name_or_path)
    image_columns = [image_column] if isinstance(image_column, str) else list(image_column)
    if not image_columns:
        raise ValueError("image_column: give at least one column")
    loaded = _load_any(source, split, **load_kwargs)
    root = Path(image_dir).resolve() if image_dir is not None else None
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.DatasetDict(
            {
                name: _normalise(ds, image_columns, text_column, id_column, root, f"{source}[{name}]", f"{name}-")
                for name, ds in loaded.items()
            }
        )
    return _normalise(loaded, image_columns, text_column, id_column, root, source)


# ----------------------------------------------------------------------------------------------------------------
# Image checks
# ----------------------------------------------------------------------------------------------------------------


def _check_file(source: str | Mapping[str, Any], decode: bool) -> str | None:
    """None when the image opens (and decodes with `decode`), else a short reason."""
    if isinstance(source, Mapping):
        data, path = source.get("bytes"), source.get("path")
        if data is None:
            if not path:
                return "no bytes and no path"
            return _check_file(path, decode)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load() if decode else image.verify()
        except Exception as error:  # PIL raises many types for corrupt data
            return f"unreadable ({type(error).__name__}: {error})"
        return None
    path = Path(source)
    if not path.is_file():
        return "missing"
    try:
        # The loader's own test (`.dcm`/`.dicom` or a DICM header), so that check and loading agree.
        if _is_dicom_file(str(path)):
            import pydicom

            dataset = pydicom.dcmread(path)
            if "PixelData" not in dataset:
                return "unreadable (DICOM without pixel data)"
            if decode:
                dataset.pixel_array  # noqa: B018 - decoding is the check
        else:
            with Image.open(path) as image:
                image.load() if decode else image.verify()
    except Exception as error:  # PIL and pydicom raise many types for corrupt files
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def _problems_in(
    dataset: datasets.Dataset, num_views: int | None, decode: bool, num_workers: int, split: str
) -> dict[int, str]:
    column = "image_paths" if "image_paths" in dataset.column_names else "images"
    if column not in dataset.column_names:
        raise ValueError(f"split '{split}' has neither 'image_paths' nor 'images'; columns: {dataset.column_names}")
    table = dataset.select_columns(["id", column]).to_dict()
    ids, studies = table["id"], table[column]
    jobs = [(row, view, source) for row, sources in enumerate(studies) for view, source in enumerate(sources or [])]
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        reasons = list(pool.map(lambda job: None if job[2] is None else _check_file(job[2], decode), jobs))
    problems: dict[int, list[str]] = {}
    for row, sources in enumerate(studies):
        count = len(sources or [])
        if num_views is not None and count != num_views:
            problems.setdefault(row, []).append(f"{count} view(s), expected {num_views}")
    for (row, view, source), reason in zip(jobs, reasons):
        if source is None:
            reason = "no image"
        if reason is not None:
            where = (source.get("path") or f"view {view}") if isinstance(source, Mapping) else source
            problems.setdefault(row, []).append(f"{where}: {reason}")
    return {row: f"split '{split}' id '{ids[row]}': {'; '.join(found)}" for row, found in sorted(problems.items())}


def check_images(
    dataset: datasets.DatasetDict | datasets.Dataset,
    skip: bool = False,
    num_views: int | None = None,
    decode: bool = False,
    num_workers: int | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Open every image of every record before training; report the bad records by id.

    A record is bad when one of its images is missing or unreadable (PIL open + verify, or pydicom read for `.dcm`;
    full decoding with `decode=True`) or when it has a number of views other than `num_views`.

    Args:
        dataset: a `DatasetDict` or `Dataset` from this module (`image_paths` or `images` column).
        skip: drop the bad records and log their count instead of raising.
        num_views: expected views per record (None: any).
        decode: fully decode each image (slower; catches truncated files that `verify` misses).
        num_workers: threads used to open files (default: min(16, cpu count + 4)).

    Returns:
        The dataset unchanged (all good), or without the bad records when `skip`.

    Raises:
        ImageCheckError: listing the first 20 bad records (split, id, path, reason) and their total count.
    """
    single = isinstance(dataset, datasets.Dataset)
    splits = {"data": dataset} if single else dict(dataset)
    num_workers = num_workers or min(16, (os.cpu_count() or 1) + 4)
    all_problems: list[str] = []
    bad_rows: dict[str, set[int]] = {}
    for split, ds in splits.items():
        problems = _problems_in(ds, num_views, decode, num_workers, split)
        bad_rows[split] = set(problems)
        all_problems.extend(problems.values())
    checked = sum(len(ds) for ds in splits.values())
    if not all_problems:
        logger.info(f"check_images: all {checked} record(s) have readable images")
        return dataset
    if not skip:
        raise ImageCheckError(
            f"{len(all_problems)} of {checked} record(s) have missing or unreadable images or the wrong number of "
            f"views (skip=True drops them):\n{_listing(all_problems)}"
        )
    logger.warning(f"check_images: skipped {len(all_problems)} of {checked} record(s) with bad images or views")
    for problem in all_problems[:MAX_LISTED]:
        logger.info(f"check_images: skipped {problem}")
    kept = {
        split: ds.select([i for i in range(len(ds)) if i not in bad_rows[split]]) if bad_rows[split] else ds
        for split, ds in splits.items()
    }
    return kept["data"] if single else datasets.DatasetDict(kept)


# ----------------------------------------------------------------------------------------------------------------
# Lazy decoding and batching
# ----------------------------------------------------------------------------------------------------------------


def _open_view(view: Any) -> Any:
    """An `Image(decode=False)` dict becomes a PIL image; paths, PIL images and arrays pass through."""
    if isinstance(view, Mapping):
        if view.get("bytes") is not None:
            return Image.open(io.BytesIO(view["bytes"]))
        if view.get("path"):
            return view["path"]
        raise ValueError("an image entry has neither bytes nor a path")
    return view


def study_images(record: Mapping[str, Any]) -> list[Any]:
    """The views of one row (`image_paths` or `images` column) as paths or PIL images, in view order."""
    if "image_paths" in record and record["image_paths"] is not None:
        return list(record["image_paths"])
    if "images" in record and record["images"] is not None:
        return [_open_view(view) for view in record["images"]]
    raise KeyError(f"record {record.get('id')!r} has neither 'image_paths' nor 'images' (keys: {sorted(record)})")


class StudyTransform:
    """`with_transform` function: adds `pixel_values` (float tensor [views, 3, H, W]) to each row, lazily.

    Wraps the processor's `R2GenMambaImageTransform` (train augmentation when `train`, else the eval resize) and
    also accepts `Image` feature rows. Other columns pass through unchanged.
    """

    def __init__(self, processor: R2GenMambaProcessor, train: bool = False, generator: torch.Generator | None = None):
        self.image_transform = R2GenMambaImageTransform(
            processor.image_processor, train=train, image_column="_views", generator=generator
        )

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        views = {"_views": [study_images(row) for row in rows]}
        output = dict(batch)
        output["pixel_values"] = self.image_transform(views)["pixel_values"]
        return output


def set_transforms(
    dataset: datasets.DatasetDict,
    processor: R2GenMambaProcessor,
    train_splits: Sequence[str] = ("train",),
    generator: torch.Generator | None = None,
) -> datasets.DatasetDict:
    """Return `dataset` with lazy image decoding: train augmentation on `train_splits`, the eval transform elsewhere.

    Rows then carry `pixel_values` [views, 3, H, W]; `R2GenMambaDataCollator` stacks them instead of loading images.
    """
    return datasets.DatasetDict(
        {
            name: split.with_transform(StudyTransform(processor, train=name in train_splits, generator=generator))
            for name, split in dataset.items()
        }
    )


@dataclass
class R2GenMambaDataCollator:
    """Batch raw rows into the model's inputs (usable as `data_collator` of the `transformers` Trainer).

    Takes rows with `report` and either `pixel_values` (from `set_transforms`) or the views (`image_paths` /
    `images`), which it loads and transforms itself (train augmentation when `train`). Use
    `remove_unused_columns=False` in the training arguments so the Trainer hands these columns over.

    Returns:
        `pixel_values` [batch, views, 3, H, W] float32, `labels` [batch, T] (-100 padded), `decoder_input_ids`
        [batch, T] (0 padded), `decoder_attention_mask` [batch, T].

    Args:
        processor: the `R2GenMambaProcessor` (tokenizer + image processor; its `num_views` is enforced).
        train: random crop/flip augmentation (draws from `generator`, else the global torch generator).
        max_length: report encoding length (default: the tokenizer's `model_max_length`).
    """

    processor: R2GenMambaProcessor
    train: bool = False
    max_length: int | None = None
    generator: torch.Generator | None = None

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not records:
            raise ValueError("R2GenMambaDataCollator: empty batch")
        reports = [record["report"] for record in records]
        if all("pixel_values" in record for record in records):
            batch = self.processor(text=reports, max_length=self.max_length, return_tensors="pt")
            batch["pixel_values"] = torch.stack([torch.as_tensor(record["pixel_values"]) for record in records])
            return dict(batch)
        studies = [study_images(record) for record in records]
        batch = self.processor(
            images=studies,
            text=reports,
            max_length=self.max_length,
            augment=self.train,
            generator=self.generator,
            return_tensors="pt",
        )
        return dict(batch)
