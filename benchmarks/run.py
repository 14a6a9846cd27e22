"""Benchmarks: `python benchmarks/run.py SUBCOMMAND [--json PATH] ...`.

Each sub-command lives in `benchmarks/bench_<name>.py` with `add_arguments(parser)` and `run(args) -> list|dict`
(the rows it measured). This runner prints them as a table and writes them as JSON when `--json` is given.
Numbers go into the README; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# The benchmark modules beside this file, and the repository root so an uninstalled checkout works too.
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

SUBCOMMANDS = {
    "params-flops": "bench_params_flops",
    "encoder-scaling": "bench_encoder_scaling",
    "train-step": "bench_train_step",
    "generate": "bench_generate",
    "vocab": "bench_vocab",
    "metrics": "bench_metrics",
}


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(fmt(row.get(c, "")).ljust(widths[c]) for c in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, module_name in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name)
        sub_parser.add_argument("--json", help="write the results as JSON to this path")
        if name in argv:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command])
    result = module.run(args)
    rows = result if isinstance(result, list) else result.get("rows", [result])
    print_table(rows)
    if args.json:
        payload = {"benchmark": args.command, "machine": machine_info(), "results": result}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
