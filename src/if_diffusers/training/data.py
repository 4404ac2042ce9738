"""Training data for IF's UNets: a folder of captioned images, any `(image, caption)` dataset, the resumable batch
order the trainer draws from, and the captions' T5 embeddings (computed once, optionally cached on disk).

Images are used at the size they have: a size other than the training resolution is an error, never a silent resize
(resize and crop beforehand, as you want them). Every check reads the files once, before any model runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
import PIL.Image
import safetensors.torch
import torch

from ..atomic_folder import atomic_file
from ..image_processing import IMAGE_SUFFIXES, to_image_tensor

CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("prompt", "text", "caption")  # an imagefolder's caption column, when none is named


class CaptionedDataset(Protocol):
    """What `train` takes: `len(dataset)` and `dataset[i]` -> `(PIL image, caption)` or an object with `.image` and
    `.caption` (`if_diffusers.synthetic.shapes.Example`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class CaptionedImageFolder:
    """Images of one folder with their captions, all `resolution` x `resolution` (or made so, with `resize`).

    Layouts: image files (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`) and exactly one caption file naming each image
    once:

    * `captions.jsonl`: one JSON object per line, `{"file": "0001.png", "caption": "a red circle"}`;
    * `captions.csv`: a header line `file,caption`, then one row per image (quote captions holding commas);
    * a Hugging Face `imagefolder` dataset (what `if-diffusers batch` writes): `metadata.jsonl` (or `metadata.csv`)
      with a `file_name` (relative to the folder, subfolders allowed) and the caption in `caption_column`, by default
      the first of `CAPTION_COLUMNS` the rows have.

    Checked at construction, each failure a ValueError naming the file: a missing, duplicated or malformed caption
    entry, a caption whose file does not exist, an image file without caption, an image PIL cannot read, and an image
    whose size is not `resolution` x `resolution` unless `resize` (otherwise nothing is resized: resize beforehand).
    With `resize`, each image's short side is resized to `resolution` (bicubic, antialiased) and its centre cropped
    square (`resize_and_crop`), as diffusers' training scripts' `--resolution --center_crop`. Items are
    `(RGB PIL image, caption)`, in the caption file's order.
    """

    def __init__(self, folder: str | Path, resolution: int, caption_column: str | None = None, resize: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"folder={str(folder)!r} is not a folder; expected a folder of images and captions")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution={resolution!r}: expected a positive int")
        self.resolution, self.resize = resolution, resize
        entries, caption_file = _read_captions(self.folder, caption_column)
        names = {name for name, _ in entries}
        pattern = "**/*" if caption_file.stem == "metadata" else "*"  # imagefolder rows may name subfolders' files
        found = [p.relative_to(self.folder) for p in self.folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES]
        images = sorted(p.as_posix() for p in found if not any(part.startswith(".") for part in p.parts))
        uncaptioned = [name for name in images if name not in names]
        if uncaptioned:
            raise ValueError(
                f"{self.folder / uncaptioned[0]} has no caption ({len(uncaptioned)} image(s) without one); "
                f"expected an entry for every image in {caption_file.name}"
            )
        for name, _ in entries:
            _check_image_file(self.folder / name, None if resize else resolution)
        self.files = [name for name, _ in entries]
        self.captions = [caption for _, caption in entries]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[PIL.Image.Image, str]:
        with PIL.Image.open(self.folder / self.files[index]) as image:
            image = image.convert("RGB")
        return (resize_and_crop(image, self.resolution) if self.resize else image), self.captions[index]


class ColumnsDataset:
    """A `datasets.Dataset` (or any sequence of dicts) read as `(RGB PIL image, caption)` from two of its columns, as
    diffusers' training scripts read `--image_column` and `--caption_column`; `resize` as `CaptionedImageFolder`'s."""

    def __init__(self, dataset: Sequence[dict[str, Any]], image_column: str, caption_column: str, resolution: int,
                 resize: bool = False):  # fmt: skip
        if len(dataset) < 1:
            raise ValueError(
                f"the dataset ({type(dataset).__name__}) is empty; expected at least one (image, caption)"
            )
        columns = getattr(dataset, "column_names", None) or list(dataset[0])
        for option, name in (("image_column", image_column), ("caption_column", caption_column)):
            if name not in columns:
                raise ValueError(f"{option}={name!r} is not a column of the dataset; it has {columns}")
        captions = (
            list(dataset[caption_column]) if hasattr(dataset, "column_names") else [r[caption_column] for r in dataset]
        )
        bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise ValueError(f"row {bad} of column {caption_column!r} is {captions[bad]!r}; expected a caption string")
        self.dataset, self.image_column, self.captions = dataset, image_column, captions
        self.resolution, self.resize = resolution, resize

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[PIL.Image.Image, str]:
        image = self.dataset[index][self.image_column]
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(
                f"row {index} of column {self.image_column!r} is a {type(image).__name__}; expected an image"
            )
        image = image.convert("RGB")
        return (resize_and_crop(image, self.resolution) if self.resize else image), self.captions[index]


def load_columns_dataset(name: str, image_column: str, caption_column: str | None, resolution: int,
                         resize: bool = False) -> ColumnsDataset:  # fmt: skip
    """A `datasets` dataset as `ColumnsDataset`: a folder `save_to_disk` wrote (`load_from_disk`) or a hub id
    (`load_dataset`), its "train" split when it has splits; the caption column by default the first of
    `CAPTION_COLUMNS` it has."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"dataset {name!r}: reading it needs the datasets package (pip install 'if-diffusers[datasets]')"
        ) from None
    dataset = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"dataset {name!r} has the splits {list(dataset)}; expected a 'train' split")
        dataset = dataset["train"]
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in dataset.column_names), None)
        if caption_column is None:
            raise ValueError(f"dataset {name!r} has none of the caption columns {list(CAPTION_COLUMNS)} (it has "
                             f"{dataset.column_names}); name yours with caption_column (--caption-column)")  # fmt: skip
    return ColumnsDataset(dataset, image_column, caption_column, resolution, resize)


def resize_and_crop(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """`image` with its short side resized to `resolution` (bicubic, antialiased when shrinking), then its centre
    cropped to `resolution` x `resolution`."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, PIL.Image.Resampling.BICUBIC) if size != image.size else image
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _read_captions(folder: Path, caption_column: str | None) -> tuple[list[tuple[str, str]], Path]:
    """`([(file name, caption)], caption file)` from the folder's one caption file; malformed or duplicated entries,
    and entries naming a missing file, are ValueErrors naming the caption file."""
    present = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(present) != 1:
        found = [p.name for p in present] or "none"
        raise ValueError(f"{folder} has caption files {found}; expected exactly one of {list(CAPTION_FILES)}")
    path = present[0]
    if caption_column is not None and path.stem != "metadata":
        raise ValueError(f"caption_column={caption_column!r} names a column of metadata.jsonl/.csv; {path.name} has "
                         "'file' and 'caption'")  # fmt: skip
    rows = _caption_rows(path)
    if not rows:
        raise ValueError(f"{path} has no entries; expected one per image")
    file_key, caption_key = ("file", "caption") if path.stem == "captions" else ("file_name", caption_column)
    if caption_key is None:
        first = rows[0] if isinstance(rows[0], dict) else {}
        caption_key = next((c for c in CAPTION_COLUMNS if isinstance(first.get(c), str)), None)
        if caption_key is None:
            raise ValueError(f"{path} has none of the caption columns {list(CAPTION_COLUMNS)} in its first row "
                             f"({sorted(first)}); name yours with caption_column (--caption-column)")  # fmt: skip
    entries, seen = [], set()
    for number, row in enumerate(rows, start=1):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get(file_key), str)
            or not isinstance(row.get(caption_key), str)
        ):
            raise ValueError(f"{path} entry {number} is {row!r}; expected a {file_key!r} and a {caption_key!r} string")
        name = PurePosixPath(row[file_key]).as_posix()
        if name in seen:
            raise ValueError(f"{path} names {name!r} twice; expected one caption per image")
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or not (folder / name).is_file():
            raise ValueError(f"{path} entry {number} names {name!r}, which is not a file in {folder}")
        seen.add(name)
        entries.append((name, row[caption_key]))
    return entries, path


def _caption_rows(path: Path) -> list:
    """The rows of a caption file: one JSON value a non-blank line (.jsonl), or a dict a CSV row after a header that
    names the layout's columns (.csv)."""
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number} is not JSON ({error})") from error
        return rows
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    needs = {"file", "caption"} if path.stem == "captions" else {"file_name"}
    if reader.fieldnames is None or not needs <= set(reader.fieldnames):
        raise ValueError(f"{path} has header {reader.fieldnames}; expected columns {sorted(needs)}")
    return rows


def _check_image_file(path: Path, resolution: int | None) -> None:
    """Readable by PIL (decoded in full: a truncated file fails here, not mid-training) and square at `resolution`
    (any size when `None`)."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            size = image.size
    except (OSError, PIL.UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image ({error})") from error
    if resolution is not None and size != (resolution, resolution):
        raise ValueError(
            f"{path} is {size[0]}x{size[1]}; expected {resolution}x{resolution} (the training resolution): "
            "resize and crop the images beforehand, or ask for it (resize, --resize)"
        )


def image_and_caption(item: Any, index: int) -> tuple[PIL.Image.Image, str]:
    """A dataset item as `(image, caption)`: a pair, or an object with `.image` and `.caption` (`Example`)."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        image, caption = item
    elif hasattr(item, "image") and hasattr(item, "caption"):
        image, caption = item.image, item.caption
    else:
        raise TypeError(f"dataset[{index}] is a {type(item).__name__}; expected (PIL image, caption) or an Example")
    if not isinstance(image, PIL.Image.Image) or not isinstance(caption, str):
        raise TypeError(
            f"dataset[{index}] holds ({type(image).__name__}, {type(caption).__name__}); expected (PIL image, str)"
        )
    return image, caption


def dataset_captions(dataset: CaptionedDataset) -> list[str]:
    """Every item's caption, in order: `dataset.captions` when it has that list (`CaptionedImageFolder`), the shape
    records for `ShapesDataset` (no rendering), else by reading every item."""
    from ..synthetic.shapes import ShapesDataset, sample_record

    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and len(captions) == len(dataset):
        return captions
    if isinstance(dataset, ShapesDataset):
        return [sample_record(i, dataset.seed, dataset.held_out).caption for i in range(len(dataset))]
    return [image_and_caption(dataset[i], i)[1] for i in range(len(dataset))]


def to_training_tensor(image: PIL.Image.Image, resolution: int, index: int) -> torch.Tensor:
    """RGB `(3, resolution, resolution)` float32 in `[-1, 1]`; another size is a ValueError (nothing is resized)."""
    if image.size != (resolution, resolution):
        raise ValueError(
            f"dataset[{index}] is {image.size[0]}x{image.size[1]}; expected {resolution}x{resolution} (the training "
            "resolution): resize the images beforehand, nothing is resized during training"
        )
    return to_image_tensor(image, f"dataset[{index}]")[0]


@dataclass
class CollateImages:
    """`[(image, caption)]` -> `((B, 3, R, R) in [-1, 1], [caption])` (a class: worker processes pickle it)."""

    resolution: int

    def __call__(self, items: Sequence[tuple[int, Any]]) -> tuple[torch.Tensor, list[str]]:
        pairs = [(index, *image_and_caption(item, index)) for index, item in items]
        images = torch.stack([to_training_tensor(image, self.resolution, index) for index, image, _ in pairs])
        return images, [caption for _, _, caption in pairs]


class IndexedItems(torch.utils.data.Dataset):
    """`dataset[i]` -> `(i, dataset[i])`, so that errors name the item."""

    def __init__(self, dataset: CaptionedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class ResumableBatches(torch.utils.data.Sampler):
    """Index batches of successive micro-steps (forever) from the data stream's position `start`, a pure function of
    `(seed, position)`.

    The items form one stream: epoch `e` is `torch.randperm(length)` seeded with `(seed, e)`, epochs back to back.
    Each micro-step takes the next `B * P` positions for all `P` processes, and process `p` its slice
    `[p * B, (p + 1) * B)` of them: every item is seen once per epoch across processes, and a run resumed at a
    position continues the exact order of an uninterrupted one, on any number of processes (the position is what all
    processes have taken).
    """

    def __init__(self, length: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, processes: int = 1):
        if length < 1:
            raise ValueError("dataset is empty; expected at least one item")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.rank, self.processes = start, rank, processes
        self._epochs: dict[int, list[int]] = {}

    def _item(self, position: int) -> int:
        epoch = position // self.length
        if epoch not in self._epochs:
            self._epochs = {epoch: _permutation(self.length, self.seed, epoch)}  # one epoch at a time in memory
        return self._epochs[epoch][position % self.length]

    def __iter__(self) -> Iterator[list[int]]:
        first = self.start + self.rank * self.batch_size
        while True:
            yield [self._item(position) for position in range(first, first + self.batch_size)]
            first += self.batch_size * self.processes


def _permutation(length: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(length, generator=generator).tolist()


# --- T5 embeddings of the captions ------------------------------------------------------------------------------


def _fingerprint(tokenizer, text_encoder, max_sequence_length: int) -> str:
    """What the embeddings depend on besides the caption: the tokenizer's class and vocabulary, the encoder's config,
    dtype and weights (summarised by each parameter's float64 sum: hashing billions of bytes would take longer than
    encoding), the token count, and the caption cleaning (always on, as at inference)."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(text_encoder.config.to_json_string(use_diff=False).encode())
    digest.update(f"{text_encoder.dtype} {max_sequence_length} clean_caption=True".encode())
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in text_encoder.parameters()])
    digest.update(sums.cpu().numpy().tobytes())
    return digest.hexdigest()


def embed_captions(
    captions: Sequence[str],
    tokenizer,
    text_encoder,
    max_sequence_length: int = 77,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """`{caption: (L, D) T5 embedding on the CPU}` for each distinct caption, encoded exactly as the pipelines encode
    prompts at inference (`encode_prompt` with `clean_caption=True`, padded to `max_sequence_length` tokens).

    With `cache_dir`, each embedding is a file `<sha256>.safetensors` keyed by the tokenizer, the encoder (config,
    dtype, weights), the token count and the caption: cached ones are read, not encoded; new ones are written
    atomically (several processes may share the folder). T5 runs on its own device, in `batch_size` captions at a time.
    """
    from ..pipelines.conditioning import PromptConditioningMixin

    class _Encoder(PromptConditioningMixin):  # encode_prompt needs only these two components
        def __init__(self):
            self.tokenizer, self.text_encoder = tokenizer, text_encoder

    unique = list(dict.fromkeys(captions))
    table: dict[str, torch.Tensor] = {}
    folder, key = None, None
    if cache_dir is not None:
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = _fingerprint(tokenizer, text_encoder, max_sequence_length)
        key = {c: hashlib.sha256(f"{prefix}\0{c}".encode()).hexdigest() for c in unique}
        for caption in unique:
            path = folder / f"{key[caption]}.safetensors"
            if path.is_file():
                table[caption] = safetensors.torch.load_file(path)["embedding"]
    missing = [c for c in unique if c not in table]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        embeds, _ = _Encoder().encode_prompt(chunk, do_classifier_free_guidance=False, device=text_encoder.device,
                                             clean_caption=True, max_sequence_length=max_sequence_length)  # fmt: skip
        for caption, embedding in zip(chunk, embeds.cpu()):
            table[caption] = embedding.contiguous()
            if folder is not None:
                path = folder / f"{key[caption]}.safetensors"
                with atomic_file(path) as partial:
                    safetensors.torch.save_file({"embedding": table[caption]}, partial)
    return table
