"""Upload a trained R2Gen-Mamba model to the Hugging Face Hub as remote code, with a model card.

    python push_to_hub.py --model runs/iu_xray/best --repo-id me/r2gen-mamba-iu-xray --eval-results metrics.json
    python push_to_hub.py --model runs/iu_xray/best --repo-id me/r2gen-mamba-iu-xray --dry-run --output-dir hub_out

`--model` is a folder written by `save_pretrained` (train.py or `r2gen-mamba convert-official`). The token comes
from `HF_TOKEN` or `hf auth login`. `--dry-run` only writes the folder that would be uploaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from r2gen_mamba.hub import DATASETS, guess_dataset, read_eval_results, save_hub_folder, upload_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of the trained model (save_pretrained layout)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/r2gen-mamba-iu-xray")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--eval-results", help="metrics.json of `r2gen-mamba evaluate` or test_results.json of train.py"
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="training data (default: from the view count)")
    parser.add_argument("--split", default="test", help="split the eval results were measured on (default: test)")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights (default: apache-2.0)")
    parser.add_argument("--revision", help="branch to upload to (created if missing; default: main)")
    parser.add_argument("--dry-run", action="store_true", help="write the folder only, upload nothing")
    parser.add_argument("--output-dir", help="where to write the Hub folder (required with --dry-run)")
    return parser


def main(argv: list[str] | None = None, api: HfApi | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run and not args.output_dir:
        print("error: --dry-run needs --output-dir", file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: {args.model} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    try:
        metrics = read_eval_results(args.eval_results) if args.eval_results else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def write(folder: str) -> Path:
        from transformers import AutoConfig

        dataset = args.dataset or guess_dataset(AutoConfig.from_pretrained(args.model).num_views)
        return save_hub_folder(
            args.model,
            folder,
            repo_id=args.repo_id,
            metrics=metrics,
            dataset=dataset,
            split=args.split,
            license=args.license,
        )

    if args.dry_run:
        try:
            folder = write(args.output_dir)
        except (ValueError, OSError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"wrote the Hub folder for {args.repo_id} to {folder}:")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = write(args.output_dir or tmp)
        except (ValueError, OSError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        commit = upload_folder(folder, args.repo_id, private=args.private, revision=args.revision, api=api)
    print(f"uploaded to https://huggingface.co/{args.repo_id}\ncommit: {commit.commit_url}")
    print(f'pin this version with revision="{commit.oid}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
