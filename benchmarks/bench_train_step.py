"""`train-step`: one R2Gen-Mamba training step on CPU (IU X-Ray: 2 views, 224 px, fp32, 60-token reports).

For each batch size (16 and 4 by default) in a fresh process: the total time of a step (forward, R2Gen's masked NLL,
backward, AdamW update), the visual extractor's (ResNet-101) forward+backward alone on the same images, and the
rest = total - visual extractor; and the rest timed alone (`rest_alone_s`: the step from the ResNet's output on,
AdamW over all parameters included), which does not carry the run-to-run noise of two large times subtracted. Best of
`--steps` timed steps after one warm-up step. `peak_rss_mb` is the growth of
the peak resident set size over the timed steps (see `bench_encoder_scaling` for how it is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_encoder_scaling import (  # noqa: E402
    _current_rss_kb,
    _peak_rss_kb,
    _release_free_memory,
    _reset_peak_rss,
    measure_in_subprocess,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per batch size (the best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--encoder-type", default="mamba", choices=["mamba", "transformer"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (checks the script, not a measurement)")


def benchmark_config(tiny: bool, encoder_type: str = "mamba"):
    """The paper config (IU X-Ray: 2 views, 224 px, 761-entry vocabulary), or a tiny one that only checks a script."""
    from r2gen_mamba import R2GenMambaConfig, resnet101_config

    if not tiny:
        return R2GenMambaConfig(vocab_size=761, num_views=2, image_size=224, encoder_type=encoder_type)
    vision = resnet101_config(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
    return R2GenMambaConfig(
        vision_config=vision, vocab_size=30, d_model=32, num_heads=4, d_ff=32, decoder_layers=2,
        rm_num_slots=3, rm_num_heads=4, d_state=4, num_views=2, image_size=64, encoder_type=encoder_type,
    )  # fmt: skip


def build_model_and_batch(batch_size: int, encoder_type: str, tiny: bool, label_len: int = 60):
    import torch

    from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration

    torch.manual_seed(0)
    config = benchmark_config(tiny, encoder_type)
    model = R2GenMambaForConditionalGeneration(config)
    size = config.image_size
    pixel_values = torch.randn(batch_size, config.num_views, 3, size, size)
    labels = torch.randint(1, config.vocab_size, (batch_size, label_len))
    labels[:, -1] = 0  # R2Gen's final 0 is a target
    return model, pixel_values, labels


def measure_point(batch_size: int, steps: int, threads: int | None, encoder_type: str, tiny: bool) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, pixel_values, labels = build_model_and_batch(batch_size, encoder_type, tiny)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    visual = model.model.visual_extractor

    def train_step() -> None:
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def visual_step() -> None:
        features = model.model.visual_features(pixel_values)  # the ResNet as the model runs it (channels-last on CPU)
        features.backward(torch.ones_like(features))
        visual.zero_grad(set_to_none=True)

    def best_of(fn) -> float:
        best = float("inf")
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    # Everything but the ResNet, timed alone: from the ResNet's output (detached, so no ResNet backward) through the
    # patch embedding, encoder, decoder and loss, the backward down to the ResNet's output, and the AdamW update of all
    # parameters (the ResNet's get zero gradients, so the update costs what it does in a full step).
    with torch.no_grad():
        features = model.model.visual_features(pixel_values)
    visual_grads = [torch.zeros_like(p) for p in visual.parameters()]

    def rest_step() -> None:
        encoded = model.model.encode_visual_features(features.detach().requires_grad_(True), pixel_values.shape[0])
        loss = model(encoder_outputs=(encoded,), labels=labels).loss
        loss.backward()
        for param, grad in zip(visual.parameters(), visual_grads):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up, creates the optimizer state
    _release_free_memory()
    rss_before = _current_rss_kb()
    _reset_peak_rss()
    total = best_of(train_step)
    peak_rss_mb = max(0, _peak_rss_kb() - rss_before) / 1024
    rss_mb = rss_before / 1024
    visual_step()
    visual_seconds = best_of(visual_step)
    rest_step()
    rest_alone_seconds = best_of(rest_step)
    return {
        "batch_size": batch_size,
        "encoder": encoder_type,
        "total_s": total,
        "visual_extractor_fwd_bwd_s": visual_seconds,
        "rest_s": total - visual_seconds,
        "rest_over_visual": (total - visual_seconds) / visual_seconds,
        "rest_alone_s": rest_alone_seconds,
        "rest_alone_over_visual": rest_alone_seconds / visual_seconds,
        "peak_rss_mb": peak_rss_mb,
        "rss_before_mb": rss_mb,
        "threads": torch.get_num_threads(),
    }


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        spec = {
            "batch_size": batch_size,
            "steps": args.steps,
            "threads": args.threads,
            "encoder_type": args.encoder_type,
            "tiny": args.tiny,
        }
        row = measure_in_subprocess(os.path.abspath(__file__), spec)
        print(
            f"batch {batch_size}: step {row['total_s']:.2f} s = visual extractor "
            f"{row['visual_extractor_fwd_bwd_s']:.2f} s + rest {row['rest_s']:.2f} s "
            f"(rest/visual {row['rest_over_visual']:.0%}; rest timed alone {row['rest_alone_s']:.2f} s, "
            f"{row['rest_alone_over_visual']:.0%}), "
            f"peak RSS +{row['peak_rss_mb']:.0f} MB over {row['rss_before_mb']:.0f} MB",
            flush=True,
        )
        rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--point", required=True)
    print(json.dumps(measure_point(**json.loads(parser.parse_args().point))))
