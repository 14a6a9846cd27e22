"""`encoder-scaling`: time and peak memory of the encoder alone against the number of visual tokens.

The paper-config encoder (`encoder_type` mamba: one Mamba block; transformer: R2Gen's 3-layer encoder), batch 1,
fp32 on CPU, at 98, 392, 1568 and 6272 tokens (2 views of 7x7 patches, then 4x, 16x, 64x). Eval-mode forward under
`no_grad` by default; `--backward` times forward+backward of a training-mode encoder instead.

Every point runs in its own fresh Python process, so that one point's allocator state cannot hide or inflate
another's memory. `seconds` is the best wall time of `--repeats` timed runs after one warm-up run; `cpu_seconds`
the best CPU time of the process over the same runs (all threads summed), which a machine shared with other jobs
disturbs less (with `--threads 1` it is the single-core cost). `peak_mb` is the growth of
the process's peak resident set size during those runs over the resident size just before them (Linux: `VmHWM`
after resetting it with `/proc/self/clear_refs`, with freed heap memory first handed back by `malloc_trim`;
elsewhere `ru_maxrss`, which cannot be reset and so only counts
a peak above everything before it). RSS is what torch's CPU allocations really occupy; `tracemalloc` would not
see them.

Writes a log-log plot next to the JSON (`--plot` to choose the path).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKENS = [98, 392, 1568, 6272]
ENCODERS = ["mamba", "transformer"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS, help="sequence lengths to time")
    parser.add_argument("--encoders", nargs="+", default=ENCODERS, choices=ENCODERS)
    parser.add_argument("--backward", action="store_true", help="time forward+backward (training mode)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (the best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--plot", help="PNG path (default: next to --json, same name)")


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    peak = _read_status_kb("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform != "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def _current_rss_kb() -> int:
    current = _read_status_kb("VmRSS")
    if current is not None:
        return current
    import psutil

    return psutil.Process().memory_info().rss // 1024


def _release_free_memory() -> None:
    """Returns freed heap memory to the OS (glibc), so that the RSS before the timed runs counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_point(encoder_type: str, tokens: int, backward: bool, repeats: int, threads: int | None) -> dict:
    """Builds the paper-config encoder and times it at `tokens` tokens in this process."""
    import torch

    from r2gen_mamba import R2GenMambaConfig
    from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaEncoder, R2GenTransformerEncoder

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = R2GenMambaConfig(encoder_type=encoder_type).encoder_config
    encoder_cls = R2GenMambaEncoder if encoder_type == "mamba" else R2GenTransformerEncoder
    encoder = encoder_cls(config).train(backward)
    hidden = torch.randn(1, tokens, config.hidden_size, requires_grad=backward)

    def run_once() -> None:
        if backward:
            encoder(hidden).sum().backward()
            encoder.zero_grad(set_to_none=True)
            hidden.grad = None
        else:
            with torch.no_grad():
                encoder(hidden)

    run_once()  # warm-up: one-time allocations, thread pool start, lazy init
    _release_free_memory()
    rss_before = _current_rss_kb()
    peak_reset = _reset_peak_rss()
    best = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run_once()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    peak_mb = max(0, _peak_rss_kb() - rss_before) / 1024
    return {
        "encoder": encoder_type,
        "tokens": tokens,
        "seconds": best,
        "peak_mb": peak_mb,
        "cpu_seconds": best_cpu,
        "peak_exact": peak_reset,
        "threads": torch.get_num_threads(),
    }


def measure_in_subprocess(script: str, spec: dict) -> dict:
    """Run `script --point JSON(spec)` in a fresh Python process and return the JSON row it prints last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    command = [sys.executable, script, "--point", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {spec} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: str, backward: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for encoder in dict.fromkeys(row["encoder"] for row in rows):
        points = sorted((r["tokens"], r["seconds"], r["peak_mb"]) for r in rows if r["encoder"] == encoder)
        tokens = [p[0] for p in points]
        ax_time.loglog(tokens, [p[1] for p in points], "o-", label=encoder)
        ax_mem.loglog(tokens, [max(p[2], 1e-2) for p in points], "o-", label=encoder)
        if encoder == "mamba" and len(points) > 1:
            # Linear-scaling guide from the smallest point.
            ax_time.loglog(tokens, [points[0][1] * t / tokens[0] for t in tokens], "k:", label="linear (from mamba)")
    what = "forward+backward" if backward else "forward (no_grad)"
    threads = rows[0].get("threads", "?")
    ax_time.set(xlabel="tokens", ylabel="seconds", title=f"encoder {what}, batch 1, fp32 CPU, {threads} thread(s)")
    ax_mem.set(xlabel="tokens", ylabel="peak RSS growth (MB)", title="peak memory")
    for ax in (ax_time, ax_mem):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for encoder_type in args.encoders:
        for tokens in args.tokens:
            spec = {
                "encoder_type": encoder_type,
                "tokens": tokens,
                "backward": args.backward,
                "repeats": args.repeats,
                "threads": args.threads,
            }
            point = measure_in_subprocess(os.path.abspath(__file__), spec)
            print(
                f"{encoder_type:>11} {tokens:>5} tokens: {point['seconds']:.4f} s, peak +{point['peak_mb']:.1f} MB",
                flush=True,
            )
            if not point["peak_exact"]:
                print("  (peak RSS mark could not be reset: peak_mb is a lower bound)", flush=True)
            keys = ("encoder", "tokens", "seconds", "peak_mb", "cpu_seconds", "threads")
            rows.append({key: point[key] for key in keys})

    by_key = {(r["encoder"], r["tokens"]): r["seconds"] for r in rows}
    low, high = min(args.tokens), max(args.tokens)
    for encoder_type in args.encoders:
        if (encoder_type, low) in by_key and (encoder_type, high) in by_key and high > low:
            growth = by_key[(encoder_type, high)] / by_key[(encoder_type, low)]
            print(f"{encoder_type}: time x{growth:.1f} from {low} to {high} tokens (linear: x{high / low:.0f})")
    if ("mamba", high) in by_key and ("transformer", high) in by_key:
        speedup = by_key[("transformer", high)] / by_key[("mamba", high)]
        print(f"at {high} tokens the mamba encoder is {speedup:.1f}x faster than the transformer encoder")

    plot_path = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if plot_path:
        os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
        plot(rows, plot_path, args.backward)
        print(f"wrote {plot_path}")
    return rows


if __name__ == "__main__":
    # Child-process entry: `bench_encoder_scaling.py --point JSON` measures one point and prints it as JSON.
    parser = argparse.ArgumentParser()
    parser.add_argument("--point", required=True)
    spec = json.loads(parser.parse_args().point)
    print(json.dumps(measure_point(**spec)))
