"""One prepared check for a CUDA machine: kernel parity, then training and generation throughput.

    python benchmarks/gpu_check.py --json results/gpu_check.json

1. **Kernel parity**: the `mamba_ssm` / `causal_conv1d` kernel path of `R2GenMambaBlock` against our pure-PyTorch
   path with the same weights (paper block, d_model 512), forward and backward (input and parameter gradients):
   fp32 within rtol 6e-4 / atol 2e-3, and under bf16 autocast within a relative error (norm of the difference over
   norm of the PyTorch result) of 5e-2.
2. **Throughput** of `R2GenMambaForConditionalGeneration` at the paper config (IU X-Ray: 2 views, 224 px,
   761-entry vocabulary): training steps (AdamW, batch 16, 60-token labels) in studies/s, in fp32 and bf16
   autocast, and beam-3 generation of exactly 60 new tokens (forced with `min_length`) in reports/s.

Installs nothing. Exit status: 0 all good; 1 a parity check failed; 2 no CUDA device; 3 the kernels are not
installed (throughput is still measured, on the PyTorch path). `--device cpu --tiny` runs the same code on a tiny
model on CPU, to check the script itself on a machine without a GPU (parity is then skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# The benchmark modules beside this file, and the repository root so an uninstalled checkout works too.
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from bench_train_step import benchmark_config  # noqa: E402

from r2gen_mamba import R2GenMambaConfig, mamba_block  # noqa: E402
from r2gen_mamba.mamba_block import R2GenMambaBlock  # noqa: E402
from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration  # noqa: E402

FP32_RTOL, FP32_ATOL = 6e-4, 2e-3
BF16_REL_ERR = 5e-2


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed, or installed without metadata
        return None


def environment(device: torch.device) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "mamba_ssm": package_version("mamba-ssm") or package_version("mamba_ssm"),
        "causal_conv1d": package_version("causal-conv1d") or package_version("causal_conv1d"),
        "kernels_importable": mamba_block.is_fast_path_available,
    }


def _run_block(block: R2GenMambaBlock, hidden: torch.Tensor, cotangent: torch.Tensor, autocast: bool) -> dict:
    hidden = hidden.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    with torch.autocast(device_type=hidden.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = block(hidden)
    (out.float() * cotangent).sum().backward()
    result = {"output": out.detach().float(), "input_grad": hidden.grad.float()}
    result.update({f"grad:{name}": p.grad.float() for name, p in block.named_parameters()})
    return result


def kernel_parity(device: torch.device, seq_lens: list[int], batch_size: int) -> list[dict]:
    """Compares the kernel path and the PyTorch path; one row per (precision, length, tensor)."""
    rows = []
    torch.manual_seed(0)
    kernel_block = R2GenMambaBlock(512, d_state=16, d_conv=4, expand=2, use_kernels=True).to(device)
    with torch.no_grad():  # move off the init so that every parameter matters
        for p in kernel_block.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch_block = R2GenMambaBlock(512, d_state=16, d_conv=4, expand=2, use_kernels=False).to(device)
    torch_block.load_state_dict(kernel_block.state_dict())
    if not kernel_block._use_kernel_path(torch.zeros(1, 1, 512, device=device)):
        raise RuntimeError("the kernel path is not selected although the kernels import; cannot compare")
    for precision in ("fp32", "bf16"):
        for seq_len in seq_lens:
            hidden = torch.randn(batch_size, seq_len, 512, device=device)
            cotangent = torch.randn(batch_size, seq_len, 512, device=device)
            autocast = precision == "bf16"
            got = _run_block(kernel_block, hidden, cotangent, autocast)
            want = _run_block(torch_block, hidden, cotangent, autocast)
            for name in want:
                diff = (got[name] - want[name]).abs()
                rel_err = (diff.norm() / want[name].norm().clamp_min(1e-12)).item()
                if precision == "fp32":
                    ok = bool(torch.allclose(got[name], want[name], rtol=FP32_RTOL, atol=FP32_ATOL))
                else:
                    ok = rel_err <= BF16_REL_ERR
                rows.append(
                    {
                        "precision": precision,
                        "seq_len": seq_len,
                        "tensor": name,
                        "max_abs_diff": diff.max().item(),
                        "rel_err": rel_err,
                        "ok": ok,
                    }
                )
    return rows


def random_batch(config: R2GenMambaConfig, batch_size: int, device: torch.device, label_len: int = 60):
    size = config.image_size
    pixel_values = torch.randn(batch_size, config.num_views, 3, size, size, device=device)
    # R2Gen targets: real tokens, then the final 0 (no padding: every study has the full length).
    labels = torch.randint(1, config.vocab_size, (batch_size, label_len), device=device)
    labels[:, -1] = 0
    return pixel_values, labels


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(
    model: R2GenMambaForConditionalGeneration, device: torch.device, batch_size: int, steps: int, bf16: bool
) -> dict:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values, labels = random_batch(model.config, batch_size, device)

    def step() -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):  # warm-up: cuDNN autotuning, allocator, optimizer state
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "what": "train",
        "precision": "bf16-autocast" if bf16 else "fp32",
        "batch_size": batch_size,
        "steps": steps,
        "seconds_per_step": seconds / steps,
        "per_second": batch_size * steps / seconds,
        "unit": "studies/s",
        "final_loss": loss,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


@torch.no_grad()
def generate_throughput(
    model: R2GenMambaForConditionalGeneration, device: torch.device, batch_size: int, repeats: int, new_tokens: int
) -> dict:
    model.eval()
    pixel_values, _ = random_batch(model.config, batch_size, device)
    # Exactly `new_tokens` after the start token (lengths count it): a random model must not stop early.
    kwargs = dict(num_beams=3, min_length=new_tokens + 1, max_length=new_tokens + 1, do_sample=False)
    model.generate(pixel_values=pixel_values, **kwargs)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        ids = model.generate(pixel_values=pixel_values, **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "what": "generate",
        "precision": "fp32",
        "batch_size": batch_size,
        "steps": repeats,
        "seconds_per_step": seconds / repeats,
        "per_second": batch_size * repeats / seconds,
        "unit": "reports/s",
        "generated_length": ids.shape[1],
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write everything measured here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model (checks the script itself, e.g. on CPU)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--generate-repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--parity-lengths", type=int, nargs="+", default=[1, 98, 1024])
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ERROR: no CUDA device is visible to torch (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2
    report = {"environment": environment(device), "parity": None, "throughput": [], "errors": []}
    print(json.dumps(report["environment"], indent=2))
    status = 0

    if device.type != "cuda":
        print("kernel parity: SKIPPED (not a CUDA device)")
    elif not mamba_block.is_fast_path_available:
        env = report["environment"]
        print(
            "kernel parity: SKIPPED - mamba_ssm and/or causal_conv1d are not importable here "
            f"(mamba_ssm={env['mamba_ssm']}, causal_conv1d={env['causal_conv1d']})."
            " Install the `[cuda]` extra (prebuilt wheels matching this torch/CUDA) to check the kernel path.",
            file=sys.stderr,
        )
        status = 3
    else:
        try:
            rows = kernel_parity(device, args.parity_lengths, batch_size=2)
            report["parity"] = rows
            bad = [r for r in rows if not r["ok"]]
            for precision in ("fp32", "bf16"):
                worst = max((r for r in rows if r["precision"] == precision), key=lambda r: r["rel_err"])
                print(
                    f"kernel parity {precision}: {sum(r['ok'] for r in rows if r['precision'] == precision)}/"
                    f"{sum(r['precision'] == precision for r in rows)} tensors ok; worst rel_err "
                    f"{worst['rel_err']:.2e} ({worst['tensor']}, L={worst['seq_len']}, "
                    f"max_abs_diff {worst['max_abs_diff']:.2e})"
                )
            for r in bad:
                print(f"MISMATCH: {r}", file=sys.stderr)
            if bad:
                status = 1
        except Exception:  # report and go on to the throughput part; the exit status says it failed
            report["errors"].append(traceback.format_exc())
            print(traceback.format_exc(), file=sys.stderr)
            status = 1

    torch.manual_seed(0)
    model = R2GenMambaForConditionalGeneration(benchmark_config(args.tiny)).to(device)
    measurements = [
        lambda: train_throughput(model, device, args.batch_size, args.train_steps, bf16=False),
        lambda: train_throughput(model, device, args.batch_size, args.train_steps, bf16=True),
        lambda: generate_throughput(model, device, args.batch_size, args.generate_repeats, args.new_tokens),
    ]
    for measure in measurements:
        try:
            row = measure()
        except Exception:
            report["errors"].append(traceback.format_exc())
            print(traceback.format_exc(), file=sys.stderr)
            status = status or 1
            continue
        report["throughput"].append(row)
        print(
            f"{row['what']:>8} {row['precision']:>13} batch {row['batch_size']}: {row['per_second']:.2f} "
            f"{row['unit']} ({row['seconds_per_step']:.3f} s per step)",
            flush=True,
        )

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
