"""The conversion's command line, `if-diffusers convert` (and `scripts/convert_original_to_diffusers.py`): a DeepFloyd
IF checkpoint folder (config.yml + pytorch_model.bin/model.safetensors) to the Hugging Face hub layout, ready to
upload: model card, checksum manifest and, with --validate, a one-step run of the folder; --push-to-hub uploads it.

    if-diffusers convert --checkpoint IF-I-XL-v1.0 --output IF-I-XL-diffusers --variant fp16 \\
        --text-encoder t5-v1_1-xxl --tokenizer t5-v1_1-xxl --validate
    if-diffusers convert --output IF-I-XL-diffusers --variant fp16 --validate --push-to-hub me/IF-I-XL-diffusers
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .convert import ConversionError, convert_original_checkpoint
from .oracle import compare_with_original
from .release import validate_converted, verify_checksums

VERIFY_TOLERANCE = 1e-4  # float32 conversions measure about 1e-6
DESCRIPTION = "Convert a DeepFloyd IF checkpoint folder to the Hugging Face hub layout, ready to upload."


def main(argv: list[str] | None = None) -> int:
    """`python scripts/convert_original_to_diffusers.py ...` and `if-diffusers convert ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="if-diffusers convert", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser, parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The conversion's options, on `parser`."""
    parser.add_argument(
        "--checkpoint",
        help="original checkpoint folder (config.yml + weights); without it, --validate checks --output",
    )
    parser.add_argument("--output", required=True, help="folder to write (hub layout)")
    parser.add_argument("--stage", choices=["I", "II"], help="override stage detection from config.yml")
    parser.add_argument(
        "--variant", choices=["fp16"], help="also write (with --validate: load) an fp16 weights variant"
    )
    parser.add_argument("--text-encoder", help="transformers T5EncoderModel folder to include")
    parser.add_argument("--tokenizer", help="T5 tokenizer folder to include")
    parser.add_argument("--max-shard-size", default="5GB", help="largest UNet weights file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--model-card",
        default="auto",
        help="markdown card to copy to README.md: a path, 'auto' (default: the card of the published model whose "
        "config matches) or 'none'",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="check the folder's checksums, load it with the plugin's pipeline (the --variant weights) and run one "
        "denoising step from random embeddings",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the folder to this hub repo (created if missing) once it is written and, with --validate, "
        "validated; log in first (`hf auth login`) or set HF_TOKEN",
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the original deepfloyd_if UNet and the converted one on the same inputs and fail above 1e-4 "
        "relative error (needs: pip install --no-deps deepfloyd-if==1.0.1, and memory for both models)",
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Convert and/or validate as `args` say; errors are printed, not raised (exit code 1)."""
    if args.checkpoint is None and not (args.validate or args.push_to_hub):
        parser.error("--checkpoint is required unless --validate or --push-to-hub reads an existing --output folder")
    if args.private and not args.push_to_hub:
        parser.error("--private applies to the repo --push-to-hub creates: add --push-to-hub REPO")
    if args.checkpoint is None and args.verify:
        parser.error("--verify compares with the original: it needs --checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.checkpoint is not None and _convert(args) != 0:
        return 1
    if args.validate:
        try:
            report = validate_converted(args.output, variant=args.variant)
        except ValueError as error:
            print(f"error: validation failed: {error}", file=sys.stderr)
            return 1
        print("\n".join(["validated:", *report.lines()]))
    if args.push_to_hub:
        return _push(args.output, args.push_to_hub, args.private)
    return 0


def _push(folder: str, repo_id: str, private: bool) -> int:
    """Upload `folder` (a converted folder: model_index.json, its files matching their checksum manifest) to
    `repo_id` in one commit; `private` creates the repo private and refuses an existing public one."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not (Path(folder) / "model_index.json").is_file():
        print(f"error: --output={folder!r} holds no model_index.json: nothing converted to push", file=sys.stderr)
        return 1
    try:
        verify_checksums(folder)  # what is pushed is what was converted (and, with --validate, validated)
    except ValueError as error:
        print(f"error: --push-to-hub {repo_id}: {error}", file=sys.stderr)
        return 1
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if private and not api.repo_info(repo_id).private:
            print(f"error: --push-to-hub {repo_id} --private: the repo exists and is public; make it private on the "
                  "Hub first, or push without --private", file=sys.stderr)  # fmt: skip
            return 1
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="Upload a DeepFloyd IF conversion (if-diffusers)"
        )
    except (HfHubHTTPError, ValueError) as error:  # ValueError: no token, a malformed repo id
        print(f"error: --push-to-hub {repo_id}: {error}", file=sys.stderr)
        return 1
    print(f"pushed {folder} to {commit.commit_url}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    model_card = None if args.model_card == "none" else args.model_card
    try:
        output = convert_original_checkpoint(
            args.checkpoint, args.output, stage=args.stage, variant=args.variant, text_encoder=args.text_encoder,
            tokenizer=args.tokenizer, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            model_card=model_card,
        )  # fmt: skip
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    if args.verify:
        error = compare_with_original(args.checkpoint, output)
        print(f"max relative error against deepfloyd_if: {error:.2e}")
        if not error < VERIFY_TOLERANCE:
            print(
                f"error: the converted UNet differs from the original by more than {VERIFY_TOLERANCE}", file=sys.stderr
            )
            return 1
    return 0
