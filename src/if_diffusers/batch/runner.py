"""One batch run on every process accelerate starts (`accelerate launch`, `torchrun`, or a single plain process).

Each process reads and checks the prompt file, loads the cascade once and checks every line's call with it. The
main process removes what a killed run left half-written; each process then checks its share of the images an
earlier run made, and all take their share of the remaining batches (batch `b` to process `b % N`). After each
round of batches the processes add up what they made, which moves the one progress bar (main process) and stops
every process if one failed. The main process writes `metadata.jsonl` at the end. On the CPU the processes join
through gloo (`PartialState(cpu=True)`), on GPUs as accelerate sets them up (NCCL, one GPU per process).

Every step that can fail on one process ends in a collective that tells all of them, so that a failure is one
error line and exit code 1 everywhere, never processes waiting for one that has gone.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import generation_options as options
from ..processes import process_state, quiet_loading
from . import image_folder
from .jobs import ImageJob, RunDefaults, batches, call_arguments, check_calls, plan_jobs
from .prompt_file import read_prompt_file

EXPECTED_ERRORS = (ValueError, OSError)  # a one-line message; anything else also prints its traceback


def run_batch(args: argparse.Namespace) -> int:
    """`if-diffusers batch` with checked options; 0 when every image of the prompt file is in the output folder."""
    state = _process_state(args.device)
    try:
        return _run(state, args, Path(args.output))
    finally:
        _end(state)


def _run(state, args: argparse.Namespace, folder: Path) -> int:
    ok, prepared = _agree(state, lambda: _prepare(state, args, folder))
    if not ok:
        return 1
    pipeline, jobs, device = prepared
    if not _agree(state, lambda: _clear(state, folder))[0]:
        return 1
    ok, shares = _agree(state, lambda: _completed(state, folder, jobs), shared=True)
    if not ok:
        return 1
    done = {i for share in shares for i in share}
    todo = [i for i in range(len(jobs)) if i not in done]
    if todo and not _agree(state, lambda: state.is_main_process and image_folder.remove_metadata(folder))[0]:
        return 1
    made, seconds = _generate(state, pipeline, jobs, todo, args.batch_size, device, folder)
    if made is None:
        return 1
    if state.is_main_process:
        try:
            path = image_folder.write_metadata(folder, [job.row for job in jobs])
        except EXPECTED_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        rate = f", {made / seconds:.3g} images/s" if made else ""
        print(f"made {made} images in {seconds:.1f} s on {state.num_processes} process(es){rate}; "
              f"kept {len(jobs) - len(todo)} of an earlier run")  # fmt: skip
        print(f"wrote {path}")
    return 0


def _prepare(state, args: argparse.Namespace, folder: Path):
    """The prompt file read, the output folder and device checked, the cascade loaded and every line's call checked
    by it: `(pipeline, jobs, device)`."""
    lines = read_prompt_file(args.prompts)
    counts = [line.num_images or args.num_images for line in lines]
    names = {image_folder.image_name(line.number, k) for line, count in zip(lines, counts) for k in range(count)}
    image_folder.check_output_folder(folder, names)
    device, dtype = options.resolve_device(args.device, args.dtype, args.offload)
    if state.num_processes > 1 and device.index is not None:
        raise ValueError(f"--device {args.device}: with {state.num_processes} processes each takes its own device "
                         f"({state.device.type}:LOCAL_RANK); pass --device {device.type}")  # fmt: skip
    if device.index is None and device.type == state.device.type:
        device = state.device  # cuda:LOCAL_RANK
    quiet_loading(state)
    prompts = [line.prompt for line in lines] if state.is_main_process else []  # warn once about unknown words
    pipeline = options.load_cascade(args, dtype, device, prompts)
    pipeline.set_progress_bar_config(disable=True)  # one bar counts the images
    record = {
        **options.model_ids(args),
        "dtype": str(dtype).removeprefix("torch."),
        **({"quantize_text_encoder": args.quantize_text_encoder} if args.quantize_text_encoder else {}),
        "if_diffusers_version": __version__,
    }
    defaults = RunDefaults(args.seed, args.num_images, args.negative_prompt,
                           lambda mode: options.call_settings(args, pipeline.has_stage_3, mode), record)  # fmt: skip
    jobs = plan_jobs(lines, defaults, Path(args.prompts))
    check_calls(pipeline, jobs, Path(args.prompts))
    return pipeline, jobs, device


def _clear(state, folder: Path) -> None:
    """The main process makes the folder and removes what a killed run left half-written."""
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        image_folder.remove_leftovers(folder)


def _completed(state, folder: Path, jobs: list[ImageJob]) -> list[int]:
    """The positions of this process's share of `jobs` (every N-th) whose images an earlier run completed."""
    share = range(state.process_index, len(jobs), state.num_processes)
    return [i for i in share if image_folder.is_complete(folder, jobs[i].row)]


def _process_state(device: str | None):
    """accelerate's view of the processes: joined over gloo when this job runs on the CPU."""
    try:
        kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, ValueError):
        kind = "cpu"  # resolve_device reports the bad name
    return process_state(cpu=kind == "cpu")


def _agree(state, step, bar: tqdm | None = None, shared: bool = False) -> tuple[bool, object]:
    """`step()` on every process, then whether all succeeded: `(True, its result)` (with `shared`, the list of every
    process's result), or `(False, None)` on every process when one failed (each distinct error printed once, by the
    main process, naming the processes it came from, after closing `bar`)."""
    try:
        result, error = step(), None
    except EXPECTED_ERRORS as caught:
        result, error = None, str(caught)
    except Exception as caught:  # a bug or a machine fault: its traceback, then stop every process
        traceback.print_exc()
        result, error = None, f"{type(caught).__name__}: {caught}"
    outcomes = _gather(state, [(error, result if shared else None)])
    errors = [e for e, _ in outcomes]
    if bar is not None and any(e is not None for e in errors):
        bar.close()
    if state.is_main_process:
        for message in dict.fromkeys(e for e in errors if e is not None):
            ranks = [i for i, e in enumerate(errors) if e == message]
            where = "" if len(ranks) == state.num_processes else f"process {', '.join(map(str, ranks))}: "
            print(f"error: {where}{message}", file=sys.stderr)
    if any(e is not None for e in errors):
        return False, None
    return True, [r for _, r in outcomes] if shared else result


def _generate(state, pipeline, jobs: list[ImageJob], todo: list[int], batch_size: int, device: torch.device,
              folder: Path) -> tuple[int | None, float]:  # fmt: skip
    """This process's batches, in rounds shared by all processes; returns (images made by all, seconds), or
    `(None, seconds)` when a process failed."""
    work = batches([jobs[i] for i in todo], batch_size)
    mine = work[state.process_index :: state.num_processes]
    rounds = -(-len(work) // state.num_processes)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="images", unit="image",
               disable=not state.is_main_process)  # fmt: skip
    start, made = time.perf_counter(), 0
    for round_ in range(rounds):
        step = lambda: _make(pipeline, mine[round_], device, folder) if round_ < len(mine) else 0  # noqa: E731
        ok, counts = _agree(state, step, bar, shared=True)
        if not ok:
            return None, time.perf_counter() - start
        made += sum(counts)
        bar.update(sum(counts))
    bar.close()
    return made, time.perf_counter() - start


def _make(pipeline, batch: list[ImageJob], device: torch.device, folder: Path) -> int:
    output = pipeline(**call_arguments(batch), generator=options.generators([job.seed for job in batch], device))
    for job, image in zip(batch, output.images):
        image_folder.write_image(folder, job.row, image)
    return len(batch)


def _gather(state, values: list) -> list:
    """`values` of every process, concatenated in process order (a collective: every process calls it alike)."""
    if state.num_processes == 1:
        return values
    import torch.distributed as dist

    gathered: list = [None] * state.num_processes
    dist.all_gather_object(gathered, values)
    return [value for share in gathered for value in share]


def _end(state) -> None:
    """Leave the process group (the last round's collectives already waited for every process's images)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
