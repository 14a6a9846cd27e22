"""CheXbert labeler (Smit et al., 2020) on `transformers` and clinical-efficacy (CE) metrics.

CheXbert reads a radiology report and gives each of 14 CheXpert observations one label. The network is a BERT
encoder whose [CLS] vector feeds 13 four-class linear heads (blank / positive / negative / uncertain) and one
two-class head for "No Finding" (blank / positive). The public checkpoint `chexbert.pth` is a `torch.save` dict whose
`model_state_dict` comes from a `DataParallel` model (keys prefixed `module.`): `module.bert.*` (a `BertModel` with
pooler) and `module.linear_heads.{0..13}.{weight,bias}`.

Labels use CheXpert codes: 1 positive, 0 negative, -1 uncertain, NaN blank (not mentioned).

CE metrics compare labels of generated reports with labels of the reference reports. Conventions are parameters
because published numbers differ by them:

- `uncertain="negative"` (R2Gen family default: uncertain and blank both count as 0) or `"positive"` (CheXbert /
  RRG convention: uncertain counts as 1). Blank is always negative.
- `average="macro"` (mean over observations of per-observation P/R/F1; R2GenCMN's papers), `"micro"` (pooled counts),
  or `"example"` (per report, then averaged over reports; sklearn's `average="samples"`). A ratio with a zero
  denominator is 0 (sklearn's `zero_division=0`, its default behaviour).
- `observations="all"` (the 14) or `"common5"` (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer
from transformers.utils import logging

from .metrics.nlg import normalize_report

logger = logging.get_logger(__name__)

# Order of CheXbert's 14 linear heads (stanfordmlgroup/CheXbert, src/constants.py); "No Finding" is the 2-class head.
CONDITIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
COMMON_FIVE: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# Public copy of the CheXbert weights used by the RRG scorers (f1chexbert); CheXbert's BERT is bert-base-uncased.
DEFAULT_CHEXBERT_REPO = "StanfordAIMI/RRG_scorers"
DEFAULT_CHEXBERT_FILENAME = "chexbert.pth"
DEFAULT_BERT = "bert-base-uncased"
MAX_LENGTH = 512  # CheXbert cuts reports to 512 word pieces: the first 511 plus [SEP]

# Head output class -> CheXpert code. Four-class heads: 0 blank, 1 positive, 2 negative, 3 uncertain.
_FOUR_CLASS_CODES = np.array([np.nan, 1.0, 0.0, -1.0])
_TWO_CLASS_CODES = np.array([np.nan, 1.0])
# Buffers, not weights: older transformers saved them in state dicts, current ones rebuild them. Either way is fine.
_TOLERATED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


class CheXbertModel(nn.Module):
    """BERT + 13 four-class heads + 1 two-class head on the [CLS] vector (parameter names as in `chexbert.pth`)."""

    def __init__(self, config: BertConfig, head_dropout: float = 0.1):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=True)  # the pooler is unused but stored in the checkpoint
        self.dropout = nn.Dropout(head_dropout)
        heads = [nn.Linear(config.hidden_size, 4) for _ in range(len(CONDITIONS) - 1)]
        heads.append(nn.Linear(config.hidden_size, 2))
        self.linear_heads = nn.ModuleList(heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            input_ids: [batch, seq_len] word-piece ids starting with [CLS].
            attention_mask: [batch, seq_len], 1 on tokens, 0 on padding.

        Returns:
            14 logit tensors: 13 of shape [batch, 4], then [batch, 2] ("No Finding").
        """
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [batch, seq, dim]
        cls = self.dropout(hidden[:, 0])  # [batch, hidden]
        return [head(cls) for head in self.linear_heads]


def load_chexbert_state_dict(path: str, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Read `chexbert.pth` and return its `model_state_dict` with the `module.` prefix removed."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        hint = " If you trust this file, load it with weights_only=False." if weights_only else ""
        raise ValueError(f"could not read CheXbert checkpoint {path}: {error}.{hint}") from error
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a CheXbert checkpoint: expected a dict with 'model_state_dict', got {found}")
    state_dict = checkpoint["model_state_dict"]
    # Saved from DataParallel, so every key starts with "module."; a checkpoint saved without it is accepted as is.
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def infer_bert_config(state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None) -> BertConfig:
    """BERT size read from the checkpoint's weight shapes (hidden, layers, vocabulary, positions, intermediate).

    The number of attention heads leaves no trace in the shapes: by default it is hidden_size // 64 (BERT's head size,
    12 for bert-base); pass `num_attention_heads` for other models. Everything else keeps `BertConfig` defaults
    (GELU, layer-norm eps 1e-12), which are bert-base-uncased's.
    """
    try:
        vocab_size, hidden_size = state_dict["bert.embeddings.word_embeddings.weight"].shape
        max_positions = state_dict["bert.embeddings.position_embeddings.weight"].shape[0]
        type_vocab_size = state_dict["bert.embeddings.token_type_embeddings.weight"].shape[0]
        intermediate_size = state_dict["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as error:
        raise ValueError(f"cannot infer the BERT size: the checkpoint has no {error.args[0]!r}") from error
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", key))}
    if num_attention_heads is None:
        num_attention_heads = max(1, hidden_size // 64)
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden size {hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        type_vocab_size=type_vocab_size,
    )


def load_strict(model: CheXbertModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every weight or fail, naming the missing and unexpected keys (only known buffers may differ)."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        raise ValueError(f"CheXbert checkpoint {source} does not fit the model: {error}") from error
    missing = [k for k in result.missing_keys if k not in _TOLERATED_KEYS]
    unexpected = [k for k in result.unexpected_keys if k not in _TOLERATED_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"CheXbert checkpoint {source} does not match the model: missing keys {missing}, unexpected keys "
            f"{unexpected}"
        )


def _resolve_checkpoint(checkpoint: str | None, repo_id: str, filename: str) -> str:
    if checkpoint is not None and os.path.isfile(checkpoint):
        return checkpoint
    # Anything that is not an existing file must look like a Hub repo id ("owner/name"), else it is a missing file.
    if checkpoint is not None and (
        re.fullmatch(r"[\w.-]+/[\w.-]+", checkpoint) is None or checkpoint.endswith((".pth", ".pt", ".bin"))
    ):
        raise FileNotFoundError(f"CheXbert checkpoint {checkpoint} does not exist")
    from huggingface_hub import hf_hub_download

    repo = checkpoint or repo_id
    try:
        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception as error:  # offline mode, no network, unknown repo: all mean "pass a local file"
        raise FileNotFoundError(
            f"could not get {filename} from the Hub repo {repo} ({error}); download chexbert.pth once and pass its "
            "local path"
        ) from error


class CheXbertLabeler:
    """Labels reports with CheXbert: `labeler(reports)` -> [num_reports, 14] array of CheXpert codes."""

    def __init__(
        self, model: CheXbertModel, tokenizer: BertTokenizer, device: str | torch.device = "cpu", batch_size: int = 18
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        vocab = model.bert.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the CheXbert embedding has {vocab} rows")

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | None = None,
        bert_tokenizer: str | None = None,
        bert_config: str | None = None,
        num_attention_heads: int | None = None,
        repo_id: str = DEFAULT_CHEXBERT_REPO,
        filename: str = DEFAULT_CHEXBERT_FILENAME,
        device: str | torch.device | None = None,
        batch_size: int = 18,
        weights_only: bool = True,
    ) -> CheXbertLabeler:
        """Build the labeler from `chexbert.pth`.

        Args:
            checkpoint: local path of `chexbert.pth`, or a Hub repo id holding `filename`; None downloads
                `filename` from `repo_id` (default `StanfordAIMI/RRG_scorers`, needs network once).
            bert_tokenizer: directory with `vocab.txt` (or a Hub id). Default: the checkpoint's directory when it
                holds a `vocab.txt`, else `bert-base-uncased` (from the Hub cache).
            bert_config: directory with a BERT `config.json` (or a Hub id). Default: size inferred from the
                checkpoint's weight shapes (see `infer_bert_config`).
            num_attention_heads: only with an inferred config: the head count (default hidden // 64).
            device: default CUDA when available, else CPU.
            batch_size: reports per forward pass.
            weights_only: `torch.load` safety; set False only for a checkpoint you trust that needs it.
        """
        path = _resolve_checkpoint(checkpoint, repo_id, filename)
        state_dict = load_chexbert_state_dict(path, weights_only=weights_only)
        if bert_config is not None:
            config = BertConfig.from_pretrained(bert_config)
        else:
            config = infer_bert_config(state_dict, num_attention_heads)
        model = CheXbertModel(config)
        load_strict(model, state_dict, path)
        if bert_tokenizer is None:
            local_dir = os.path.dirname(os.path.abspath(path))
            bert_tokenizer = local_dir if os.path.isfile(os.path.join(local_dir, "vocab.txt")) else DEFAULT_BERT
        if os.path.isfile(bert_tokenizer):  # a path to vocab.txt itself
            bert_tokenizer = os.path.dirname(os.path.abspath(bert_tokenizer))
        # bert-base-uncased lower-cases; from_pretrained reads that from tokenizer_config.json when present.
        tokenizer = BertTokenizer.from_pretrained(bert_tokenizer)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info(f"CheXbert loaded from {path}: {config.num_hidden_layers} layers, hidden {config.hidden_size}")
        return cls(model, tokenizer, device=device, batch_size=batch_size)

    def encode(self, reports: Sequence[str]) -> list[list[int]]:
        """Word-piece ids as CheXbert makes them: whitespace collapsed, [CLS] ... [SEP], at most 512 ids."""
        texts = [normalize_report(str(report)) for report in reports]
        return self.tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]

    @torch.no_grad()
    def __call__(self, reports: Sequence[str], show_progress: bool = True) -> np.ndarray:
        """Label each report with CheXbert, in batches of `batch_size` reports of similar length.

        Args:
            reports: report texts; an empty report is labelled from [CLS][SEP] alone, as CheXbert does.

        Returns:
            float array [len(reports), 14] of CheXpert codes (1, 0, -1, NaN = blank), columns in `CONDITIONS` order.
        """
        from tqdm.auto import tqdm

        encoded = self.encode(reports)
        # Sorting by length keeps padding small; the labels are put back in input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        classes = np.zeros((len(encoded), len(CONDITIONS)), dtype=np.int64)
        pad_id = self.tokenizer.pad_token_id or 0
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="CheXbert labelling", unit="batch", disable=not show_progress):
            index = order[start : start + self.batch_size]
            longest = max(len(encoded[i]) for i in index)
            input_ids = torch.full((len(index), longest), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(index), longest), dtype=torch.long)
            for row, i in enumerate(index):
                input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                attention_mask[row, : len(encoded[i])] = 1
            logits = self.model(input_ids.to(self.device), attention_mask.to(self.device))
            classes[index] = torch.stack([head.argmax(dim=-1) for head in logits], dim=1).cpu().numpy()
        labels = _FOUR_CLASS_CODES[classes]
        labels[:, -1] = _TWO_CLASS_CODES[classes[:, -1]]
        return labels


def binarize_labels(labels: np.ndarray, uncertain: str = "negative") -> np.ndarray:
    """CheXpert codes -> 0/1: positive 1, negative and blank 0, uncertain per `uncertain` ("negative"/"positive")."""
    if uncertain not in ("negative", "positive"):
        raise ValueError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
    labels = np.asarray(labels, dtype=float)
    positive = labels == 1
    if uncertain == "positive":
        positive |= labels == -1
    return positive.astype(np.int64)


def _observation_columns(observations: str | Sequence[str]) -> list[str]:
    if observations == "all":
        return list(CONDITIONS)
    if observations == "common5":
        return list(COMMON_FIVE)
    if isinstance(observations, str):
        raise ValueError(f"observations must be 'all', 'common5' or a list of names, got {observations!r}")
    unknown = [name for name in observations if name not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown observations {unknown}; known: {list(CONDITIONS)}")
    return list(observations)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # sklearn's zero_division=0: a ratio with nothing to count is 0.
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.asarray(denominator, dtype=float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _prf(y_true: np.ndarray, y_pred: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of 0/1 arrays, counting along `axis` (0: per observation, 1: per report, None: all)."""
    tp = (y_true & y_pred).sum(axis=axis)
    fp = ((1 - y_true) & y_pred).sum(axis=axis)
    fn = (y_true & (1 - y_pred)).sum(axis=axis)
    return _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn)


def compute_ce_metrics(
    reference_labels: np.ndarray,
    generated_labels: np.ndarray,
    uncertain: str = "negative",
    average: str = "macro",
    observations: str | Sequence[str] = "all",
) -> dict:
    """Clinical-efficacy precision / recall / F1 of generated-report labels against reference-report labels.

    Args:
        reference_labels: [num_reports, 14] CheXpert codes of the reference reports (`CONDITIONS` order).
        generated_labels: [num_reports, 14] CheXpert codes of the generated reports.
        uncertain: "negative" (R2Gen family) or "positive" (CheXbert/RRG); blank is always negative.
        average: "macro", "micro" or "example" (per report, sklearn's "samples").
        observations: "all" (14), "common5", or a list of observation names.

    Returns:
        `ce_precision`, `ce_recall`, `ce_f1`, `per_observation` (name -> precision, recall, f1, reference and
        generated positive counts) and `conventions`.
    """
    if average not in ("macro", "micro", "example"):
        raise ValueError(f"average must be 'macro', 'micro' or 'example', got {average!r}")
    reference_labels = np.asarray(reference_labels, dtype=float)
    generated_labels = np.asarray(generated_labels, dtype=float)
    expected = (reference_labels.shape[0], len(CONDITIONS))
    if reference_labels.shape != expected or generated_labels.shape != expected:
        raise ValueError(
            f"labels must both have shape [num_reports, {len(CONDITIONS)}], got {reference_labels.shape} (reference) "
            f"and {generated_labels.shape} (generated)"
        )
    names = _observation_columns(observations)
    columns = [CONDITIONS.index(name) for name in names]
    y_true = binarize_labels(reference_labels[:, columns], uncertain)  # [num_reports, num_observations]
    y_pred = binarize_labels(generated_labels[:, columns], uncertain)

    per_p, per_r, per_f = _prf(y_true, y_pred, axis=0)
    if average == "macro":
        precision, recall, f1 = per_p.mean(), per_r.mean(), per_f.mean()
    elif average == "micro":
        precision, recall, f1 = _prf(y_true, y_pred, axis=None)
    else:
        p_r, r_r, f_r = _prf(y_true, y_pred, axis=1)
        precision, recall, f1 = p_r.mean(), r_r.mean(), f_r.mean()

    per_observation = {
        name: {
            "precision": float(per_p[j]),
            "recall": float(per_r[j]),
            "f1": float(per_f[j]),
            "reference_positives": int(y_true[:, j].sum()),
            "generated_positives": int(y_pred[:, j].sum()),
        }
        for j, name in enumerate(names)
    }
    return {
        "ce_precision": float(precision),
        "ce_recall": float(recall),
        "ce_f1": float(f1),
        "per_observation": per_observation,
        "conventions": {
            "uncertain": uncertain,
            "blank": "negative",
            "average": average,
            "observations": names,
            "zero_division": 0,
        },
    }
