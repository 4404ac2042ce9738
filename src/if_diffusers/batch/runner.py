"""One batch run on every process accelerate starts (`accelerate launch`, `torchrun`, or a single plain process).

Each process reads and checks the prompt file, loads the cascade once and checks every line's call with it; the
main process then finds the images an earlier run completed, and every process takes its share of the remaining
batches (batch `b` to process `b % N`). After each round of batches the processes add up what they made, which
moves the one progress bar (main process) and stops every process if one failed. The main process writes
`metadata.jsonl` at the end. On the CPU the processes join through gloo (`PartialState(cpu=True)`), on GPUs as
accelerate sets them up (NCCL, one GPU per process).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import generation_options as options
from . import image_folder
from .jobs import ImageJob, batches, call_arguments, check_calls, plan_jobs
from .prompt_file import line_seed, read_prompt_file


def run_batch(args: argparse.Namespace) -> int:
    """`if-diffusers batch` with checked options; 0 when every image of the prompt file is in the output folder."""
    state = _process_state(args.device)
    try:
        return _run(state, args, Path(args.output))
    finally:
        _end(state)


def _run(state, args: argparse.Namespace, folder: Path) -> int:
    try:
        lines = read_prompt_file(args.prompts)
        counts = [line.num_images or args.num_images for line in lines]
        names = {image_folder.image_name(line.number, k) for line, count in zip(lines, counts) for k in range(count)}
        image_folder.check_output_folder(folder, names)
        device, dtype = options.resolve_device(args.device, args.dtype, args.offload)
        if device.type == state.device.type and device.index is None:
            device = state.device  # one device per process: cuda:LOCAL_RANK
        _quiet_loading(state)
        pipeline = options.load_cascade(args, dtype, device, [line.prompt for line in lines])
        pipeline.set_progress_bar_config(disable=True)  # one bar counts the images
        jobs = plan_jobs(lines, [line_seed(line, args.seed) for line in lines], counts,
                         lambda mode: options.call_settings(args, pipeline.has_stage_3, mode),
                         {**options.model_ids(args), "dtype": str(dtype).removeprefix("torch."),
                          "if_diffusers_version": __version__})  # fmt: skip
        check_calls(pipeline, jobs, Path(args.prompts))
        error = None
    except (ValueError, OSError) as caught:
        error = caught
    if not _all_succeeded(state, error):
        return 1
    todo = _remaining(state, folder, jobs)
    made, seconds = _generate(state, pipeline, jobs, todo, args.batch_size, device, folder)
    if made is None:
        return 1
    if state.is_main_process:
        path = image_folder.write_metadata(folder, [job.row for job in jobs])
        rate = f", {made / seconds:.3g} images/s" if made else ""
        print(f"made {made} images in {seconds:.1f} s on {state.num_processes} process(es){rate}; "
              f"kept {len(jobs) - len(todo)} of an earlier run")  # fmt: skip
        print(f"wrote {path}")
    return 0


def _process_state(device: str | None):
    """accelerate's view of the processes; on the CPU it joins torchrun's process group only when told so."""
    from accelerate import PartialState

    try:
        kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, ValueError):
        kind = "cpu"  # resolve_device reports the bad name
    return PartialState(cpu=kind == "cpu")


def _quiet_loading(state) -> None:
    """The loading progress bars on the main process only."""
    if not state.is_main_process:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def _all_succeeded(state, error: Exception | None) -> bool:
    """Whether every process got through its part. The main process prints its error; another prints its own only
    when it may be its alone (the checks' ValueErrors are the same on every process)."""
    if error is not None and (state.is_main_process or not isinstance(error, ValueError)):
        where = "" if state.is_main_process else f"process {state.process_index}: "
        print(f"error: {where}{error}", file=sys.stderr)
    return _sum(state, [float(error is not None)])[0] == 0


def _remaining(state, folder: Path, jobs: list[ImageJob]) -> list[int]:
    """Positions in `jobs` of the images still to make, as the main process finds them (after removing what a killed
    run left half-written), shared with every process."""
    from accelerate.utils import broadcast_object_list

    todo = [None]
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        image_folder.remove_leftovers(folder)
        todo = [[i for i, job in enumerate(jobs) if not image_folder.is_complete(folder, job.row)]]
    if state.num_processes > 1:
        broadcast_object_list(todo)
    return todo[0]


def _generate(
    state, pipeline, jobs: list[ImageJob], todo: list[int], batch_size: int, device: torch.device, folder: Path
):
    """This process's batches, in rounds shared by all processes; returns (images made by all, seconds), or
    `(None, seconds)` when a process failed."""
    work = batches([jobs[i] for i in todo], batch_size)
    mine = work[state.process_index :: state.num_processes]
    rounds = -(-len(work) // state.num_processes)
    bar = tqdm(
        total=len(jobs), initial=len(jobs) - len(todo), desc="images", unit="image", disable=not state.is_main_process
    )
    start, made = time.perf_counter(), 0
    for round_ in range(rounds):
        count, error = 0, None
        if round_ < len(mine):
            try:
                count = _make(pipeline, mine[round_], device, folder)
            except (ValueError, OSError, RuntimeError) as caught:
                error = caught
                print(f"error: process {state.process_index}: {caught}", file=sys.stderr)
        count, failed = _sum(state, [float(count), float(error is not None)])
        made += int(count)
        bar.update(int(count))
        if failed:
            bar.close()
            return None, time.perf_counter() - start
    bar.close()
    return made, time.perf_counter() - start


def _make(pipeline, batch: list[ImageJob], device: torch.device, folder: Path) -> int:
    seeds = [job.seed for job in batch]
    output = pipeline(**call_arguments(batch), generator=options.generators(seeds, device))
    for job, image in zip(batch, output.images):
        image_folder.write_image(folder, job.row, image)
    return len(batch)


def _sum(state, values: list[float]) -> list[float]:
    """`values` added up over the processes (every process must call it the same number of times)."""
    if state.num_processes == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _end(state) -> None:
    """Leave the process group (the last round's sum already waited for every process's images)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
