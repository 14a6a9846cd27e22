"""`generate`: beam-3 report generation on CPU (IU X-Ray: 2 views, 224 px, fp32), exactly `--new-tokens` (60) tokens.

For each batch size (4 and 16 by default) in a fresh process: total `generate()` time with the incremental cache,
the visual extractor's (ResNet-101) forward alone on the same images, the same generation with `use_cache=False`
(full prefix recomputed at every step, as the official code decodes), and the peak resident-set growth of the
cached generation. `generate()` packs the decoder's weights for oneDNN on every call (`packed_linear`); the table
also has the cached generation with packing switched off (`plain_linear_s`, plain `F.linear`) and inside one
`packed_cpu_weights()` block entered before the timed calls (`packed_once_s`: the packing cost paid once, as when
a loop of `generate()` calls is wrapped in it), and, where oneDNN runs bfloat16, the opt-in bfloat16 weight copies
(`packed_bf16_s`; `packed_bf16_same_rows` counts the rows whose ids equal the float32 ones: on an untrained model the
scores are nearly flat, so this says little about a trained one). Generation is forced to the full length
(`min_length` = `max_length`), so an untrained model does the same work as a trained one. Best of `--repeats` runs
after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_encoder_scaling import _current_rss_kb, _peak_rss_kb, _release_free_memory, _reset_peak_rss  # noqa: E402
from bench_train_step import build_model_and_batch, measure_in_subprocess  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (the best is reported)")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--no-uncached", action="store_true", help="skip the (slow) use_cache=False run")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (checks the script, not a measurement)")


def measure_point(
    batch_size: int, repeats: int, new_tokens: int, num_beams: int, threads: int | None, uncached: bool, tiny: bool
) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from r2gen_mamba import packed_linear

    model, pixel_values, _ = build_model_and_batch(batch_size, "mamba", tiny)
    model.eval()
    # Lengths count the decoder start token: exactly `new_tokens` generated tokens.
    kwargs = dict(num_beams=num_beams, min_length=new_tokens + 1, max_length=new_tokens + 1, do_sample=False)

    def best_of(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    with torch.no_grad():
        visual_seconds = best_of(lambda: model.model.visual_features(pixel_values))
        ids = model.generate(pixel_values=pixel_values, **kwargs)
        _release_free_memory()
        rss_before = _current_rss_kb()
        _reset_peak_rss()
        cached_seconds = best_of(lambda: model.generate(pixel_values=pixel_values, **kwargs))
        peak_rss_mb = max(0, _peak_rss_kb() - rss_before) / 1024
        row = {
            "batch_size": batch_size,
            "new_tokens": ids.shape[1] - 1,
            "total_s": cached_seconds,
            "visual_extractor_fwd_s": visual_seconds,
            "total_over_visual": cached_seconds / visual_seconds,
            "peak_rss_mb": peak_rss_mb,
            "rss_before_mb": rss_before / 1024,
            "threads": torch.get_num_threads(),
        }
        if packed_linear.packed_linear_available():
            with model.packed_cpu_weights():
                row["packed_once_s"] = best_of(lambda: model.generate(pixel_values=pixel_values, **kwargs))
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                # Opt-in bfloat16 weight copies (packed once): reports may differ from float32 decoding.
                with model.packed_cpu_weights(torch.bfloat16):
                    row["packed_bf16_s"] = best_of(lambda: model.generate(pixel_values=pixel_values, **kwargs))
                    bf16_ids = model.generate(pixel_values=pixel_values, **kwargs)
                row["packed_bf16_over_visual"] = row["packed_bf16_s"] / visual_seconds
                row["packed_bf16_same_rows"] = int((bf16_ids == ids).all(dim=1).sum())
            previous = packed_linear.set_packed_linear_enabled(False)
            try:
                row["plain_linear_s"] = best_of(lambda: model.generate(pixel_values=pixel_values, **kwargs))
                row["plain_linear_same_ids"] = bool(
                    torch.equal(model.generate(pixel_values=pixel_values, **kwargs), ids)
                )
            finally:
                packed_linear.set_packed_linear_enabled(previous)
        if uncached:
            start = time.perf_counter()
            uncached_ids = model.generate(pixel_values=pixel_values, use_cache=False, **kwargs)
            row["no_cache_s"] = time.perf_counter() - start  # one run: it is the slow one
            row["cache_speedup"] = row["no_cache_s"] / cached_seconds
            row["same_ids_without_cache"] = bool(torch.equal(uncached_ids, ids))
    return row


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        spec = {
            "batch_size": batch_size,
            "repeats": args.repeats,
            "new_tokens": args.new_tokens,
            "num_beams": args.num_beams,
            "threads": args.threads,
            "uncached": not args.no_uncached,
            "tiny": args.tiny,
        }
        row = measure_in_subprocess(os.path.abspath(__file__), spec)
        line = (
            f"batch {batch_size}: generate {row['total_s']:.2f} s "
            f"({row['new_tokens']} tokens, beam {args.num_beams}), "
            f"visual extractor {row['visual_extractor_fwd_s']:.2f} s (x{row['total_over_visual']:.1f})"
        )
        if "no_cache_s" in row:
            line += f", use_cache=False {row['no_cache_s']:.2f} s (cache x{row['cache_speedup']:.1f} faster)"
        if "plain_linear_s" in row:
            line += f", packed once {row['packed_once_s']:.2f} s, plain F.linear {row['plain_linear_s']:.2f} s"
        if "packed_bf16_s" in row:
            line += f", bf16 weights {row['packed_bf16_s']:.2f} s (x{row['packed_bf16_over_visual']:.1f})"
        print(line + f", peak RSS +{row['peak_rss_mb']:.0f} MB", flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--point", required=True)
    print(json.dumps(measure_point(**json.loads(parser.parse_args().point))))
