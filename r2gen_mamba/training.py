"""Training pieces of the R2Gen recipe on top of `transformers.Seq2SeqTrainer`.

Everything `train.py` needs that is worth reusing or testing on its own lives here:

- `PRESETS`: the paper recipe for IU X-Ray and MIMIC-CXR (`docs/architecture.md`, "Recipe") and a small `demo`.
- `optimizer_parameter_groups` / `build_optimizer`: Adam (amsgrad) with one learning rate for the visual extractor
  and one for the rest, weight decay that skips `A_log`, `D`, norm parameters and biases, and gradient clipping by
  *value* (R2Gen clips every gradient element to [-0.1, 0.1]; it does not clip the norm).
- `epoch_step_schedule`: R2Gen's per-epoch `StepLR` written as a per-optimizer-step `LambdaLR` whose value changes
  only at epoch boundaries, so the Trainer can step it every update and its state resumes exactly.
- `R2GenMambaTrainer`: a `Seq2SeqTrainer` that builds that optimizer and schedule, and evaluates with a collator
  without augmentation.
- `ReportMetrics`: the `compute_metrics` callable (decoded predictions vs decoded references, BLEU-1..4, METEOR,
  ROUGE-L, CIDEr from `r2gen_mamba.load_metric()`).
- `last_complete_checkpoint`, `plot_training_curves`, `write_predictions_csv`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Seq2SeqTrainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, logging

logger = logging.get_logger(__name__)

VISUAL_EXTRACTOR_PREFIX = "model.visual_extractor."
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingPreset:
    """One training recipe. Every field is a default that `train.py` lets the command line override.

    `model` holds `R2GenMambaConfig` keyword arguments (flat names allowed; `vision_config` as a dict of
    `ResNetConfig` fields); `vocab_size` and `num_views` are filled in from the data.
    """

    name: str
    dataset_name: str  # tokenizer cleaning variant: "iu_xray" or "mimic_cxr"
    num_views: int
    max_length: int  # R2Gen max_seq_length (encoding length, bos and eos included)
    threshold: int  # minimum count of a token in the train split to enter the vocabulary
    epochs: float
    batch_size: int
    lr_visual: float
    lr_rest: float
    weight_decay: float
    lr_step_size: int  # epochs between learning-rate drops
    lr_gamma: float
    clip_value: float
    num_beams: int
    seed: int
    early_stopping_patience: int  # in evaluations
    image_size: int = 224
    train_flip: bool = True  # random horizontal flip in the train transform (R2Gen's augmentation)
    train_crop: bool = True  # resize to 256/224 of the input size and random-crop (R2Gen's augmentation)
    eval_every_epochs: int = 1
    vision_model: str | None = None
    # Intra-op threads of a CPU-only run when OMP_NUM_THREADS is not set (None: PyTorch's default). Small models gain
    # little from several threads, and on a shared machine their spin-waiting slows a run down many times.
    cpu_threads: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    # Demo only: the synthetic set written into the output folder when no annotation is given.
    demo_num_studies: int = 0

    def override(self, **changes: Any) -> TrainingPreset:
        """A copy with the non-`None` values of `changes` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The published recipe (paper section 3.2 and the official scripts; see docs/architecture.md, "Recipe").
IU_XRAY = TrainingPreset(
    name="iu_xray",
    dataset_name="iu_xray",
    num_views=2,
    max_length=60,
    threshold=3,
    epochs=100,
    batch_size=16,
    lr_visual=5e-5,
    lr_rest=1e-4,
    weight_decay=5e-5,
    lr_step_size=50,
    lr_gamma=0.1,
    clip_value=0.1,
    num_beams=3,
    seed=9223,
    early_stopping_patience=50,
    vision_model="microsoft/resnet-101",
)

MIMIC_CXR = replace(
    IU_XRAY,
    name="mimic_cxr",
    dataset_name="mimic_cxr",
    num_views=1,
    max_length=100,
    threshold=10,
    epochs=30,
    lr_step_size=1,
    lr_gamma=0.8,
    seed=456789,
)

# Small enough to train from scratch on 2 CPU cores in minutes on the synthetic set (r2gen_mamba.synthetic, 400
# studies at 64 px): a 4-stage basic-block ResNet with few channels, d_model 128, a 2-layer residual Mamba encoder,
# 2 decoder layers. Tuned by measurement (see the README): without the random crop and with the 2-layer encoder the
# model learns the side of an effusion; with R2Gen's crop it names findings but not their side. Fields not set here
# (dataset_name, num_views, max_length, weight decay, lr_gamma, clip_value, seed, patience) are IU X-Ray's.
DEMO = replace(
    IU_XRAY,
    name="demo",
    threshold=1,
    epochs=15,
    batch_size=8,
    lr_visual=1e-3,
    lr_rest=1e-3,
    lr_step_size=12,
    num_beams=1,
    image_size=64,
    # The synthetic reports name the side of an effusion, which a horizontal flip would swap; the random crop shifts
    # the lungs by up to 1/7 of the image, which the patch tokens (no position embedding) cannot undo.
    train_flip=False,
    train_crop=False,
    eval_every_epochs=5,
    vision_model=None,
    cpu_threads=1,
    model=dict(
        vision_config=dict(
            num_channels=3,
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            hidden_act="relu",
            downsample_in_first_stage=False,
            downsample_in_bottleneck=False,
        ),
        d_model=128,
        num_heads=4,
        d_ff=256,
        decoder_layers=2,
        encoder_layers=2,
        rm_num_heads=4,
        d_state=16,
        patch_dropout=0.1,
        dropout=0.1,
    ),
    demo_num_studies=400,
)

PRESETS: dict[str, TrainingPreset] = {p.name: p for p in (DEMO, IU_XRAY, MIMIC_CXR)}


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------


def _is_norm_module(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    # R2Gen's own LayerNorm and the memory-driven conditional layer norm are custom classes named *Norm*.
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: Mamba's `A_log` and `D`, norm parameters, biases.

    A norm parameter is a parameter owned directly by a normalisation module (BatchNorm/LayerNorm/RMSNorm, R2Gen's
    LayerNorm, MCLN's `gamma`/`beta`); the Linear layers *inside* MCLN's conditioning MLPs are ordinary weights.
    """
    names = set()
    for module_name, module in model.named_modules():
        is_norm = _is_norm_module(module)
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name in ("A_log", "D", "bias"):
                names.add(full_name)
    return names


def optimizer_parameter_groups(
    model: nn.Module, lr_visual: float, lr_rest: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Four Adam parameter groups: {rest, visual extractor} x {decay, no decay}; empty groups are dropped.

    The visual extractor is every parameter under `model.visual_extractor.` (R2Gen's `ve_params`). Each group carries
    a `"name"` key so logs and tests can tell them apart. Frozen parameters are left out.
    """
    no_decay = no_decay_parameter_names(model)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {
        ("rest", True): [],
        ("rest", False): [],
        ("visual_extractor", True): [],
        ("visual_extractor", False): [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "visual_extractor" if name.startswith(VISUAL_EXTRACTOR_PREFIX) else "rest"
        buckets[(part, name not in no_decay)].append(param)
    groups = []
    for (part, decay), params in buckets.items():
        if params:
            groups.append(
                {
                    "name": f"{part}{'' if decay else '_no_decay'}",
                    "params": params,
                    "lr": lr_visual if part == "visual_extractor" else lr_rest,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
    return groups


def _clip_by_value_hook(clip_value: float) -> Callable:
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_value_(params, clip_value)

    return hook


def build_optimizer(
    model: nn.Module,
    lr_visual: float,
    lr_rest: float,
    weight_decay: float = 5e-5,
    clip_value: float | None = 0.1,
    amsgrad: bool = True,
) -> torch.optim.Adam:
    """R2Gen's optimizer: Adam (amsgrad) over `optimizer_parameter_groups`, clipping gradients by value.

    The clipping runs as an optimizer step pre-hook, i.e. on the final (accumulated, all-reduced and, under a fp16
    GradScaler, unscaled) gradients right before each update, which is where R2Gen calls `clip_grad_value_`.
    `clip_value=None` or `<= 0` disables it.
    """
    groups = optimizer_parameter_groups(model, lr_visual, lr_rest, weight_decay)
    optimizer = torch.optim.Adam(groups, amsgrad=amsgrad)
    if clip_value is not None and clip_value > 0:
        optimizer.register_step_pre_hook(_clip_by_value_hook(clip_value))
    return optimizer


def epoch_step_schedule(
    optimizer: torch.optim.Optimizer, steps_per_epoch: int, step_size: int, gamma: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """R2Gen's `StepLR(step_size, gamma)` stepped once per epoch, as a `LambdaLR` stepped once per optimizer update.

    Update `s` (0-based) belongs to epoch `s // steps_per_epoch` and uses `gamma ** (epoch // step_size)` times each
    group's base learning rate, so the value changes only at epoch boundaries. The factor depends on the step count
    alone (the closure is not part of the scheduler's saved state), so resuming from a checkpoint restores it exactly.
    """
    if steps_per_epoch < 1 or step_size < 1:
        raise ValueError(f"steps_per_epoch and step_size must be >= 1, got {steps_per_epoch} and {step_size}")

    def factor(step: int) -> float:
        return gamma ** ((step // steps_per_epoch) // step_size)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_generation(model: nn.Module, num_beams: int, max_length: int) -> None:
    """Set the decoding used for validation, test and by the saved model (`generation_config`).

    The model's default is R2Gen's beam search without length penalty (`length_penalty=0.0`); greedy decoding
    (`num_beams=1`) has no length penalty, so it is unset there (a `GenerationConfig` refuses the combination).
    `max_length` is R2Gen's `max_seq_length`: the official decoder emits up to that many tokens after the start token,
    and `GenerationConfig.max_length` counts the start token, hence `max_length + 1`.
    """
    model.generation_config.num_beams = num_beams
    model.generation_config.max_length = max_length + 1
    if num_beams == 1:
        model.generation_config.length_penalty = None


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


class R2GenMambaTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` with the R2Gen optimizer and per-epoch step schedule.

    Args:
        lr_visual / lr_rest: learning rates of the visual extractor and of everything else.
        lr_step_size / lr_gamma: per-epoch step decay (R2Gen's `StepLR`).
        clip_value: clip every gradient element to `[-clip_value, clip_value]` before each update. Set
            `max_grad_norm=0` in the training arguments so the Trainer does not also clip the norm.
        eval_data_collator: collator for evaluation and prediction (no augmentation); defaults to `data_collator`.
        Other arguments are those of `Seq2SeqTrainer`. `args.weight_decay` is the weight decay.
    """

    def __init__(
        self,
        *args: Any,
        lr_visual: float,
        lr_rest: float,
        lr_step_size: int,
        lr_gamma: float,
        clip_value: float | None = 0.1,
        eval_data_collator: Callable | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.lr_visual = lr_visual
        self.lr_rest = lr_rest
        self.lr_step_size = lr_step_size
        self.lr_gamma = lr_gamma
        self.clip_value = clip_value
        self.eval_data_collator = eval_data_collator
        self._num_update_steps_per_epoch: int | None = None
        if self.args.max_grad_norm and clip_value:
            logger.warning(
                f"Clipping by value ({clip_value}) and by norm (max_grad_norm={self.args.max_grad_norm}) are both on; "
                "R2Gen clips by value only (set max_grad_norm=0)."
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.model if model is None else model,
                lr_visual=self.lr_visual,
                lr_rest=self.lr_rest,
                weight_decay=self.args.weight_decay,
                clip_value=self.clip_value,
            )
        return self.optimizer

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self._num_update_steps_per_epoch = values[1]
        return values

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            steps_per_epoch = self._num_update_steps_per_epoch or num_training_steps
            self.lr_scheduler = epoch_step_schedule(
                self.optimizer if optimizer is None else optimizer,
                steps_per_epoch=max(steps_per_epoch, 1),
                step_size=self.lr_step_size,
                gamma=self.lr_gamma,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        # `Seq2SeqTrainer.evaluate/predict` gather with plain `gather`, which in multi-process runs keeps the samples
        # the distributed sampler repeats to even out the last batch: metrics would count them twice and the
        # predictions would not line up with the dataset. `gather_for_metrics` drops them.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    @contextlib.contextmanager
    def _eval_collator(self):
        train_collator = self.data_collator
        if self.eval_data_collator is not None:
            self.data_collator = self.eval_data_collator
        try:
            yield
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._eval_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._eval_collator():
            return super().get_test_dataloader(test_dataset)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------


def decode_reports(processor: Any, ids: np.ndarray | torch.Tensor | Sequence[Sequence[int]], pad_id: int = 0) -> list:
    """Token ids (generated, or labels padded with -100) -> report strings, cut at the first 0 after the start."""
    ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    ids = np.where(ids < 0, pad_id, ids)
    return processor.batch_decode(ids.tolist(), skip_special_tokens=True)


class ReportMetrics:
    """`compute_metrics` for the Trainer: BLEU-1..4, METEOR, ROUGE-L and CIDEr of generated vs reference reports.

    Both sides are decoded token ids (the reference is the cleaned report cut to the model's `max_length`), as in
    R2Gen's evaluation. The last decoded batch is kept in `last_predictions` / `last_references`.

    Args:
        processor: an `R2GenMambaProcessor` (anything with `batch_decode`).
        metric: an object with `compute(predictions=..., references=...) -> dict`; defaults to
            `r2gen_mamba.load_metric()`.
        findings: ground-truth finding labels of the evaluated split, in dataset order (the synthetic demo set's
            `findings` column); adds `finding_accuracy` (`r2gen_mamba.synthetic.finding_accuracy`). Set the attribute
            to the split about to be evaluated.
    """

    def __init__(self, processor: Any, metric: Any | None = None, findings: Sequence[Sequence[str]] | None = None):
        if metric is None:
            from .metrics import load_metric

            metric = load_metric()
        self.processor = processor
        self.metric = metric
        self.findings = findings
        self.last_predictions: list[str] = []
        self.last_references: list[str] = []

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        self.last_predictions = decode_reports(self.processor, predictions)
        self.last_references = decode_reports(self.processor, eval_pred.label_ids)
        scores = self.metric.compute(predictions=self.last_predictions, references=self.last_references)
        scores = {name: float(value) for name, value in scores.items()}
        if self.findings is not None:
            from .synthetic import finding_accuracy

            scores["finding_accuracy"] = finding_accuracy(self.last_predictions, self.findings)
        return scores


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and outputs
# ---------------------------------------------------------------------------------------------------------------------


def _checkpoint_is_complete(path: str, step: int) -> bool:
    # Trainer writes the weights, optimizer, scheduler and RNG state first and `trainer_state.json` last, so a
    # readable state file recording this step marks a checkpoint whose saving finished.
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    try:
        with open(state_file, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return False
    if state.get("global_step") != step:
        return False
    return any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-<step>` folder in `output_dir`, newest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str, remove_incomplete: bool = False) -> str | None:
    """The newest checkpoint in `output_dir` whose saving finished (see `_checkpoint_is_complete`), or `None`.

    A run killed while saving leaves a folder without (or with a truncated) `trainer_state.json`; such folders newer
    than the one returned are skipped with a warning, and deleted when `remove_incomplete` (they would otherwise be
    written over file by file when training reaches that step again, keeping stale files).
    """
    for step, path in list_checkpoints(output_dir):
        if _checkpoint_is_complete(path, step):
            return path
        logger.warning(f"Skipping incomplete checkpoint {path} (no readable {TRAINER_STATE_NAME} or weights).")
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def plot_training_curves(log_history: Iterable[dict[str, Any]], path: str, metric: str = "eval_bleu_4") -> str:
    """Write a PNG with the training loss (and eval loss) per step and `metric` per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = list(log_history)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    scores = [(h["step"], h[metric]) for h in history if metric in h]

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals), marker="o", label="validation loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title("Loss")
    if scores:
        ax_metric.plot(*zip(*scores), marker="o", color="tab:green")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(metric)
    ax_metric.set_title(f"Validation {metric.removeprefix('eval_')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_predictions_csv(path: str, ids: Sequence[str], references: Sequence[str], generated: Sequence[str]) -> str:
    """Write `id,reference,generated` rows (one per study)."""
    if not len(ids) == len(references) == len(generated):
        raise ValueError(
            f"ids ({len(ids)}), references ({len(references)}) and generated ({len(generated)}) differ in length"
        )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "reference", "generated"])
        writer.writerows(zip(ids, references, generated))
    return path


def num_update_steps_per_epoch(num_examples: int, batch_size: int, world_size: int = 1, accumulation: int = 1) -> int:
    """Optimizer updates per epoch, as the Trainer counts them (last partial batch kept)."""
    batches = math.ceil(math.ceil(num_examples / world_size) / batch_size)
    return max(math.ceil(batches / accumulation), 1)


__all__ = [
    "PRESETS",
    "TrainingPreset",
    "R2GenMambaTrainer",
    "ReportMetrics",
    "build_optimizer",
    "configure_generation",
    "decode_reports",
    "epoch_step_schedule",
    "last_complete_checkpoint",
    "list_checkpoints",
    "no_decay_parameter_names",
    "num_update_steps_per_epoch",
    "optimizer_parameter_groups",
    "plot_training_curves",
    "write_predictions_csv",
]
