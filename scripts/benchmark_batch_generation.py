"""Throughput of `if-diffusers batch`: images per second on 1 and 2 processes at batch sizes 1, 4 and 8, on the
bundled demo cascade (or `--model`), each run a fresh `python -m torch.distributed.run --nproc_per_node P -m
if_diffusers batch ...` over the same prompt file, all in this one run; ratios against 1 process at batch 1.

    python scripts/benchmark_batch_generation.py                       # CPU: 32 demo captions, 10 steps a stage
    python scripts/benchmark_batch_generation.py --device cuda --steps 50 --count 64

"images/s" counts generation alone (the command's own "made N images in T s"); "wall s" adds starting the processes
and loading the model in each. On the CPU, torchrun gives each of several processes one thread, and a single process
all cores (PyTorch's default): the 2-process ratio is what splitting the cores between processes gains. On GPUs, each
process takes its own GPU (`cuda:LOCAL_RANK`); with one GPU both share it.
Prints a table, then JSON: {"device", "steps", "count", "runs": [{"processes", "batch_size", "images_per_second",
"wall_seconds", "ratio"}]}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from if_diffusers.synthetic import shapes

MADE = re.compile(r"made (\d+) images in ([\d.]+) s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a cascade folder or stage I's id (default: the bundled demo cascade)")
    parser.add_argument("--count", type=int, default=32, help="prompts (demo captions), one image each (default 32)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of every stage (default 10)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.count < 1 or args.steps < 1 or min(args.processes + args.batch_sizes) < 1:
        parser.error("--count, --steps, --processes and --batch-sizes must be positive")
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.txt"
        prompts.write_text("\n".join(shapes.sample_record(i, 0).caption for i in range(args.count)))
        for processes in args.processes:
            for batch_size in args.batch_sizes:
                runs.append(_run(args, prompts, Path(folder) / f"out-{processes}-{batch_size}", processes, batch_size))
                print(f"{processes} process(es), batch {batch_size}: {runs[-1]['images_per_second']:.3g} images/s",
                      file=sys.stderr)  # fmt: skip
    baseline = runs[0]["images_per_second"]
    for run in runs:
        run["ratio"] = run["images_per_second"] / baseline
    print(f"{'processes':>9} {'batch':>5} {'images/s':>9} {'ratio':>6} {'wall s':>7}")
    for run in runs:
        print(f"{run['processes']:>9} {run['batch_size']:>5} {run['images_per_second']:>9.3g} {run['ratio']:>6.2f} "
              f"{run['wall_seconds']:>7.1f}")  # fmt: skip
    print(json.dumps({"device": args.device, "steps": args.steps, "count": args.count, "runs": runs}))
    return 0


def _run(args: argparse.Namespace, prompts: Path, output: Path, processes: int, batch_size: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
               "if_diffusers", "batch", str(prompts), "-o", str(output), "--steps", str(args.steps), "--batch-size",
               str(batch_size), "--device", args.device, *(["--model", args.model] if args.model else [])]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    made = MADE.search(result.stdout)
    if result.returncode != 0 or made is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    count, seconds = int(made.group(1)), float(made.group(2))
    return {"processes": processes, "batch_size": batch_size, "images_per_second": count / seconds,
            "wall_seconds": wall}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
