"""IF's timestep respacing: the original's named presets as their section strings, and guided-diffusion's
`space_timesteps` that expands them."""

from __future__ import annotations

import operator
from collections.abc import Sequence

# deepfloyd_if/modules/base.py `respacing_modes`: step counts per equal section of the 1000 training steps.
RESPACING_PRESETS = {
    "fast27": "10,10,3,2,2",
    "smart27": "7,4,2,1,2,4,7",
    "smart50": "10,6,4,3,2,2,3,4,6,10",
    "smart100": "1,1,1,1,2,2,2,2,2,2,3,3,4,4,5,5,6,7,7,8,9,10,13",
    "smart185": "1,1,2,2,2,3,3,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20",
    "super27": "1,1,1,1,1,1,1,2,5,13",  # super* are for super-resolution stages
    "super40": "2,2,2,2,2,2,3,4,6,15",
    "super100": "4,4,6,6,8,8,10,10,14,30",
}


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The training steps kept when `[0, num_timesteps)` is cut into equal sections and section `i` is strided to
    `section_counts[i]` steps (guided-diffusion's `respace.space_timesteps`; "ddimN" takes a fixed stride).

    Returns the steps in descending order, as schedulers consume them.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))[::-1]
            raise ValueError(f"section_counts={section_counts!r}: no integer stride gives {desired} steps")
        section_counts = [int(count) for count in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    steps, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"section_counts={list(section_counts)}: cannot take {count} steps from a section of {size}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Accumulated, not `stride * j`: the float sums differ in the last bit and round to other steps
            # (super40 would take 950 where the original takes 949).
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps), reverse=True)


def resolve_timesteps(timesteps: str | Sequence[int] | None, num_train_timesteps: int) -> list[int] | None:
    """`timesteps=` of the pipelines: a preset name, a section string ("10,10,3"), "ddimN", or explicit steps.

    Explicit steps must be distinct integers in `[0, num_train_timesteps)` in descending order.
    """
    if timesteps is None:
        return None
    if isinstance(timesteps, str):
        spec = RESPACING_PRESETS.get(timesteps, timesteps)
        if not (spec.startswith("ddim") or all(part.strip().isdigit() for part in spec.split(","))):
            raise ValueError(
                f"timesteps={timesteps!r} is not a preset: expected one of {sorted(RESPACING_PRESETS)}, a section "
                "string such as '10,10,3', 'ddimN', or a list of integers"
            )
        try:
            steps = space_timesteps(num_train_timesteps, spec)
        except ValueError as error:
            raise ValueError(f"timesteps={timesteps!r}: {error}") from None
        if not steps:
            raise ValueError(f"timesteps={timesteps!r} keeps no step: give at least one section a positive count")
        return steps
    try:  # integers only: 500.7 is not silently cut to 500
        steps = [operator.index(t) for t in timesteps]
    except TypeError:
        raise ValueError(
            f"timesteps={timesteps!r}: expected a preset name {sorted(RESPACING_PRESETS)}, a section string, or a list "
            "of integers (for a number of steps, use num_inference_steps)"
        ) from None
    if not steps or steps != sorted(set(steps), reverse=True) or steps[0] >= num_train_timesteps or steps[-1] < 0:
        raise ValueError(
            f"timesteps={steps}: expected distinct integers in [0, {num_train_timesteps}) in descending order"
        )
    return steps
