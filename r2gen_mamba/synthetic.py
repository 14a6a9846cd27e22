"""Synthetic chest X-ray demo dataset and a rule-based finding parser (`r2gen-mamba make-demo-data`).

The generator draws small grayscale chest radiographs (a frontal PA view and a lateral view per study) in which
every finding is visible in the pixels, and writes one report per study in plain radiology sentences:

- `cardiomegaly`: heart shadow about 1.7x wider (cardiothoracic ratio above 0.5); "The heart is enlarged."
- `left_effusion`: opaque base with a meniscus in the patient's left lung (image right); "There is a left pleural
  effusion."
- `right_effusion`: the same in the patient's right lung (image left).
- `pneumothorax`: right lung (image left) with a dark lateral band without markings and a thin visible pleural line;
  "There is a right pneumothorax."
- `nodule`: a small bright round spot in one lung; "There is a nodule in the lung."

A study without any of them is normal and gets the normal sentence for each organ. The pneumothorax is always on the
right so that the label set stays small (the side is still named in the report). The lateral view shows the same
findings (larger anterior heart, posterior sulcus fluid, anterior lucency, the nodule at the same height).

Each sentence has a main phrasing (chosen with probability 0.8) and alternatives, so reports vary but stay learnable.
The annotation is R2Gen's format plus the ground-truth labels:
`{"train": [{"id", "report", "image_path": ["<id>/0.png", "<id>/1.png"], "split", "findings": [...]}], ...}`,
written to `<output_dir>/annotation.json` with the images under `<output_dir>/images` (the image root).
Everything is deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from transformers.utils import logging

logger = logging.get_logger(__name__)

FINDING_LABELS: tuple[str, ...] = ("cardiomegaly", "left_effusion", "right_effusion", "pneumothorax", "nodule")
# Independent prevalence of each finding; P(normal) = 0.7 * 0.75 * 0.75 * 0.8 * 0.75 ~= 0.24.
FINDING_PROBABILITIES: dict[str, float] = {
    "cardiomegaly": 0.3,
    "left_effusion": 0.25,
    "right_effusion": 0.25,
    "pneumothorax": 0.2,
    "nodule": 0.25,
}
MAIN_PHRASING_PROBABILITY = 0.8

# One list of phrasings per report slot; the first entry is the main phrasing.
SENTENCES: dict[str, list[str]] = {
    "heart_normal": ["The heart size is normal.", "The cardiac silhouette is within normal limits."],
    "cardiomegaly": ["The heart is enlarged.", "There is cardiomegaly.", "The cardiac silhouette is enlarged."],
    "lungs_clear": ["The lungs are clear.", "No focal consolidation or nodule."],
    "nodule": ["There is a nodule in the lung.", "A small pulmonary nodule is seen."],
    "no_effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "left_effusion": ["There is a left pleural effusion.", "Small left pleural effusion."],
    "right_effusion": ["There is a right pleural effusion.", "Small right pleural effusion."],
    "both_effusions": ["There are bilateral pleural effusions.", "Bilateral pleural effusions are present."],
    "no_pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "pneumothorax": ["There is a right pneumothorax.", "A right-sided pneumothorax is present."],
    "no_effusion_no_pneumothorax": ["No pleural effusion or pneumothorax."],
}


# ----------------------------------------------------------------------------------------------------------------
# Finding parser
# ----------------------------------------------------------------------------------------------------------------

_NEGATION = re.compile(r"\b(no|without|negative for|free of|not)\b")
_CARDIOMEGALY_KEYWORDS = ("cardiomegaly", "heart is enlarged", "silhouette is enlarged", "enlarged heart")


def _sentences(text: str) -> list[str]:
    # Works on raw reports ("No effusion. The heart ...") and on cleaned/decoded ones ("no effusion . the heart").
    return [s.strip() for s in re.split(r"[.\n;]", text.lower()) if s.strip()]


def _positive(sentence: str, keyword: str) -> bool:
    """True when `keyword` occurs in `sentence` and no negation cue comes before it."""
    position = sentence.find(keyword)
    if position < 0:
        return False
    return _NEGATION.search(sentence[:position]) is None


def parse_findings(text: str) -> set[str]:
    """Finding labels (a subset of `FINDING_LABELS`) named positively in a report.

    Rule-based, sentence by sentence: a finding counts when one of its keywords appears in a sentence without a
    negation cue ("no", "without", "not", "negative for", "free of") before it. Effusion sides come from "left",
    "right" or "bilateral" in the same sentence (an effusion without a side counts as both).
    """
    found: set[str] = set()
    for sentence in _sentences(text):
        if any(_positive(sentence, k) for k in _CARDIOMEGALY_KEYWORDS):
            found.add("cardiomegaly")
        if _positive(sentence, "pneumothorax"):
            found.add("pneumothorax")
        if _positive(sentence, "nodule"):
            found.add("nodule")
        if _positive(sentence, "effusion"):
            left = "left" in sentence or "bilateral" in sentence
            right = "right" in sentence or "bilateral" in sentence
            if not (left or right):
                left = right = True
            if left:
                found.add("left_effusion")
            if right:
                found.add("right_effusion")
    return found


def finding_accuracy(generated_texts: Sequence[str], ground_truth_findings: Sequence[Iterable[str]]) -> float:
    """Fraction of studies whose parsed finding set equals the ground truth exactly.

    A study counts as correct only when `parse_findings(generated)` names every true finding and nothing else
    (normal studies must name none). Returns a value in [0, 1]; raises on length mismatch or empty input.
    """
    if len(generated_texts) != len(ground_truth_findings):
        raise ValueError(
            f"finding_accuracy: {len(generated_texts)} generated texts but {len(ground_truth_findings)} ground truths"
        )
    if not generated_texts:
        raise ValueError("finding_accuracy: no studies given")
    correct = sum(parse_findings(text) == set(truth) for text, truth in zip(generated_texts, ground_truth_findings))
    return correct / len(generated_texts)


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, slot: str) -> str:
    options = SENTENCES[slot]
    if len(options) == 1 or rng.random() < MAIN_PHRASING_PROBABILITY:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


# (left effusion, right effusion) -> report slot.
_EFFUSION_SLOT = {
    (False, False): "no_effusion",
    (True, False): "left_effusion",
    (False, True): "right_effusion",
    (True, True): "both_effusions",
}


def make_report(findings: Iterable[str], rng: np.random.Generator) -> str:
    """A findings-section report naming each present finding and the normal sentence for each absent one."""
    findings = set(findings)
    unknown = findings - set(FINDING_LABELS)
    if unknown:
        raise ValueError(f"unknown finding labels {sorted(unknown)}; expected a subset of {FINDING_LABELS}")
    sentences = [_pick(rng, "cardiomegaly" if "cardiomegaly" in findings else "heart_normal")]
    sentences.append(_pick(rng, "nodule" if "nodule" in findings else "lungs_clear"))
    left, right = "left_effusion" in findings, "right_effusion" in findings
    pneumothorax = "pneumothorax" in findings
    if not (left or right or pneumothorax) and rng.random() < MAIN_PHRASING_PROBABILITY:
        sentences.append(_pick(rng, "no_effusion_no_pneumothorax"))
    else:
        sentences.append(_pick(rng, _EFFUSION_SLOT[left, right]))
        sentences.append(_pick(rng, "pneumothorax" if pneumothorax else "no_pneumothorax"))
    return " ".join(sentences)


def sample_findings(rng: np.random.Generator) -> list[str]:
    """Independent draws with `FINDING_PROBABILITIES`; returned in `FINDING_LABELS` order."""
    return [label for label in FINDING_LABELS if rng.random() < FINDING_PROBABILITIES[label]]


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

# Gray levels (0-255) of the drawn tissues.
AIR, SOFT_TISSUE, LUNG, BONE, HEART, FLUID, NODULE = 12.0, 115.0, 55.0, 170.0, 178.0, 152.0, 215.0


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _lung_markings(rng: np.random.Generator, size: int, hila: list[tuple[float, float, float]]) -> np.ndarray:
    """Faint branching vessel lines radiating from each hilum (x, y, direction sign); values 0..1."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    width = max(1, size // 96)
    for hx, hy, sign in hila:
        for _ in range(9):
            angle = rng.uniform(-1.2, 1.2) + (math.pi if sign < 0 else 0.0)
            length = rng.uniform(0.12, 0.25)
            x1 = hx + sign * abs(math.cos(angle)) * length
            y1 = hy + math.sin(angle) * length
            draw.line([(hx * size, hy * size), (x1 * size, y1 * size)], fill=255, width=width)
    return np.asarray(layer, dtype=np.float32) / 255.0


def _finish(image: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-6.0, 6.0)
    image = image * gain + offset + rng.normal(0.0, 3.0, image.shape)
    pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="L")
    return pil.filter(ImageFilter.GaussianBlur(radius=max(0.5, size / 160)))


def draw_frontal(
    findings: Iterable[str],
    rng: np.random.Generator,
    size: int = 128,
    ribs: bool = True,
    nodule_height: float | None = None,
) -> Image.Image:
    """A PA chest radiograph (patient's right on the image left) showing `findings`; 8-bit grayscale.

    `nodule_height` (fraction of the image height) places the nodule; drawn at random when None.
    """
    findings = set(findings)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx = 0.5 + rng.uniform(-0.02, 0.02)
    s = rng.uniform(0.96, 1.04)
    image = np.full((size, size), AIR, dtype=np.float32)
    image[_ellipse(xx, yy, cx, 0.58, 0.46 * s, 0.56)] = SOFT_TISSUE

    right_lung = _ellipse(xx, yy, cx - 0.2 * s, 0.47, 0.14 * s, 0.31)  # patient's right = image left
    left_lung = _ellipse(xx, yy, cx + 0.2 * s, 0.47, 0.13 * s, 0.31)
    lungs = right_lung | left_lung
    image[lungs] = LUNG
    markings = _lung_markings(rng, size, [(cx - 0.07, 0.45, -1.0), (cx + 0.07, 0.45, 1.0)])
    image += lungs * markings * 22.0
    if ribs:
        for i in range(7):
            y0 = 0.2 + 0.08 * i
            curve = y0 + 0.06 * ((xx - cx) / 0.3) ** 2 * (1 + 0.1 * i)
            image += lungs * (np.abs(yy - curve) < 0.012) * 16.0

    # Mediastinum and spine (bright central band), trachea (dark line at the top).
    image[(np.abs(xx - cx) < 0.06) & (yy > 0.08) & (yy < 0.95)] = BONE
    image[(np.abs(xx - cx) < 0.013) & (yy > 0.06) & (yy < 0.36)] = 70.0

    if "pneumothorax" in findings:
        # Lateral band of the right lung with no lung markings (collapsed lung edge + visible pleural line).
        edge = cx - 0.2 * s - 0.02 + 0.05 * ((yy - 0.45) / 0.3) ** 2
        free_air = right_lung & (xx < edge)
        image[free_air] = 6.0
        image[right_lung & (np.abs(xx - edge) < 0.008) & (yy > 0.2) & (yy < 0.72)] = 150.0
        image[right_lung & (xx >= edge + 0.008)] += 12.0

    for label, lung, lung_cx, sign in (
        ("right_effusion", right_lung, cx - 0.2 * s, -1.0),
        ("left_effusion", left_lung, cx + 0.2 * s, 1.0),
    ):
        if label in findings:
            # Meniscus: the fluid level climbs towards the chest wall, blunting the costophrenic angle.
            level = 0.6 - 0.1 * np.clip(sign * (xx - lung_cx) / 0.14, -1, 1) - rng.uniform(0.0, 0.03)
            image[lung & (yy > level)] = FLUID

    # The heart is drawn over the fluid so that its border (and size) stays visible with a left effusion.
    cardiomegaly = "cardiomegaly" in findings
    heart_width = (0.24 if cardiomegaly else 0.14) * s
    heart_cx = cx + (0.07 if cardiomegaly else 0.04)
    image[_ellipse(xx, yy, heart_cx, 0.66, heart_width, 0.14)] = HEART

    if "nodule" in findings:
        lung_cx = cx + (-0.2 if rng.random() < 0.5 else 0.2) * s
        nx = lung_cx + rng.uniform(-0.05, 0.05)
        ny = nodule_height if nodule_height is not None else rng.uniform(0.3, 0.48)
        image = np.where(np.sqrt((xx - nx) ** 2 + (yy - ny) ** 2) < 0.035, NODULE, image)
    return _finish(image, rng, size)


def draw_lateral(
    findings: Iterable[str], rng: np.random.Generator, size: int = 128, nodule_height: float | None = None
) -> Image.Image:
    """A lateral radiograph (patient facing the image left) consistent with `findings`; 8-bit grayscale."""
    findings = set(findings)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.full((size, size), AIR, dtype=np.float32)
    image[_ellipse(xx, yy, 0.5, 0.58, 0.38, 0.56)] = SOFT_TISSUE
    lungs = _ellipse(xx, yy, 0.5, 0.47, 0.27, 0.31)
    image[lungs] = LUNG
    image += lungs * _lung_markings(rng, size, [(0.52, 0.45, -1.0), (0.52, 0.45, 1.0)]) * 18.0
    # Spine: posterior vertebral bodies with gaps between them.
    spine = (xx > 0.72) & (xx < 0.8) & (yy > 0.15) & (yy < 0.97) & (np.mod(yy * 14, 1.0) < 0.8)
    image[spine] = BONE

    if "pneumothorax" in findings:
        image[lungs & (xx < 0.42) & (yy < 0.42)] = 6.0
        image[lungs & (np.abs(xx - 0.42) < 0.008) & (yy < 0.42)] = 150.0
    cardiomegaly = "cardiomegaly" in findings
    image[_ellipse(xx, yy, 0.36, 0.66, 0.2 if cardiomegaly else 0.12, 0.16 if cardiomegaly else 0.13)] = HEART
    effusions = int("left_effusion" in findings) + int("right_effusion" in findings)
    if effusions:
        # Fluid fills the posterior costophrenic sulcus; bilateral effusions reach higher.
        level = (0.66 if effusions == 1 else 0.6) - 0.12 * (xx - 0.45) / 0.3
        image[lungs & (xx > 0.45) & (yy > level)] = FLUID
    if "nodule" in findings:
        ny = nodule_height if nodule_height is not None else rng.uniform(0.3, 0.48)
        nx = rng.uniform(0.45, 0.62)
        image = np.where(np.sqrt((xx - nx) ** 2 + (yy - ny) ** 2) < 0.035, NODULE, image)
    return _finish(image, rng, size)


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------


def _split_names(num_studies: int, splits: Sequence[float], rng: np.random.Generator) -> list[str]:
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {tuple(splits)}")
    fractions = np.asarray(splits, dtype=np.float64) / sum(splits)
    num_train = int(round(fractions[0] * num_studies))
    num_val = int(round(fractions[1] * num_studies))
    names = ["train"] * num_train + ["val"] * num_val + ["test"] * (num_studies - num_train - num_val)
    order = rng.permutation(num_studies)
    return [names[i] for i in order]


def generate_demo_dataset(
    output_dir: str | Path,
    num_studies: int = 400,
    num_views: int = 2,
    image_size: int = 128,
    seed: int = 0,
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    ribs: bool = True,
) -> Path:
    """Write the synthetic demo dataset and return the path of its `annotation.json`.

    Args:
        output_dir: folder to write; gets `annotation.json` and `images/<id>/<view>.png`.
        num_studies: number of studies (one patient each).
        num_views: 1 (frontal only) or 2 (frontal + lateral, as IU X-Ray).
        image_size: side of the square PNGs in pixels (>= 32).
        seed: everything (findings, phrasings, pixels, split) is a function of it.
        splits: train/val/test fractions.
        ribs: draw rib shadows over the lungs.
    """
    if num_views not in (1, 2):
        raise ValueError(f"num_views must be 1 or 2, got {num_views}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    output_dir = Path(output_dir)
    image_root = output_dir / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    split_of = _split_names(num_studies, splits, np.random.default_rng([seed, 0]))
    annotation: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    width = max(4, len(str(num_studies - 1)))
    for index in range(num_studies):
        # One generator per study: a study's content does not depend on how many studies come before it.
        rng = np.random.default_rng([seed, 1, index])
        study_id = f"demo_{index:0{width}d}"
        findings = sample_findings(rng)
        report = make_report(findings, rng)
        (image_root / study_id).mkdir(exist_ok=True)
        # The nodule sits at the same height in both views.
        nodule_height = float(rng.uniform(0.3, 0.48))
        views = [draw_frontal(findings, rng, image_size, ribs=ribs, nodule_height=nodule_height)]
        if num_views == 2:
            views.append(draw_lateral(findings, rng, image_size, nodule_height=nodule_height))
        image_paths = []
        for view_index, view in enumerate(views):
            relative = f"{study_id}/{view_index}.png"
            view.save(image_root / relative, format="PNG", optimize=False)
            image_paths.append(relative)
        split = split_of[index]
        annotation[split].append(
            {"id": study_id, "report": report, "image_path": image_paths, "split": split, "findings": findings}
        )
    path = output_dir / "annotation.json"
    path.write_text(json.dumps(annotation, indent=1))
    counts = {k: len(v) for k, v in annotation.items()}
    logger.info(f"Wrote {num_studies} synthetic studies to {output_dir} (splits {counts})")
    return path


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder to write (annotation.json + images/)")
    parser.add_argument("--num-studies", type=int, default=400)
    parser.add_argument("--num-views", type=int, default=2, choices=(1, 2))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--no-ribs", action="store_true", help="do not draw rib shadows")


def run(args: argparse.Namespace) -> int:
    path = generate_demo_dataset(
        args.output,
        num_studies=args.num_studies,
        num_views=args.num_views,
        image_size=args.image_size,
        seed=args.seed,
        splits=args.split,
        ribs=not args.no_ribs,
    )
    annotation = json.loads(path.read_text())
    counts = ", ".join(f"{split} {len(records)}" for split, records in annotation.items())
    print(f"Wrote {path} ({counts}); image root: {path.parent / 'images'}")
    return 0
