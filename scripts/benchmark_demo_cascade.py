"""Quality of the bundled demo cascade (or of a trained cascade folder) against the same architecture with random
weights: the analyser's accuracies on images generated from held-out captions, at stage I (32x32) and after stage II
(128x128), and the wall time of each; then stage II alone, upsampling clean 32x32 renderings of held-out captions.

    python scripts/benchmark_demo_cascade.py                      # the model bundled in the package, 64 captions
    python scripts/benchmark_demo_cascade.py --model demo-cascade/cascade --count 128
    python scripts/benchmark_demo_cascade.py --count 256 --seed 1  # 256 captions of another held-out stream

Stream 0's records 64-191 chose the demo's sampling presets (the model card's validation captions), so a count above
64 at the default seed scores captions the presets were chosen on; other seeds' streams were used for nothing.

Prints JSON: {"model", "count", "seed", "sampling", "trained": {"stage_1": {"colour", "shape", "position", "all",
"background"}, "stage_2": {...}, "seconds"}, "random weights": {...}, "ratios": trained / random for colour, shape
and background at each stage (`chance_ratios`), "stage_2_alone": {"trained": {"colour", "shape", "position", "all",
"background", "mae"}, "random weights": {...}} (`demo_cascade.super_resolution_scores`, 16 renderings of the same
stream)}. "all" is colour, shape and position at once; "background" is the plain colour, or both colours and the
split of a two-tone background (`analysis.background_matches`).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from if_diffusers import IFCascadePipeline
from if_diffusers.demo_cascade import (
    DEMO_SEED,
    QUALITY_CALL,
    benchmark_scores,
    bundled_model_path,
    random_weights_like,
    super_resolution_scores,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained demo cascade folder (default: the bundled one)")
    parser.add_argument("--count", type=int, default=64, help="held-out captions to score (default 64)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED,
                        help=f"held-out caption stream and generator seed (default {DEMO_SEED}: the model card's "
                             "benchmark)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count is {args.count}; expected a positive number of captions")
    if args.seed < 0:
        parser.error(f"--seed is {args.seed}; expected a non-negative int")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder = args.model or bundled_model_path()
    cascade = IFCascadePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    scores = benchmark_scores(cascade, args.count, seed=args.seed)
    scores["ratios"] = chance_ratios(scores, args.count)
    scores["stage_2_alone"] = {
        name: super_resolution_scores(pipeline, seed=args.seed)
        for name, pipeline in (("trained", cascade), ("random weights", random_weights_like(cascade)))
    }
    run = {"model": str(folder), "count": args.count, "seed": args.seed, "sampling": QUALITY_CALL}
    print(json.dumps({**run, **scores}, indent=2))
    return 0


def chance_ratios(scores: dict, count: int) -> dict[str, dict[str, float]]:
    """Trained over random-weight accuracy, for colour, shape and background at each stage, from `benchmark_scores`'
    result on `count` captions. A random score of 0 counts as one caption in `count` (1 / count), so that ratio is a
    lower bound rather than a division by zero."""
    return {
        stage: {key: round(scores["trained"][stage][key] / max(scores["random weights"][stage][key], 1 / count), 2)
                for key in ("colour", "shape", "background")}
        for stage in ("stage_1", "stage_2")
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
