"""`if-diffusers train` with what tests/test_training_processes.py compares, recorded per process: the gradients
of the first optimizer step, the learning rate of every step and a checksum of the final weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/training_processes_worker.py RECORDS \
        -- TRAIN-ARGS... [-- TRAIN-ARGS...]

runs each `TRAIN-ARGS` in turn (the same processes: one start-up for several runs), recording run i in
`RECORDS/run-<i>`. `record_run(records, argv)` does one run in this process."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from if_diffusers.training.command_line import main


def record_run(records: Path, argv: list) -> int:
    """Run `if-diffusers train argv`; write `records/rank-<RANK>.pt` (`gradients`, `rates`, `checksum`)."""
    seen = {"gradients": None, "rates": [], "params": None}

    def before_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if seen["gradients"] is None:
            seen["gradients"] = [p.grad.detach().clone() for p in params]
            seen["params"] = params  # trained in place: the final weights (EMA's, when on) at the end
        seen["rates"].append(optimizer.param_groups[0]["lr"])

    hook = register_optimizer_step_pre_hook(before_step)
    try:
        code = main([str(argument) for argument in argv])
    finally:
        hook.remove()
    if code == 0:
        digest = hashlib.sha256()
        for p in seen["params"]:
            digest.update(p.detach().float().contiguous().numpy().tobytes())
        records.mkdir(parents=True, exist_ok=True)
        record = {"gradients": seen["gradients"], "rates": seen["rates"], "checksum": digest.hexdigest(),
                  "params": [p.detach().clone() for p in seen["params"]]}  # fmt: skip
        torch.save(record, records / f"rank-{os.environ.get('RANK', '0')}.pt")
    return code


def _runs(arguments: list[str]) -> list[list[str]]:
    """The argument lists between (and after) the `--` separators."""
    runs = []
    for argument in arguments:
        if argument == "--":
            runs.append([])
        else:
            runs[-1].append(argument)
    return runs


if __name__ == "__main__":
    records = Path(sys.argv[1])
    for index, argv in enumerate(_runs(sys.argv[2:])):
        if code := record_run(records / f"run-{index}", argv):
            sys.exit(code)
