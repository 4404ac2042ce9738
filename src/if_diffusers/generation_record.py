"""What made an image, recorded so that it can be made again to the same pixels: the models, the prompt, the image's
own seed and every cascade argument, written into the PNG's text metadata (`if_diffusers` chunk, JSON) by the app
and read back by `if-diffusers generate --settings image.png` and `GenerationRecord.from_png`.

    record = GenerationRecord.from_png("candidate.png")
    images = record.replay(pipeline).images   # the same pixels, on the same device and dtype

img2img and inpainting record the SHA-256 of the source image's and the mask's pixels (not the images): a replay
needs them passed again, and checks them. The same pixels need the same kind of device and dtype (recorded and
checked). On the CPU a candidate drawn among 4 replays alone to the pixel (tested); on CUDA, whose kernels depend on
the batch size, it may differ from its batch's image in the last bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch

PNG_KEY = "if_diffusers"  # the PNG text chunk holding the record's JSON
MODES = ("text2img", "img2img", "inpaint")
REPLAYED_ARGUMENTS = frozenset({  # the cascade keyword arguments a record may carry
    "stage_1_timesteps", "stage_1_num_inference_steps", "stage_1_guidance_scale", "stage_1_strength",
    "stage_2_timesteps", "stage_2_num_inference_steps", "stage_2_guidance_scale", "stage_2_strength",
    "stage_2_noise_level", "stage_2_low_res_consistency_factor", "stage_3_num_inference_steps",
    "stage_3_guidance_scale", "stage_3_noise_level", "height", "width",
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GenerationRecord:
    """One image's settings.

    Attributes:
        prompt, negative_prompt: the text (`negative_prompt` `None` for none).
        seed: this image's own generator seed (`torch.Generator(device).manual_seed(seed)`).
        mode: "text2img", "img2img" or "inpaint".
        arguments: the cascade's keyword arguments (`REPLAYED_ARGUMENTS`), every default made explicit.
        last_stage: the stage whose image this is (1 for a stage I candidate), `None` for the cascade's last.
        models: {"model", "stage_2", "stage_3"}: hub ids or folders as loaded ("if_diffusers/demo_model" for the
            bundled cascade).
        dtype: the models' dtype ("float32", ...); device: the kind of device the noise was drawn on ("cpu",
            "cuda", ...: another draws other noise); package_version: if-diffusers' version that made it.
        image_sha256, mask_sha256: img2img / inpainting: `pixels_sha256` of the source image and mask.
    """

    prompt: str
    negative_prompt: str | None
    seed: int
    mode: str
    arguments: dict[str, Any]
    last_stage: int | None = None
    models: dict[str, str | None] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    device: str = "cpu"
    package_version: str = ""
    image_sha256: str | None = None
    mask_sha256: str | None = None

    def __post_init__(self):
        expected = {"prompt": str, "seed": int, "arguments": dict, "models": dict, "dtype": str, "device": str}
        for name, kind in expected.items():
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: expected a value of type {kind.__name__}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed={self.seed}: expected a whole number in [0, 2**64)")
        if self.last_stage not in (None, 1, 2, 3):
            raise ValueError(f"last_stage={self.last_stage!r}: expected 1, 2, 3 or None")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: expected float32, float16 or bfloat16")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        unknown = sorted(set(self.arguments) - REPLAYED_ARGUMENTS)
        if unknown:
            raise ValueError(f"arguments has {unknown}: expected only cascade arguments {sorted(REPLAYED_ARGUMENTS)}")
        if (self.mode == "text2img") != (self.image_sha256 is None) or (self.mode == "inpaint") != (
            self.mask_sha256 is not None
        ):
            raise ValueError(f"mode={self.mode!r}: the record's image_sha256 / mask_sha256 do not fit it")

    # --- as text ------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "settings") -> GenerationRecord:
        """ValueError naming `source` for text that is not a record."""
        try:
            fields = json.loads(text)
            if isinstance(fields, list):
                raise ValueError(f"{source}: holds the settings of {len(fields)} images; keep the one to make again")
            return cls(**fields)
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{source}: not if-diffusers generation settings ({error})") from None

    def png_info(self) -> PIL.PngImagePlugin.PngInfo:
        """The PNG text chunks: `if_diffusers` (this record's JSON) and `parameters` (a one-line summary)."""
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(PNG_KEY, self.to_json())
        info.add_text("parameters", self.summary())
        return info

    def attach(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """`image` with this record in `image.info` (kept by PIL's and gradio's PNG encoders)."""
        image.info[PNG_KEY] = self.to_json()
        image.info["parameters"] = self.summary()
        return image

    @classmethod
    def from_png(cls, path: str | Path) -> GenerationRecord:
        """The record in a PNG written with `png_info` or `attach`; ValueError for a file without one."""
        try:
            with PIL.Image.open(path) as image:
                text = image.info.get(PNG_KEY)
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from None
        if text is None:
            raise ValueError(f"{path}: has no if-diffusers settings (no {PNG_KEY!r} PNG text chunk)")
        return cls.from_json(text, str(path))

    @classmethod
    def read(cls, path: str | Path) -> GenerationRecord:
        """From a `.json` file of `to_json`, or a PNG carrying one."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            try:
                return cls.from_json(path.read_text(), str(path))
            except OSError as error:
                raise ValueError(f"{path}: cannot be read ({error.strerror})") from None
        return cls.from_png(path)

    def summary(self) -> str:
        negative = f" | negative: {self.negative_prompt}" if self.negative_prompt else ""
        settings = ", ".join(f"{k}: {v}" for k, v in sorted(self.arguments.items()))
        return f"{self.prompt}{negative} | seed: {self.seed} | mode: {self.mode} | {settings}"

    # --- making it again ----------------------------------------------------------------------------------------

    def check_images(self, image: PIL.Image.Image | None, mask: PIL.Image.Image | None) -> None:
        """The source image and mask a replay is given are the recorded ones (ValueError naming the argument)."""
        for name, given, recorded in (("image", image, self.image_sha256), ("mask_image", mask, self.mask_sha256)):
            if recorded is None and given is not None:
                raise ValueError(f"{name} was given, but these settings are {self.mode}, which takes none")
            if recorded is not None and given is None:
                raise ValueError(f"these settings are {self.mode}: pass the {name} they were made from")
            if recorded is not None and pixels_sha256(given) != recorded:
                raise ValueError(f"{name} differs from the one these settings were made from (its pixels' SHA-256 "
                                 f"is not {recorded[:12]}...)")  # fmt: skip

    def call_arguments(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The cascade's keyword arguments for this image (prompt, generator and all; not the images)."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, last_stage=self.last_stage,
                    generator=torch.Generator(device).manual_seed(self.seed), **self.arguments)  # fmt: skip

    def replay(self, pipeline, image: PIL.Image.Image | None = None, mask_image: PIL.Image.Image | None = None,
               **kwargs: Any):  # fmt: skip
        """`pipeline(...)` (an `IFCascadePipeline` holding the recorded models) with this record's arguments."""
        image = None if image is None else image.convert("RGB")
        mask_image = None if mask_image is None else mask_image.convert("L")  # as the app hashed it
        self.check_images(image, mask_image)
        device = pipeline._execution_device
        if device.type != self.device:
            raise ValueError(f"these settings drew their noise on {self.device}; the pipeline runs on {device.type}, "
                             f"which draws other noise: run it on {self.device}")  # fmt: skip
        inputs = {} if image is None else {"image": image}
        if mask_image is not None:
            inputs["mask_image"] = mask_image
        return pipeline(**self.call_arguments(device), **inputs, **kwargs)

    def command_line(self) -> str:
        """The `if-diffusers generate` command that makes this image again from its PNG (or the settings saved as
        JSON): the models, dtype and every setting come from the record; img2img needs the source file again."""
        files = {"text2img": "", "img2img": " --image SOURCE.png", "inpaint": " --image SOURCE.png --mask MASK.png"}
        return f"if-diffusers generate --settings IMAGE.png{files[self.mode]} -o again.png"


BUNDLED_MODEL = "if_diffusers/demo_model"  # the model id recorded for the cascade bundled in the package


def pixels_sha256(image: PIL.Image.Image) -> str:
    """SHA-256 of an image's size and 8-bit pixels: of its RGB for a colour image, its L for a one-channel one (a
    mask: pass it as "L", as the app and `replay` do)."""
    array = np.asarray(image.convert("L" if image.mode in ("L", "1") else "RGB"))
    return hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()
