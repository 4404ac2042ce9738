"""Several processes (`torchrun`, `accelerate launch`) as one job: accelerate's process state, joined on any
device, and the loading progress bars of the main process only."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import PartialState


def process_state(cpu: bool) -> PartialState:
    """accelerate's view of the processes, joining the process group that `torchrun` or `accelerate launch` set up:
    on GPUs as accelerate does by default (NCCL, one GPU per process), and with `cpu` over gloo (accelerate joins a
    group on the CPU only when told so; each process would otherwise run alone)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def quiet_loading(state: PartialState) -> None:
    """Model loading's progress bars on the main process only."""
    if not state.is_main_process:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
