"""Build R2Gen-style `annotation.json` files from the raw IU X-Ray and MIMIC-CXR downloads.

`r2gen-mamba prepare-data iu-xray --reports ecgen-radiology/ --images NLMCXR_png/ --output annotation.json`

- One record per OpenI report XML (`<eCitation>`), with the `<AbstractText Label="FINDINGS">` text as the report.
- Images are the report's `<parentImage id="...">` entries; `<id>.png` must exist in `--images`.
- Views: one frontal + one lateral image per study, as in R2Gen's iu_xray annotation (`image_path` = [frontal,
  lateral]). The view of each image comes from, in order: a projections CSV (`--projections`, the `uid,filename,
  projection` table shipped with the Kaggle copy of IU X-Ray), else the image's `<caption>` when it names a single
  view ("lateral"/"lat" vs "PA"/"AP"/"frontal"), else its position (the first image of a report is taken as frontal,
  the second as lateral; OpenI lists the PA image first in most reports). The first frontal and first lateral win.
- Study id: the first image id without its last `-NNNN` part (`CXR2384_IM-0942-1001` -> `CXR2384_IM-0942`).
- Dropped, with counts logged: reports without findings, reports without a frontal + lateral pair, reports whose
  images are missing, and reports whose study id an earlier report (in file name order) already has.
- Split: each IU report is one patient, so the patient-level split is a seeded shuffle of the studies cut 7:1:2.
- Image layout: by default `image_path` holds the PNG names relative to `--images` (use `--images` as the image root
  at training time). `--image-output DIR` instead writes R2Gen's layout `DIR/<id>/0.png` (frontal) and `1.png`
  (lateral) as symbolic links (`--copy-images` copies) and makes the paths relative to `DIR`.

`r2gen-mamba prepare-data mimic-cxr --root mimic-cxr-jpg/2.1.0 --reports mimic-cxr-reports --output annotation.json`

- Splits from `mimic-cxr-2.0.0-split.csv[.gz]` (`dicom_id,study_id,subject_id,split`; `validate` -> `val`), views from
  `mimic-cxr-2.0.0-metadata.csv[.gz]` (`ViewPosition`).
- One record per study with its report at `<reports>/files/pXX/pSUBJECT/sSTUDY.txt`; the report is the FINDINGS
  section (from `FINDINGS:` to the next upper-case section header such as `IMPRESSION:`).
- One frontal image per study as in R2Gen (PA preferred over AP; ties broken by dicom id); `--all-views` keeps every
  image of the study (frontal first, then the rest by dicom id). Record id = the chosen (first) dicom id.
- Dropped, with counts logged: studies without a findings section, without a report file, without a frontal image
  (unless `--all-views`), or whose image files are missing under `--root`.
- Image paths `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`, relative to `--root` (the image root at training time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

SPLITS = ("train", "val", "test")


def _split_ids(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Seeded shuffle of the (sorted) ids cut by `fractions` (train, val, test) -> {id: split}."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"--split needs three non-negative fractions (train val test), got {list(fractions)}")
    ordered = sorted(ids)
    random.Random(seed).shuffle(ordered)
    total = sum(fractions)
    num_train = round(len(ordered) * fractions[0] / total)
    num_val = round(len(ordered) * fractions[1] / total)
    return {
        study: "train" if i < num_train else "val" if i < num_train + num_val else "test"
        for i, study in enumerate(ordered)
    }


def _write_annotation(records: list[dict[str, Any]], output: Path) -> dict[str, int]:
    annotation: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for record in records:
        annotation[record["split"]].append(record)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(annotation, indent=1))
    return {split: len(annotation[split]) for split in SPLITS}


def _log_drops(dataset: str, drops: Counter) -> None:
    for reason, count in sorted(drops.items()):
        logger.warning(f"{dataset}: dropped {count} stud{'y' if count == 1 else 'ies'} {reason}")


# ----------------------------------------------------------------------------------------------------------------
# IU X-Ray (OpenI)
# ----------------------------------------------------------------------------------------------------------------

_FRONTAL_WORDS = re.compile(r"\b(pa|ap|frontal|posteroanterior|anteroposterior)\b")
_LATERAL_WORDS = re.compile(r"\b(lat|lateral)\b")


def _caption_view(caption: str | None) -> str | None:
    """'frontal' / 'lateral' when a caption names exactly one kind of view, else None ("PA and lateral")."""
    if not caption:
        return None
    text = caption.lower()
    frontal, lateral = bool(_FRONTAL_WORDS.search(text)), bool(_LATERAL_WORDS.search(text))
    if frontal == lateral:
        return None
    return "frontal" if frontal else "lateral"


def read_projections(path: str | os.PathLike) -> dict[str, str]:
    """Kaggle's `indiana_projections.csv` (`uid,filename,projection`) -> {OpenI image id: 'frontal'/'lateral'}.

    File names such as `1_IM-0001-4001.dcm.png` map to the OpenI image id `CXR1_1_IM-0001-4001`.
    """
    import pandas as pd

    table = pd.read_csv(path)
    missing = {"filename", "projection"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected uid,filename,projection")
    views = {}
    for filename, projection in zip(table["filename"], table["projection"]):
        stem = str(filename).split(".")[0]
        image_id = stem if stem.startswith("CXR") else f"CXR{stem}"
        view = str(projection).strip().lower()
        if view not in ("frontal", "lateral"):
            raise ValueError(f"{path}: projection {projection!r} for {filename}; expected Frontal or Lateral")
        views[image_id] = view
    return views


def parse_openi_report(path: str | os.PathLike) -> dict[str, Any]:
    """One OpenI XML report -> {"uid", "findings", "impression", "images": [{"id", "caption"}, ...]}."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: malformed XML ({error})") from None
    if root.tag != "eCitation":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <eCitation> (an OpenI report)")
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        sections[label] = " ".join("".join(node.itertext()).split())
    images = [
        {"id": node.get("id"), "caption": (node.findtext("caption") or "").strip()}
        for node in root.iter("parentImage")
        if node.get("id")
    ]
    uid = root.find("uId")
    return {
        "uid": uid.get("id") if uid is not None else Path(path).stem,
        "findings": sections.get("FINDINGS", ""),
        "impression": sections.get("IMPRESSION", ""),
        "images": images,
    }


def _pick_views(images: list[dict[str, str]], projections: dict[str, str] | None) -> tuple[str, str] | None:
    """(frontal id, lateral id) or None; see the module docstring for the rules."""
    if projections is not None:
        views = [projections.get(image["id"]) for image in images]
    else:
        views = [_caption_view(image["caption"]) for image in images]
        if not any(views):
            # Captions such as "Xray Chest PA and Lateral" name both views: fall back to the order.
            views = ["frontal", "lateral"] if len(images) >= 2 else [None] * len(images)
    frontal = next((image["id"] for image, view in zip(images, views) if view == "frontal"), None)
    lateral = next((image["id"] for image, view in zip(images, views) if view == "lateral"), None)
    if frontal is None and lateral is not None and projections is None:
        # A caption identified only the lateral view: the other image is the frontal one.
        frontal = next((image["id"] for image in images if image["id"] != lateral), None)
    if lateral is None and frontal is not None and projections is None:
        lateral = next((image["id"] for image in images if image["id"] != frontal), None)
    if frontal is None or lateral is None:
        return None
    return frontal, lateral


def _study_id(image_id: str) -> str:
    return re.sub(r"-\d+$", "", image_id)


def prepare_iu_xray(
    reports_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    output: str | os.PathLike,
    seed: int = 9223,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    projections: str | os.PathLike | None = None,
    image_output: str | os.PathLike | None = None,
    copy_images: bool = False,
) -> dict[str, int]:
    """Write the IU X-Ray annotation (see the module docstring); returns the number of studies per split."""
    reports_dir, images_dir, output = Path(reports_dir), Path(images_dir), Path(output)
    for folder, flag in ((reports_dir, "--reports"), (images_dir, "--images")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag}: folder not found: {folder}")
    xml_files = sorted(reports_dir.glob("*.xml"))
    if not xml_files:
        raise FileNotFoundError(f"--reports: no .xml files in {reports_dir}")
    views = read_projections(projections) if projections is not None else None
    drops: Counter = Counter()
    studies = []
    seen: set[str] = set()
    for xml_file in xml_files:
        report = parse_openi_report(xml_file)
        if not report["findings"]:
            drops["without findings"] += 1
            continue
        pair = _pick_views(report["images"], views)
        if pair is None:
            drops["without a frontal + lateral image pair"] += 1
            continue
        files = [images_dir / f"{image_id}.png" for image_id in pair]
        if not all(f.is_file() for f in files):
            drops[f"with image files missing from {images_dir}"] += 1
            continue
        study = _study_id(pair[0])
        if study in seen:
            drops["with a duplicate study id"] += 1
            continue
        seen.add(study)
        studies.append({"id": study, "report": report["findings"], "files": files, "uid": report["uid"]})
    _log_drops("iu-xray", drops)
    if not studies:
        raise ValueError(f"iu-xray: no usable study in {reports_dir} ({dict(drops)})")
    split_of = _split_ids([s["id"] for s in studies], split, seed)
    records = []
    for study in studies:
        if image_output is None:
            paths = [os.path.relpath(f, images_dir) for f in study["files"]]
        else:
            paths = []
            for view, source in enumerate(study["files"]):
                relative = f"{study['id']}/{view}.png"
                target = Path(image_output) / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists() or target.is_symlink():
                    target.unlink()
                if copy_images:
                    shutil.copyfile(source, target)
                else:
                    target.symlink_to(source.resolve())
                paths.append(relative)
        records.append(
            {
                "id": study["id"],
                "report": study["report"],
                "image_path": paths,
                "split": split_of[study["id"]],
                "uid": study["uid"],
            }
        )
    return _write_annotation(records, output)


# ----------------------------------------------------------------------------------------------------------------
# MIMIC-CXR
# ----------------------------------------------------------------------------------------------------------------

# A section header: an upper-case phrase at the start of a line followed by a colon ("IMPRESSION:", "PA AND LAT:").
_SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()\-]*[A-Z)]):", re.MULTILINE)
_FINDINGS_HEADERS = ("FINDINGS", "FINDINGS AND IMPRESSION", "FINDINGS AND IMPRESSIONS")


def extract_findings(report: str) -> str:
    """The FINDINGS section of a MIMIC-CXR free-text report, whitespace collapsed ('' when there is none)."""
    headers = list(_SECTION_HEADER.finditer(report))
    for index, header in enumerate(headers):
        if header.group(1).strip() in _FINDINGS_HEADERS:
            end = headers[index + 1].start() if index + 1 < len(headers) else len(report)
            return " ".join(report[header.end() : end].split())
    return ""


def _read_table(root: Path, stem: str, columns: set[str]):
    import pandas as pd

    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            table = pd.read_csv(root / name, dtype=str)
            missing = columns - set(table.columns)
            if missing:
                raise ValueError(f"{root / name}: missing column(s) {sorted(missing)}")
            return table
    raise FileNotFoundError(f"--root: neither {stem}.csv nor {stem}.csv.gz in {root}")


_VIEW_RANK = {"PA": 0, "AP": 1}


def prepare_mimic_cxr(
    root: str | os.PathLike,
    reports_dir: str | os.PathLike,
    output: str | os.PathLike,
    all_views: bool = False,
) -> dict[str, int]:
    """Write the MIMIC-CXR annotation (see the module docstring); returns the number of studies per split."""
    root, reports_dir, output = Path(root), Path(reports_dir), Path(output)
    for folder, flag in ((root, "--root"), (reports_dir, "--reports")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag}: folder not found: {folder}")
    splits = _read_table(root, "mimic-cxr-2.0.0-split", {"dicom_id", "study_id", "subject_id", "split"})
    metadata = _read_table(root, "mimic-cxr-2.0.0-metadata", {"dicom_id", "ViewPosition"})
    table = splits.merge(metadata[["dicom_id", "ViewPosition"]], on="dicom_id", how="left")
    split_names = {"train": "train", "validate": "val", "val": "val", "test": "test"}
    unknown = set(table["split"]) - set(split_names)
    if unknown:
        raise ValueError(f"mimic-cxr-2.0.0-split: unknown split value(s) {sorted(unknown)}")
    drops: Counter = Counter()
    records = []
    for (subject, study), group in table.groupby(["subject_id", "study_id"], sort=True):
        folder = f"files/p{subject[:2]}/p{subject}"
        report_file = reports_dir / folder / f"s{study}.txt"
        if not report_file.is_file():
            drops["without a report file"] += 1
            continue
        findings = extract_findings(report_file.read_text(encoding="utf-8", errors="replace"))
        if not findings:
            drops["without a findings section"] += 1
            continue
        images = sorted(
            zip(group["ViewPosition"].fillna(""), group["dicom_id"], group["split"]),
            key=lambda row: (_VIEW_RANK.get(row[0], 2), row[1]),
        )
        if not all_views:
            images = [row for row in images if row[0] in _VIEW_RANK][:1]
            if not images:
                drops["without a frontal (PA/AP) image"] += 1
                continue
        paths = [f"{folder}/s{study}/{dicom}.jpg" for _, dicom, _ in images]
        if not all((root / p).is_file() for p in paths):
            drops[f"with image files missing under {root}"] += 1
            continue
        records.append(
            {
                "id": images[0][1],
                "study_id": int(study),
                "subject_id": int(subject),
                "report": findings,
                "image_path": paths,
                "split": split_names[images[0][2]],
                "view_positions": [view for view, _, _ in images],
            }
        )
    _log_drops("mimic-cxr", drops)
    if not records:
        raise ValueError(f"mimic-cxr: no usable study under {root} / {reports_dir} ({dict(drops)})")
    return _write_annotation(records, output)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    iu = sub.add_parser("iu-xray", help="IU X-Ray (OpenI XML reports + NLMCXR_png images)")
    iu.add_argument("--reports", required=True, help="folder of OpenI report XML files (ecgen-radiology)")
    iu.add_argument("--images", required=True, help="folder of the PNG images (NLMCXR_png)")
    iu.add_argument("--output", required=True, help="annotation.json to write")
    iu.add_argument("--seed", type=int, default=9223, help="seed of the patient-level split")
    iu.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    iu.add_argument("--projections", help="indiana_projections.csv (uid,filename,projection) to decide the views")
    iu.add_argument("--image-output", help="write R2Gen's <id>/0.png, <id>/1.png layout here (symbolic links)")
    iu.add_argument("--copy-images", action="store_true", help="copy instead of linking with --image-output")
    mimic = sub.add_parser("mimic-cxr", help="MIMIC-CXR-JPG images + MIMIC-CXR free-text reports")
    mimic.add_argument("--root", required=True, help="MIMIC-CXR-JPG folder (files/, split and metadata CSVs)")
    mimic.add_argument("--reports", required=True, help="MIMIC-CXR reports folder (files/pXX/pSUBJECT/sSTUDY.txt)")
    mimic.add_argument("--output", required=True, help="annotation.json to write")
    mimic.add_argument("--all-views", action="store_true", help="keep every image of a study, frontal first")


def run(args: argparse.Namespace) -> int:
    if args.dataset == "iu-xray":
        counts = prepare_iu_xray(
            args.reports,
            args.images,
            args.output,
            seed=args.seed,
            split=args.split,
            projections=args.projections,
            image_output=args.image_output,
            copy_images=args.copy_images,
        )
        image_root = args.image_output or args.images
    else:
        counts = prepare_mimic_cxr(args.root, args.reports, args.output, all_views=args.all_views)
        image_root = args.root
    summary = ", ".join(f"{split} {count}" for split, count in counts.items())
    print(f"Wrote {args.output} ({summary}); image root: {image_root}")
    return 0
