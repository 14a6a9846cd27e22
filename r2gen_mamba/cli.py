"""`r2gen-mamba` command line: one sub-command per module, each imported only when it runs.

Each module named in `SUBCOMMANDS` defines `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert-official": ("r2gen_mamba.convert_official", "convert an official R2Gen-Mamba checkpoint to a HF folder"),
    "prepare-data": ("r2gen_mamba.prepare_data", "build annotation.json for IU X-Ray or MIMIC-CXR"),
    "make-demo-data": ("r2gen_mamba.synthetic", "write the synthetic chest X-ray demo dataset"),
    "evaluate": ("r2gen_mamba.evaluation", "score generated reports (NLG metrics, CheXbert CE metrics)"),
    "generate": ("r2gen_mamba.generation_cli", "generate reports for one study or a batch of studies"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2gen-mamba", description="R2Gen-Mamba radiology report generation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen sub-command's module is imported (the others may pull heavy dependencies).
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
