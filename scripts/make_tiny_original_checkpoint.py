"""Write a small random-weight IF UNet in DeepFloyd's original checkpoint layout (config.yml + pytorch_model.bin),
built by the original `deepfloyd_if` code: an offline stand-in for the gated IF-I/IF-II checkpoints, to try the
conversion on. Needs `pip install --no-deps deepfloyd-if==1.0.1`.

    python scripts/make_tiny_original_checkpoint.py --output tiny-IF-I-original --stage I
"""

from __future__ import annotations

import argparse
import sys

import torch

from if_diffusers.conversion import write_checkpoint
from if_diffusers.conversion.oracle import build_original_unet, randomize_
from if_diffusers.models import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--stage", choices=["I", "II"], default="I")
    parser.add_argument("--model-channels", type=int, default=32, help="width (IF-I-XL: 704, IF-II-L: 160)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The published architecture at a small width and with a small text encoder width.
    preset = PRESETS["IF-I-XL" if args.stage == "I" else "IF-II-L"].params
    widest = max(int(m) for m in str(preset["channel_mult"]).split(","))
    params = {**preset, "model_channels": args.model_channels, "encoder_channels": args.model_channels * widest,
              "encoder_dim": 64, "num_head_channels": 32, "att_pool_heads": 8, "precision": "32"}  # fmt: skip
    torch.manual_seed(args.seed)
    model = randomize_(build_original_unet(params), args.seed)
    print(f"wrote {write_checkpoint(args.output, params, model.state_dict())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
