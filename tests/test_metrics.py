"""NLG metrics: exact parity with direct pycocoevalcap calls, whitespace/empty handling, METEOR process hygiene,
missing Java, and the offline `evaluate` module."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from r2gen_mamba.metrics import NLG_KEYS, compute_nlg_metrics, normalize_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTENCES = [
    "the heart is normal in size .",
    "the heart size is at the upper limits of normal .",
    "mild cardiomegaly is stable .",
    "the mediastinum is unremarkable .",
    "the cardiomediastinal silhouette is within normal limits .",
    "the lungs are clear .",
    "the lungs are hyperexpanded .",
    "there is no pneumothorax or pleural effusion .",
    "no focal consolidation .",
    "there is a small left pleural effusion .",
    "bibasilar atelectasis is noted .",
    "there is mild pulmonary vascular congestion .",
    "no acute bony abnormality .",
    "degenerative changes of the thoracic spine .",
    "calcified granuloma in the right upper lobe .",
    "no acute cardiopulmonary abnormality .",
    "the endotracheal tube terminates 4 cm above the carina .",
    "right basilar opacity may represent atelectasis or pneumonia .",
    "interval improvement of the left lower lobe opacity .",
    "healed right rib fractures .",
]


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Made-up report pairs: the hypothesis shares some sentences with the reference, in another order."""
    rng = random.Random(seed)
    predictions, references = [], []
    for _ in range(n):
        reference = rng.sample(SENTENCES, rng.randint(3, 6))
        hypothesis = rng.sample(reference, rng.randint(1, len(reference))) + rng.sample(SENTENCES, rng.randint(0, 2))
        predictions.append(" ".join(hypothesis))
        references.append(" ".join(reference))
    predictions[5] = ""  # an empty generation is a real case (a model that emits eos first)
    return predictions, references


PREDICTIONS, REFERENCES = make_pairs(36)


def direct_pycocoevalcap(predictions, references) -> dict:
    """What R2Gen's compute_scores does, plus Cider: pycocoevalcap called directly on {i: [text]} dictionaries."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: refs if isinstance(refs, list) else [refs] for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
    scores["meteor"] = Meteor().compute_score(gts, res)[0]
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


@pytest.fixture(scope="module")
def direct_scores() -> dict:
    return direct_pycocoevalcap(PREDICTIONS, REFERENCES)


def run_python(code: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root; a hang (e.g. at exit) fails on the timeout."""
    full_env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_parity_with_direct_pycocoevalcap(direct_scores):
    assert len(PREDICTIONS) == 36 and all(p == normalize_report(p) for p in PREDICTIONS)
    ours = compute_nlg_metrics(PREDICTIONS, REFERENCES)
    assert set(ours) == set(NLG_KEYS)
    for key in NLG_KEYS:
        assert ours[key] == direct_scores[key], key  # identical, not approximately equal
    assert 0 < ours["bleu_4"] < ours["bleu_1"] < 1 and 0 < ours["meteor"] < 1 and ours["cider"] > 0


def test_multiple_references_match_direct_calls():
    references = [[ref, other] for ref, other in zip(REFERENCES, REFERENCES[1:] + REFERENCES[:1])]
    ours = compute_nlg_metrics(PREDICTIONS, references, meteor=False)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = dict(enumerate(references))
    res = {i: [p] for i, p in enumerate(PREDICTIONS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"bleu_{n}"] for n in range(1, 5)] == bleu
    assert ours["rouge_l"] == Rouge().compute_score(gts, res)[0]
    assert ours["cider"] == Cider().compute_score(gts, res)[0]
    assert ours["meteor"] is None and "meteor_unavailable" not in ours
    # A second reference can only help BLEU's clipped counts: scores must differ from the single-reference ones.
    assert ours["bleu_1"] != compute_nlg_metrics(PREDICTIONS, REFERENCES, meteor=False)["bleu_1"]


def test_newlines_tabs_and_repeated_spaces_in_subprocess(direct_scores):
    """Messy whitespace is normalised: same scores as the clean strings, and the interpreter exits (no METEOR hang)."""
    code = f"""
        import json
        from r2gen_mamba.metrics import compute_nlg_metrics
        preds = {PREDICTIONS!r}
        refs = {REFERENCES!r}
        preds = [p.replace(" . ", " .\\n", 1).replace(" ", "  ", 2) for p in preds]
        refs = [" \\t" + r.replace(" . ", " .\\r\\n\\n", 2) + "\\n" for r in refs]
        assert any("\\n" in r for r in refs) and any("\\n" in p for p in preds)
        print(json.dumps(compute_nlg_metrics(preds, refs)))
    """
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    for key in NLG_KEYS:
        assert ours[key] == direct_scores[key], key


def test_empty_hypothesis_scores_like_pycocoevalcap():
    # Documented pycocoevalcap behaviour: BLEU/CIDEr give an empty hypothesis nothing; ROUGE-L splits "" into one
    # empty token, so empty-vs-empty scores 1.0 and empty-vs-text 0.0.
    scores = compute_nlg_metrics(["", ""], ["", "the lungs are clear ."], meteor=False)
    assert scores["rouge_l"] == pytest.approx(0.5)
    assert scores["bleu_1"] == 0.0
    assert scores["cider"] == 0.0
    assert compute_nlg_metrics(["a"], [""], meteor=False)["cider"] is None  # undefined: no reference n-grams


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_nlg_metrics(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="prediction 1 is NoneType"):
        compute_nlg_metrics(["a", None], ["a", "b"])
    with pytest.raises(TypeError, match="reference 0 is float"):
        compute_nlg_metrics(["a"], [float("nan")])
    with pytest.raises(ValueError, match=r"reference 0 contains '\|\|\|'"):
        compute_nlg_metrics(["a"], ["a ||| b"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_nlg_metrics([], [])
    with pytest.raises(TypeError, match="not a single string"):
        compute_nlg_metrics("the heart", "the heart")


def test_meteor_process_closed_after_error_in_subprocess():
    """An exception inside pycocoevalcap's Meteor (its lock held) used to hang the interpreter at exit."""
    code = """
        from r2gen_mamba.metrics.nlg import meteor_score
        try:
            meteor_score({0: ["a b c"]}, {0: ["a b", "two hypotheses are rejected by pycocoevalcap"]})
        except AssertionError:
            print("assertion raised")
        try:
            meteor_score({0: ["the heart is normal ."]}, {0: ["the heart ."]}, timeout=0.0)
        except RuntimeError as error:
            print("watchdog:", error)
    """
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "assertion raised" in result.stdout
    assert "watchdog: the METEOR subprocess stopped" in result.stdout


def test_missing_java_reports_meteor_unavailable():
    code = f"""
        import json
        from r2gen_mamba.metrics import compute_nlg_metrics
        print(json.dumps(compute_nlg_metrics({PREDICTIONS[:4]!r}, {REFERENCES[:4]!r})))
    """
    result = run_python(code, timeout=120, env={"PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["meteor"] is None
    assert "Java" in scores["meteor_unavailable"] and "METEOR unavailable" in result.stderr
    expected = compute_nlg_metrics(PREDICTIONS[:4], REFERENCES[:4], meteor=False)
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):
        assert scores[key] == expected[key]


def test_load_metric_offline_in_subprocess(direct_scores):
    code = f"""
        import json, os
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        import r2gen_mamba
        metric = r2gen_mamba.load_metric()
        single = metric.compute(predictions={PREDICTIONS!r}, references={REFERENCES!r})
        multi_refs = {[[r, "no effusion ."] for r in REFERENCES[:3]]!r}
        multi = metric.compute(predictions={PREDICTIONS[:3]!r}, references=multi_refs, meteor=False)
        print(json.dumps({{"name": type(metric).__name__, "single": single, "multi": multi}}))
    """
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"] == "R2GenNLG"
    assert set(out["single"]) == set(NLG_KEYS)
    for key in NLG_KEYS:
        assert out["single"][key] == direct_scores[key], key
    expected = compute_nlg_metrics(PREDICTIONS[:3], [[r, "no effusion ."] for r in REFERENCES[:3]], meteor=False)
    assert out["multi"] == expected
