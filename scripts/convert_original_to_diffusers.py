"""Convert a DeepFloyd IF checkpoint folder (config.yml + pytorch_model.bin/model.safetensors) to the Hugging Face
hub layout. A thin front-end over `if_diffusers.conversion.convert_original_checkpoint`.

    python scripts/convert_original_to_diffusers.py --checkpoint IF-I-XL-v1.0 --output IF-I-XL-diffusers \\
        --variant fp16 --text-encoder t5-v1_1-xxl --tokenizer t5-v1_1-xxl
"""

from __future__ import annotations

import argparse
import logging
import sys

from if_diffusers.conversion import ConversionError, convert_original_checkpoint
from if_diffusers.conversion.oracle import compare_with_original

VERIFY_TOLERANCE = 1e-4  # float32 conversions measure about 1e-6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original checkpoint folder (config.yml + weights)")
    parser.add_argument("--output", required=True, help="folder to write (hub layout)")
    parser.add_argument("--stage", choices=["I", "II"], help="override stage detection from config.yml")
    parser.add_argument("--variant", choices=["fp16"], help="also write an fp16 weights variant")
    parser.add_argument("--text-encoder", help="transformers T5EncoderModel folder to include")
    parser.add_argument("--tokenizer", help="T5 tokenizer folder to include")
    parser.add_argument("--max-shard-size", default="5GB", help="largest UNet weights file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the original deepfloyd_if UNet and the converted one on the same inputs and fail above 1e-4 "
        "relative error (needs: pip install --no-deps deepfloyd-if==1.0.1, and memory for both models)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        output = convert_original_checkpoint(
            args.checkpoint, args.output, stage=args.stage, variant=args.variant, text_encoder=args.text_encoder,
            tokenizer=args.tokenizer, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
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


if __name__ == "__main__":
    sys.exit(main())
