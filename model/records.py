"""Grounding records: the JSONL format for real data, its reader and writer, and the training streams.

Format: one JSON object per line (UTF-8; blank lines are skipped):

    {"image": "images/000000.png",          # path relative to the JSONL file's folder, or absolute
     "width": 334, "height": 289,           # pixel size of the image (ints > 0)
     "caption": "a small purple triangle",  # str, or null when the source has none (e.g. RefCOCO)
     "regions": [                           # possibly empty
        {"box": [92.0, 161.0, 124.0, 193.0],  # x0, y0, x1, y1 in pixels (numbers; x1, y1 exclusive),
                                              # 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height
         "expression": "the triangle"}]}      # non-empty str describing the box

Other fields are allowed and passed through (the COCO converter adds "captions", every caption of the image).

Streams (`ShapesStream`, `RecordsDataset`) yield raw examples, dicts of `image` (PIL RGB), `caption`,
`regions` (boxes as floats), `width`, `height` and `index` (the example's position in the whole stream, over
all ranks and workers: what per-example randomness is seeded with). `_Sharding` splits them over DataLoader
workers and DDP ranks.
"""

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from model.shapes import MAX_OBJECTS, generate_scene, sample_scene, scene_to_record

CROWD_STREAM = 8  # second seed word of the draws that make a scene of the stream crowded (ShapesStream)


class RecordError(ValueError):
    """A record that does not follow the format; the message names `file:line`."""


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def validate_record(record) -> None:
    """Raise ValueError saying what is wrong with `record`, if anything."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
    for key in ("image", "width", "height", "regions"):
        if key not in record:
            raise ValueError(f"missing field {key!r}")
    if not isinstance(record["image"], str) or not record["image"]:
        raise ValueError("'image' must be a non-empty string")
    width, height = record["width"], record["height"]
    if not (_is_size(width) and _is_size(height)):
        raise ValueError(f"'width' and 'height' must be positive integers, got {width!r}, {height!r}")
    if record.get("caption") is not None and not isinstance(record["caption"], str):
        raise ValueError("'caption' must be a string or null")
    if not isinstance(record["regions"], list):
        raise ValueError("'regions' must be a list")
    for i, region in enumerate(record["regions"]):
        box = region.get("box") if isinstance(region, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"regions[{i}].box must be a list of four numbers, got {box!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"regions[{i}].box {box} is not a box inside the {width}x{height} image "
                "(need 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height)"
            )
        expression = region.get("expression")
        if not isinstance(expression, str) or not expression:
            raise ValueError(f"regions[{i}].expression must be a non-empty string")


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a JSONL file, validated; bad input raises RecordError naming `file:line`."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate_record(record)
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise RecordError(f"{path}:{line_no}: {e}") from e
            yield record


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Validate and write `records` as JSONL; returns how many were written."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for count, record in enumerate(records, start=1):
            try:
                validate_record(record)
            except ValueError as e:
                raise RecordError(f"{path}: record {count}: {e}") from e
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return count


def write_shapes(out_dir: str | os.PathLike, count: int, seed: int = 0) -> Path:
    """Write `count` shapes scenes (scene i from seed `seed + i`) as `images/NNNNNN.png` + `records.jsonl`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    def records():
        for i in tqdm(range(count), desc="shapes", unit="scene"):
            scene = generate_scene(seed + i)
            name = f"images/{i:06d}.png"
            scene.image.save(out / name)
            yield scene_to_record(scene, name)

    write_records(out / "records.jsonl", records())
    return out / "records.jsonl"


def load_image(path: str | os.PathLike) -> Image.Image:
    """RGB image the right way up (EXIF orientation applied, as COCO boxes assume)."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


# ---------------------------------------------------------------------------------------------- streams


class _Sharding:
    """Which positions of a stream one DataLoader worker of one DDP rank yields.

    The stream is a sequence of items 0, 1, 2, ... (a scene index, or a position in the shuffled epochs of
    a records file). Rank r of R owns the items r, r + R, r + 2R, ...: its "rank sequence". Within a rank,
    the rank sequence is cut into blocks of `batch_size` and worker w of W yields blocks w, w + W, ...; the
    DataLoader takes one batch from each worker in turn, so it delivers the rank sequence in order, whatever
    the number of workers.

    Resume: `start` is the number of items the rank has consumed so far (steps x per-rank batch size);
    the stream continues with rank-sequence position `start`, exactly where it stopped. Every rank consumes
    the same number per step, so all ranks pass the same `start`.

    Rank and world size are read from torch.distributed when it is initialised at construction time (build
    the dataset after `init_process_group`), else from the arguments (default 0 of 1).
    """

    def __init__(self, start: int, batch_size: int, rank: int | None, world_size: int | None):
        if start < 0 or batch_size < 1:
            raise ValueError(f"need start >= 0 and batch_size >= 1, got {start}, {batch_size}")
        dist = torch.distributed
        if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = rank or 0, world_size or 1
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")
        self.start, self.batch_size = start, batch_size

    def positions(self, length: int | None, worker: int | None = None, num_workers: int | None = None):
        """Stream positions for this shard, in order (bounded by `length` items in all, or endless)."""
        if worker is None:
            info = get_worker_info()
            worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        block = self.start + worker * self.batch_size  # first rank-sequence position of this worker's block
        while True:
            for p in range(block, block + self.batch_size):
                item = p * self.world_size + self.rank
                if length is not None and item >= length:
                    return
                yield item
            block += num_workers * self.batch_size


class ShapesStream(IterableDataset):
    """Generated shapes scenes: item i is `generate_scene(seed_offset + i)`, endless or `num_scenes` long.

    Sharded over workers and ranks as `_Sharding` says: no two shards yield the same scene, and the stream
    is deterministic given (seed_offset, start, rank, world size, batch_size).
    """

    def __init__(
        self,
        seed_offset: int,
        num_scenes: int | None = None,
        start: int = 0,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        curriculum_scenes: int = 0,
        crowd_prob: float = 0.0,
        crowd_objects: tuple[int, ...] = (7, 8),
    ):
        self.seed_offset, self.num_scenes = seed_offset, num_scenes
        self.sharding = _Sharding(start, batch_size, rank, world_size)
        self.curriculum_scenes = curriculum_scenes
        self.crowd_prob, self.crowd_objects = crowd_prob, crowd_objects

    def max_objects(self, i: int) -> int:
        """Curriculum: scene i has at most 1 object at the start, growing linearly to all of the spec's range
        over the first `curriculum_scenes` scenes (issue 4: few objects first)."""
        if i >= self.curriculum_scenes:
            return MAX_OBJECTS
        return min(MAX_OBJECTS, 1 + MAX_OBJECTS * i // self.curriculum_scenes)

    def scene(self, i: int):
        """Scene i of the stream: `generate_scene(seed_offset + i)`, or under the curriculum the first of the
        scenes seeded (seed_offset + i, j), j = 0, 1, ..., with few enough objects (a pure function of i)."""
        limit = self.max_objects(i)
        if limit >= MAX_OBJECTS and self.crowd_prob:
            rng = np.random.default_rng([self.seed_offset + i, CROWD_STREAM])
            if rng.random() < self.crowd_prob:  # a crowded scene: more objects than the spec's 6 (issue 16)
                return sample_scene(rng, count=int(rng.choice(self.crowd_objects)))
        if limit >= MAX_OBJECTS:
            return generate_scene(self.seed_offset + i)
        j = 0
        while len(sample_scene(np.random.default_rng([self.seed_offset + i, j]), render_image=False).objects) > limit:
            j += 1
        return sample_scene(np.random.default_rng([self.seed_offset + i, j]))

    def indices(self, worker: int | None = None, num_workers: int | None = None) -> Iterator[int]:
        """Scene indices this shard yields (worker info from the DataLoader unless given)."""
        return self.sharding.positions(self.num_scenes, worker, num_workers)

    def __iter__(self):
        for i in self.indices():
            scene = self.scene(i)
            regions = [
                {"box": [float(v) for v in obj.box], "expression": expr}
                for obj, expr in zip(scene.objects, scene.expressions, strict=True)
            ]
            yield {
                "image": scene.image,
                # A crowded scene's caption is longer than the captions the model is judged on, and than
                # `tiny`'s 48 positions: it teaches ARef and GCap only.
                "caption": scene.caption if len(scene.objects) <= MAX_OBJECTS else None,
                "regions": regions,
                "width": scene.width,
                "height": scene.height,
                "index": i,
            }


class RecordsDataset(IterableDataset):
    """The records of a JSONL file, epoch after epoch (or `epochs` times), each epoch in its own order.

    Epoch e is shuffled by `numpy.random.default_rng([shuffle_seed, e])` (file order when shuffle_seed is
    None); the epochs are concatenated into one stream and sharded like `ShapesStream`, with the same `start`.
    Records are validated and kept in memory (small dicts); images are read when yielded.
    """

    def __init__(
        self,
        jsonl_path: str | os.PathLike,
        shuffle_seed: int | None = 0,
        epochs: int | None = None,
        start: int = 0,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.path = Path(jsonl_path)
        self.records = list(read_records(self.path))
        if not self.records:
            raise ValueError(f"{self.path}: no records")
        self.shuffle_seed, self.epochs = shuffle_seed, epochs
        self.sharding = _Sharding(start, batch_size, rank, world_size)

    def order(self, epoch: int) -> np.ndarray:
        """Record indices of one epoch, in the order they are streamed."""
        if self.shuffle_seed is None:
            return np.arange(len(self.records))
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.records))

    def items(self, worker: int | None = None, num_workers: int | None = None) -> Iterator[tuple[int, int]]:
        """(stream position, index into `records`) of each item this shard yields, in order."""
        n = len(self.records)
        length = None if self.epochs is None else self.epochs * n
        epoch, order = -1, None
        for position in self.sharding.positions(length, worker, num_workers):
            if position // n != epoch:
                epoch = position // n
                order = self.order(epoch)
            yield position, int(order[position % n])

    def record_indices(self, worker: int | None = None, num_workers: int | None = None) -> Iterator[int]:
        """Indices into `records` that this shard yields, in order."""
        return (i for _, i in self.items(worker, num_workers))

    def __iter__(self):
        for position, i in self.items():
            record = self.records[i]
            image = load_image(self.path.parent / record["image"])  # an absolute path replaces the folder
            if image.size != (record["width"], record["height"]):
                # Boxes are in the record's pixel frame: a mismatched image would train on wrong boxes.
                raise ValueError(
                    f"{self.path}: {record['image']} is {image.size[0]}x{image.size[1]} "
                    f"(after EXIF orientation), the record says {record['width']}x{record['height']}"
                )
            yield {
                "image": image,
                "caption": record.get("caption"),
                "regions": [
                    {"box": [float(v) for v in r["box"]], "expression": r["expression"]}
                    for r in record["regions"]
                ],
                "width": record["width"],
                "height": record["height"],
                "index": position,
            }
