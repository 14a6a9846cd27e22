"""CheXbert labeler on a tiny random BERT saved in the official `chexbert.pth` format, and the CE metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from transformers import BertConfig, BertModel

from r2gen_mamba.chexbert import (
    COMMON_FIVE,
    CONDITIONS,
    CheXbertLabeler,
    binarize_labels,
    compute_ce_metrics,
    infer_bert_config,
)

TINY_VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] . , - the heart is normal size no pleural effusion pneumothorax lungs are clear "
    "mild cardiomegaly edema atelectasis consolidation possible small left right basilar opacity stable tube in place "
    "of and there focal fracture may represent pneumonia enlarged lesion devices unchanged moderate bilateral"
).split()

REPORTS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small bilateral pleural effusions. Mild edema.",
    "Left basilar opacity may represent atelectasis or pneumonia.",
    "",
    "Stable cardiomegaly.\nTube in place. No focal consolidation.",
    "Possible small right pneumothorax. Fracture of the left rib.",
    "no  acute   cardiopulmonary process",
    "Moderate bilateral pleural effusions and edema, unchanged.",
    "Enlarged heart. Lung lesion in the right. Support devices in place.",
    "The lungs are clear. Heart size is normal.",
]


def write_tiny_chexbert(
    directory: str,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    """Write `chexbert.pth` (official layout: `{"model_state_dict": {"module.bert.…", "module.linear_heads.…"}}`)
    for a random BERT built with plain transformers + nn.Linear heads, plus a `vocab.txt`, into `directory`."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    bert = BertModel(config)
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i in range(14):
        head = torch.nn.Linear(hidden, 4 if i < 13 else 2)
        # Large random heads so the tiny random encoder's small differences between reports change the argmax.
        state[f"module.linear_heads.{i}.weight"] = torch.randn(head.weight.shape) * 3.0
        state[f"module.linear_heads.{i}.bias"] = torch.zeros(head.bias.shape)
    state.update(extra or {})
    for key in drop:
        del state[key]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "chexbert.pth")
    torch.save({"epoch": 1, "model_state_dict": state}, path)
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(TINY_VOCAB) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    return write_tiny_chexbert(str(tmp_path_factory.mktemp("chexbert")))


@pytest.fixture(scope="module")
def labeler(tiny_checkpoint) -> CheXbertLabeler:
    return CheXbertLabeler.from_pretrained(tiny_checkpoint, num_attention_heads=2, device="cpu", batch_size=4)


def test_loads_every_weight_strictly(tiny_checkpoint, labeler):
    saved = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    loaded = labeler.model.state_dict()
    assert set(loaded) == {k.removeprefix("module.") for k in saved}
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key.removeprefix("module.")], value, rtol=0, atol=0)
    assert labeler.model.bert.config.num_attention_heads == 2


def test_config_inferred_from_shapes(tiny_checkpoint):
    state = {k.removeprefix("module."): v for k, v in torch.load(tiny_checkpoint)["model_state_dict"].items()}
    config = infer_bert_config(state)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 2, len(TINY_VOCAB))
    assert (config.max_position_embeddings, config.intermediate_size, config.type_vocab_size) == (512, 64, 2)
    assert config.num_attention_heads == 1  # hidden // 64, floored at 1: the head count is not in the shapes
    assert infer_bert_config(state, num_attention_heads=4).num_attention_heads == 4


def test_bert_config_directory_gives_same_labels(tiny_checkpoint, labeler, tmp_path):
    config = infer_bert_config(
        {k.removeprefix("module."): v for k, v in torch.load(tiny_checkpoint)["model_state_dict"].items()},
        num_attention_heads=2,
    )
    config.save_pretrained(tmp_path)
    other = CheXbertLabeler.from_pretrained(tiny_checkpoint, bert_config=str(tmp_path), device="cpu")
    np.testing.assert_array_equal(other(REPORTS, show_progress=False), labeler(REPORTS, show_progress=False))


def test_labels_shape_codes_and_batch_invariance(labeler):
    labels = labeler(REPORTS, show_progress=False)
    assert labels.shape == (len(REPORTS), 14)
    codes = set(np.unique(np.nan_to_num(labels[:, :13], nan=9)).tolist())
    assert codes <= {1.0, 0.0, -1.0, 9.0}
    assert set(np.unique(np.nan_to_num(labels[:, 13], nan=9)).tolist()) <= {1.0, 9.0}
    assert len(np.unique(np.nan_to_num(labels, nan=9))) >= 3, "test heads should produce varied labels"
    # Padding and length sorting must not change any label: one report per batch gives the same result.
    single = CheXbertLabeler(labeler.model, labeler.tokenizer, batch_size=1)
    np.testing.assert_array_equal(single(REPORTS, show_progress=False), labels)


def test_labels_match_direct_forward_of_each_report(labeler):
    labels = labeler(REPORTS[:3], show_progress=False)
    for row, report in enumerate(REPORTS[:3]):
        ids = torch.tensor([labeler.encode([report])[0]])
        logits = labeler.model(ids, torch.ones_like(ids))
        classes = [int(head.argmax()) for head in logits]
        mapping = {0: np.nan, 1: 1.0, 2: 0.0, 3: -1.0}
        np.testing.assert_array_equal(labels[row], [mapping[c] for c in classes])


def test_encoding_empty_whitespace_and_truncation(labeler):
    tok = labeler.tokenizer
    assert labeler.encode([""])[0] == [tok.cls_token_id, tok.sep_token_id]
    assert labeler.encode(["the\n heart   is"])[0] == labeler.encode(["the heart is"])[0]
    long_ids = labeler.encode(["the heart is normal " * 300])[0]
    assert len(long_ids) == 512 and long_ids[-1] == tok.sep_token_id


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = write_tiny_chexbert(str(tmp_path / "missing"), drop=("module.linear_heads.13.bias",))
    with pytest.raises(ValueError, match=r"missing keys \['linear_heads.13.bias'\]"):
        CheXbertLabeler.from_pretrained(path, num_attention_heads=2)
    path = write_tiny_chexbert(str(tmp_path / "extra"), extra={"module.classifier.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected keys \['classifier.weight'\]"):
        CheXbertLabeler.from_pretrained(path, num_attention_heads=2)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="model_state_dict"):
        CheXbertLabeler.from_pretrained(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheXbertLabeler.from_pretrained(str(tmp_path / "nowhere" / "chexbert.pth"))


def test_old_position_ids_buffer_is_accepted(tmp_path):
    extra = {"module.bert.embeddings.position_ids": torch.arange(512).unsqueeze(0)}
    path = write_tiny_chexbert(str(tmp_path), extra=extra)
    CheXbertLabeler.from_pretrained(path, num_attention_heads=2)


def test_hub_download_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local path"):
        # A repo nobody has cached, so the answer cannot come from a local Hub cache either.
        CheXbertLabeler.from_pretrained(None, repo_id="r2gen-mamba-tests/no-such-chexbert")


def test_binarize_conventions():
    codes = np.array([[1.0, 0.0, -1.0, np.nan]])
    np.testing.assert_array_equal(binarize_labels(codes, "negative"), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(binarize_labels(codes, "positive"), [[1, 0, 1, 0]])
    with pytest.raises(ValueError, match="uncertain"):
        binarize_labels(codes, "blank")


SKLEARN_AVERAGE = {"macro": "macro", "micro": "micro", "example": "samples"}


@pytest.mark.parametrize("uncertain", ["negative", "positive"])
@pytest.mark.parametrize("average", ["macro", "micro", "example"])
@pytest.mark.parametrize("observations", ["all", "common5"])
def test_ce_metrics_equal_sklearn_on_produced_labels(labeler, uncertain, average, observations):
    # Reference = the labels of REPORTS, generated = labels of the same reports in another order: a realistic mix.
    reference = labeler(REPORTS, show_progress=False)
    generated = labeler(REPORTS[3:] + REPORTS[:3], show_progress=False)
    result = compute_ce_metrics(reference, generated, uncertain=uncertain, average=average, observations=observations)

    names = list(CONDITIONS) if observations == "all" else list(COMMON_FIVE)
    cols = [CONDITIONS.index(n) for n in names]

    def to01(labels):  # written out independently of binarize_labels
        positive = labels[:, cols] == 1
        if uncertain == "positive":
            positive |= labels[:, cols] == -1
        return positive.astype(int)

    y_true, y_pred = to01(reference), to01(generated)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=SKLEARN_AVERAGE[average], zero_division=0)
    assert result["ce_precision"] == pytest.approx(p, abs=1e-12)
    assert result["ce_recall"] == pytest.approx(r, abs=1e-12)
    assert result["ce_f1"] == pytest.approx(f, abs=1e-12)
    per_p, per_r, per_f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    assert list(result["per_observation"]) == names
    for j, name in enumerate(names):
        row = result["per_observation"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((per_p[j], per_r[j], per_f[j]))
        assert row["reference_positives"] == support[j]
    assert result["conventions"]["uncertain"] == uncertain and result["conventions"]["average"] == average


@pytest.mark.parametrize("average", ["macro", "micro", "example"])
def test_ce_metrics_equal_sklearn_on_random_codes(average):
    rng = np.random.default_rng(0)
    codes = np.array([1.0, 0.0, -1.0, np.nan])
    reference = codes[rng.integers(0, 4, size=(200, 14))]
    generated = codes[rng.integers(0, 4, size=(200, 14))]
    result = compute_ce_metrics(reference, generated, uncertain="positive", average=average)
    y_true = np.isin(reference, [1.0, -1.0]).astype(int)
    y_pred = np.isin(generated, [1.0, -1.0]).astype(int)
    expected = precision_recall_fscore_support(y_true, y_pred, average=SKLEARN_AVERAGE[average], zero_division=0)
    assert (result["ce_precision"], result["ce_recall"], result["ce_f1"]) == pytest.approx(expected[:3], abs=1e-12)


def test_ce_metrics_reject_bad_shapes_and_options():
    labels = np.zeros((3, 14))
    with pytest.raises(ValueError, match="shape"):
        compute_ce_metrics(labels, np.zeros((3, 13)))
    with pytest.raises(ValueError, match="average"):
        compute_ce_metrics(labels, labels, average="weighted")
    with pytest.raises(ValueError, match="unknown observations"):
        compute_ce_metrics(labels, labels, observations=["Heart Attack"])
