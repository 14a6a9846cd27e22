"""Vocabulary building time: `python benchmarks/run.py vocab [--num-reports 250000] [--json PATH]`.

Builds R2Gen's vocabulary (cleaning + counting, MIMIC-CXR variant, threshold 10) from synthetic MIMIC-sized reports
(~60 words, sentences, newlines, numbered lists, underscores and punctuation, Zipf-distributed words) and times
`R2GenMambaTokenizer.from_reports`, then encoding (`encode_r2gen` on all reports, `tokenizer(...)` on a subset).
Report generation is not timed. Needs the package importable (`pip install -e .` or `PYTHONPATH=.`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from r2gen_mamba import R2GenMambaTokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-reports", type=int, default=250_000)
    parser.add_argument("--words-per-report", type=int, default=60)
    parser.add_argument("--word-pool", type=int, default=20_000, help="distinct synthetic words (Zipf-distributed)")
    parser.add_argument("--threshold", type=int, default=10)
    parser.add_argument(
        "--encode", type=int, default=20_000, help="also time `tokenizer(...)` on this many reports (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)


def synthetic_reports(num_reports: int, words_per_report: int, word_pool: int, seed: int) -> list[str]:
    """MIMIC-like raw reports: capitalised sentences of 4-12 words, some numbered, newlines, '___' placeholders."""
    rng = np.random.default_rng(seed)
    pool = np.array([f"w{i}" for i in range(word_pool)])
    ranks = np.arange(1, word_pool + 1, dtype=np.float64)
    probabilities = 1.0 / ranks
    probabilities /= probabilities.sum()
    words = pool[rng.choice(word_pool, size=(num_reports, words_per_report), p=probabilities)]
    breaks = rng.integers(4, 13, size=(num_reports, words_per_report))
    extras = rng.random(size=(num_reports, words_per_report))
    reports = []
    for row, row_breaks, row_extras in zip(words, breaks, extras):
        parts, sentence_len, number = [], 0, 1
        for word, brk, extra in zip(row, row_breaks, row_extras):
            if sentence_len == 0:
                word = word.capitalize()
                if extra < 0.1:
                    parts.append(f"{number}.")
                    number += 1
            elif extra < 0.05:
                word += ","
            elif extra > 0.98:
                word = "___"
            parts.append(word)
            sentence_len += 1
            if sentence_len >= brk:
                parts[-1] += ".\n" if extra > 0.7 else "."
                sentence_len = 0
        reports.append(" ".join(parts).replace("\n ", "\n") + ".")
    return reports


def run(args: argparse.Namespace) -> list[dict]:
    start = time.perf_counter()
    reports = synthetic_reports(args.num_reports, args.words_per_report, args.word_pool, args.seed)
    generate_s = time.perf_counter() - start
    num_words = sum(len(r.split()) for r in reports)

    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer = R2GenMambaTokenizer.from_reports(reports, dataset_name="mimic_cxr", threshold=args.threshold)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    common = {"words_per_report": round(num_words / len(reports), 1), "vocab_size": len(tokenizer)}
    rows = [
        {
            "task": f"build vocabulary (from_reports, mimic_cxr cleaning, threshold {args.threshold})",
            "reports": len(reports),
            **common,
            "seconds": build_s,
            "cpu_seconds": build_cpu_s,
            "reports_per_s": len(reports) / build_s,
            "generation_s_untimed": generate_s,
        }
    ]
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer.encode_r2gen(reports, max_length=100)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rows.append(
        {
            "task": "encode all (encode_r2gen, max_length 100)",
            "reports": len(reports),
            **common,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "reports_per_s": len(reports) / seconds,
        }
    )
    if args.encode:
        subset = reports[: args.encode]
        start, cpu_start = time.perf_counter(), time.process_time()
        tokenizer(subset, truncation=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        rows.append(
            {
                "task": "encode subset (tokenizer(batch, truncation=True))",
                "reports": len(subset),
                **common,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "reports_per_s": len(subset) / seconds,
            }
        )
    return rows
