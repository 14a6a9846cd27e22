"""Natural-language-generation metrics exactly as R2Gen computes them, on top of `pycocoevalcap`.

R2Gen (`modules/metrics.py`) scores one hypothesis against one or more references per study with pycocoevalcap's
`Bleu(4)`, `Meteor()` and `Rouge()` on the strings as given (no PTB tokenizer); we add pycocoevalcap's `Cider()`
(CIDEr-D). The numbers here are the numbers pycocoevalcap returns for the same `{id: [text]}` dictionaries.

Conventions (documented because they change numbers or hang processes):

- **Whitespace** is normalised first: every run of whitespace (newlines, tabs, repeated spaces) becomes one space and
  the ends are stripped. A newline inside a report desynchronises METEOR's line-based Java protocol (the wrapper then
  blocks on a read and the interpreter hangs at exit); repeated spaces make ROUGE-L count empty tokens
  (`str.split(" ")`). Reports that are already single-spaced are unchanged, so scores equal a direct call.
- **Empty hypotheses** are scored, as pycocoevalcap scores them: BLEU, METEOR and CIDEr give that pair 0.
  pycocoevalcap's ROUGE-L splits `""` into one empty token, so an empty hypothesis against an empty reference scores
  1.0 (against a non-empty reference, 0.0). We keep that behaviour for parity and document it rather than patch it.
- **`|||`** is METEOR's field separator. pycocoevalcap strips it from hypotheses itself; inside a reference it would
  silently split the reference in two, so a reference containing `|||` is an error.
- **METEOR** needs Java (METEOR 1.5 runs as a `java -jar` subprocess). Without `java` on `PATH` it is reported as
  unavailable (`None`, plus a `meteor_unavailable` message) and the other metrics are still returned. The subprocess
  is always shut down, also on errors, and a watchdog kills it if it stops answering.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)

NLG_KEYS: tuple[str, ...] = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")

CocoDict = dict[int, list[str]]


class MeteorUnavailableError(RuntimeError):
    """METEOR cannot run here (no Java), as opposed to a bug in the inputs."""


def normalize_report(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return " ".join(text.split())


def _check_text(value: object, what: str, index: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} {index} is {type(value).__name__} ({value!r}); expected a string (use '' for empty)")
    return normalize_report(value)


def build_coco_inputs(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> tuple[CocoDict, CocoDict]:
    """Turn parallel lists into pycocoevalcap's `(gts, res)` dictionaries keyed by position, normalising whitespace.

    Args:
        predictions: one generated report per study.
        references: per study either one reference string or a non-empty list of reference strings.

    Returns:
        `gts` `{i: [ref, ...]}` and `res` `{i: [hypothesis]}`.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per study), not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; they must be parallel")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    gts: CocoDict = {}
    res: CocoDict = {}
    for i, (hypothesis, refs) in enumerate(zip(predictions, references)):
        res[i] = [_check_text(hypothesis, "prediction", i)]
        ref_list = list(refs) if isinstance(refs, (list, tuple)) else [refs]
        if not ref_list:
            raise ValueError(f"reference {i} is an empty list; each study needs at least one reference")
        gts[i] = [_check_text(ref, "reference", i) for ref in ref_list]
        if any("|||" in ref for ref in gts[i]):
            raise ValueError(f"reference {i} contains '|||', METEOR's field separator: {gts[i]!r}")
    return gts, res


def bleu_scores(gts: CocoDict, res: CocoDict) -> dict[str, float]:
    """Corpus BLEU-1..4 (pycocoevalcap `Bleu(4)`, 'closest' reference length, as R2Gen)."""
    from pycocoevalcap.bleu.bleu import Bleu

    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu_{n + 1}": float(s) for n, s in enumerate(score)}


def rouge_score(gts: CocoDict, res: CocoDict) -> float:
    """Mean ROUGE-L F (beta 1.2) over studies (pycocoevalcap `Rouge`)."""
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(gts, res)
    return float(score)


def cider_score(gts: CocoDict, res: CocoDict) -> float | None:
    """CIDEr-D (pycocoevalcap `Cider`, n=4, sigma=6); document frequencies come from the references given.

    Returns None when every reference is empty (no n-grams: CIDEr is undefined and pycocoevalcap would crash).
    """
    from pycocoevalcap.cider.cider import Cider

    if not any(ref for refs in gts.values() for ref in refs):
        logger.warning("CIDEr is undefined when every reference is empty; reporting None")
        return None
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def meteor_score(gts: CocoDict, res: CocoDict, timeout: float | None = None) -> float:
    """METEOR 1.5 (pycocoevalcap `Meteor`, Java subprocess), as R2Gen computes it.

    Args:
        timeout: seconds after which a silent subprocess is killed (the call then raises instead of hanging).
            Default: 300 s plus 50 ms per study.

    Raises:
        MeteorUnavailableError: `java` is not on PATH.
    """
    if shutil.which("java") is None:
        raise MeteorUnavailableError("METEOR needs Java (its 1.5 jar runs via `java -jar`); `java` is not on PATH")
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    process = scorer.meteor_p
    timeout = 300.0 + 0.05 * len(res) if timeout is None else timeout
    # A killed process closes its stdout, so the wrapper's blocked readline() returns and the call fails loudly.
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        process.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    except (ValueError, OSError) as error:  # an empty answer line or a broken pipe: the process is gone
        if timed_out.is_set():
            raise RuntimeError(f"the METEOR subprocess stopped: no answer within {timeout:.1f} s, killed") from error
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise error from None
        raise RuntimeError(f"the METEOR subprocess stopped (exit code {code}) before answering") from error
    finally:
        watchdog.cancel()
        _close_meteor(scorer)


def _close_meteor(scorer: object) -> None:
    """Stop the Java process now; leave pycocoevalcap's `__del__` nothing that could block at interpreter exit."""
    # `Meteor.compute_score` holds its lock while it talks to Java; an exception in there leaves the lock taken and
    # `Meteor.__del__` (which acquires it) would then block forever at exit. Release it before anything else.
    lock = scorer.lock
    if lock.locked():
        lock.release()
    process = scorer.meteor_p
    if process.stdin is not None and not process.stdin.closed:
        try:
            process.stdin.close()
        except OSError:
            pass  # the pipe is already broken because the process died; nothing left to flush
    process.kill()
    process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def compute_nlg_metrics(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    meteor: bool = True,
    meteor_timeout: float | None = None,
) -> dict[str, float | str | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap, exactly as R2Gen computes them.

    Args:
        predictions: one generated report per study.
        references: per study one reference string or a list of reference strings.
        meteor: set False to skip the (slowest, Java) METEOR metric; it is then `None`.
        meteor_timeout: see `meteor_score`.

    Returns:
        `{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}` (floats; `meteor`/`cider` may be
        None) and, when METEOR could not run, `"meteor_unavailable"` with the reason.
    """
    gts, res = build_coco_inputs(predictions, references)
    result: dict[str, float | str | None] = {**bleu_scores(gts, res), "meteor": None}
    if meteor:
        try:
            result["meteor"] = meteor_score(gts, res, timeout=meteor_timeout)
        except MeteorUnavailableError as error:
            logger.warning(f"METEOR unavailable, reporting None: {error}")
            result["meteor_unavailable"] = str(error)
    result["rouge_l"] = rouge_score(gts, res)
    result["cider"] = cider_score(gts, res)
    return result
