"""Records: the JSONL format, the shapes writer, converters, the data CLI and the sharded streams."""

import argparse
import io
import json
import os
import pickle
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model import convert, data_cli
from model.convert import coco_captions, load_refs, refcoco
from model.records import RecordError, RecordsDataset, ShapesStream, read_records, write_records, write_shapes
from model.shapes import generate_scene

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IMAGES = FIXTURES / "images"


def record(**overrides):
    base = {
        "image": "a.png",
        "width": 20,
        "height": 10,
        "caption": "a thing",
        "regions": [{"box": [0, 0, 20, 10], "expression": "the thing"}],
    }
    return base | overrides


# ---------------------------------------------------------------------------------------------- format


def test_write_shapes_round_trip(tmp_path):
    path = write_shapes(tmp_path / "shapes", 3, seed=5)
    assert path == tmp_path / "shapes" / "records.jsonl"
    records = list(read_records(path))
    assert len(records) == 3
    for i, rec in enumerate(records):
        scene = generate_scene(5 + i)
        assert rec["image"] == f"images/{i:06d}.png"
        assert (rec["width"], rec["height"], rec["caption"]) == (scene.width, scene.height, scene.caption)
        assert [r["box"] for r in rec["regions"]] == [list(map(float, o.box)) for o in scene.objects]
        assert [r["expression"] for r in rec["regions"]] == scene.expressions
        saved = np.asarray(Image.open(path.parent / rec["image"]))
        assert np.array_equal(saved, np.asarray(scene.image))  # PNG is lossless


BAD_LINES = {
    "not json": "{not json",
    "not an object": "[1, 2]",
    "missing regions": json.dumps({k: v for k, v in record().items() if k != "regions"}),
    "bool width": json.dumps(record(width=True)),
    "float height": json.dumps(record(height=10.0)),
    "caption not str": json.dumps(record(caption=3)),
    "x0 >= x1": json.dumps(record(regions=[{"box": [5, 0, 5, 10], "expression": "e"}])),
    "y0 >= y1": json.dumps(record(regions=[{"box": [0, 6, 5, 2], "expression": "e"}])),
    "box outside": json.dumps(record(regions=[{"box": [0, 0, 21, 10], "expression": "e"}])),
    "negative box": json.dumps(record(regions=[{"box": [-1, 0, 5, 10], "expression": "e"}])),
    "three numbers": json.dumps(record(regions=[{"box": [0, 0, 5], "expression": "e"}])),
    "string coordinate": json.dumps(record(regions=[{"box": ["0", 0, 5, 5], "expression": "e"}])),
    "empty expression": json.dumps(record(regions=[{"box": [0, 0, 5, 5], "expression": ""}])),
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_read_records_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record()) + "\n\n" + bad + "\n" + json.dumps(record()) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:3: "):
        list(read_records(path))


def test_records_pass_through_extra_fields_and_null_captions(tmp_path):
    records = [record(caption=None, extra=[1]), record(regions=[], image="/abs/b.png")]
    assert write_records(tmp_path / "r.jsonl", records) == 2
    assert list(read_records(tmp_path / "r.jsonl")) == records


def test_write_records_refuses_bad_records(tmp_path):
    with pytest.raises(RecordError, match="record 2"):
        write_records(tmp_path / "r.jsonl", [record(), record(width=0)])


# ---------------------------------------------------------------------------------------------- converters


def test_coco_captions():
    assert coco_captions(FIXTURES / "coco" / "captions_tiny.json", "imgs") == [
        {
            "image": "imgs/red.png",
            "width": 12,
            "height": 8,
            "caption": "A red block.",
            "captions": ["A red block.", "red thing"],
            "regions": [],
        },
        {
            "image": "imgs/blue.png",
            "width": 10,
            "height": 10,
            "caption": "a blue square",
            "captions": ["a blue square"],
            "regions": [],
        },
    ]


REFCOCO_RECORDS = [
    {
        "image": "imgs/red.png",
        "width": 12,
        "height": 8,
        "caption": None,
        "regions": [
            {"box": [1.0, 1.0, 5.0, 4.0], "expression": "left block"},
            {"box": [1.0, 1.0, 5.0, 4.0], "expression": "the small one"},
            {"box": [6.0, 2.0, 12.0, 8.0], "expression": "right block"},
        ],
    },  # [6, 2, 6.5, 6.2] clipped to the image
    {
        "image": "imgs/blue.png",
        "width": 10,
        "height": 10,
        "caption": None,
        "regions": [{"box": [0.0, 0.0, 10.0, 10.0], "expression": "whole café"}],
    },
    {
        "image": "imgs/grey.png",
        "width": 8,
        "height": 12,
        "caption": None,
        "regions": [{"box": [2.5, 2.0, 5.5, 5.0], "expression": "grey thing"}],
    },  # the blank sentence is dropped
]


def py2_pickle(obj) -> bytes:
    """What Python 2's cPickle (protocol 2) writes for plain data: text as 8-bit strings."""

    def enc(o) -> bytes:
        if isinstance(o, str):
            b = o.encode("utf-8")
            return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b
        if isinstance(o, bool) or not isinstance(o, int | float | list | dict):
            raise TypeError(o)
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if isinstance(o, float):
            return b"G" + struct.pack(">d", o)
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"

    return b"\x80\x02" + enc(obj) + b"."


def refs_files(tmp_path) -> list[Path]:
    refs = json.loads((FIXTURES / "refcoco" / "refs.json").read_text(encoding="utf-8"))
    (tmp_path / "refs(py3).p").write_bytes(pickle.dumps(refs, protocol=4))
    (tmp_path / "refs(py2).p").write_bytes(py2_pickle(refs))
    return [FIXTURES / "refcoco" / "refs.json", tmp_path / "refs(py3).p", tmp_path / "refs(py2).p"]


def test_refcoco_from_json_and_pickles(tmp_path):
    instances = FIXTURES / "refcoco" / "instances.json"
    for refs in refs_files(tmp_path):
        assert refcoco(instances, refs, "imgs") == REFCOCO_RECORDS, refs.name
        assert refcoco(instances, refs, "imgs", splits=["train"]) == REFCOCO_RECORDS[:1]
        assert refcoco(instances, refs, "imgs", splits=["val", "testA"]) == REFCOCO_RECORDS[1:]


class Exploit:
    """Unpickled by a plain pickle.load, this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_refs_pickle_with_a_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(evil).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": Exploit(marker)}]))
    with pytest.raises(ValueError, match=r"refusing to load global (posix|nt|os)\.system"):
        load_refs(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(os.system))
    with pytest.raises(ValueError, match="refusing to load global"):
        load_refs(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="list of dicts"):
        load_refs(path)


# ---------------------------------------------------------------------------------------------- CLI


def data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locca data")
    data_cli.add_arguments(parser)
    return parser


def test_cli_convert_stores_image_paths_relative_to_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(IMAGES, tmp_path / "coco" / "images")
    args = data_parser().parse_args(
        [
            "convert",
            "refcoco",
            "--instances",
            str(FIXTURES / "refcoco" / "instances.json"),
            "--refs",
            str(FIXTURES / "refcoco" / "refs.json"),
            "--image-root",
            "coco/images",
            "--out",
            "out/refcoco.jsonl",
            "--split",
            "train",
            "--split",
            "val",
        ]
    )
    assert data_cli.run(args) == 0
    records = list(read_records(tmp_path / "out" / "refcoco.jsonl"))
    assert [r["image"] for r in records] == ["../coco/images/red.png", "../coco/images/blue.png"]
    for r in records:
        assert Image.open(tmp_path / "out" / r["image"]).size == (r["width"], r["height"])


def test_cli_shapes_and_convert_main(tmp_path, capsys):
    assert (
        data_cli.run(data_parser().parse_args(["shapes", "--out", str(tmp_path / "s"), "--count", "2"])) == 0
    )
    assert len(list(read_records(tmp_path / "s" / "records.jsonl"))) == 2
    out = tmp_path / "coco.jsonl"
    assert (
        convert.main(
            [
                "coco",
                "--captions",
                str(FIXTURES / "coco" / "captions_tiny.json"),
                "--image-root",
                str(IMAGES),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert [r["image"] for r in read_records(out)] == [str(IMAGES / "red.png"), str(IMAGES / "blue.png")]
    with pytest.raises(SystemExit) as exit_:
        data_parser().parse_args(["convert", "refcoco", "--help"])
    assert exit_.value.code == 0 and "--split" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- streams


def loader_order(dataset_shards: list[list[int]], batch_size: int) -> list[int]:
    """The order a DataLoader delivers items in: one batch from each worker in turn."""
    batches = [
        [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)] for shard in dataset_shards
    ]
    out = []
    for round_ in range(max(len(b) for b in batches)):
        for worker_batches in batches:
            if round_ < len(worker_batches):
                out += worker_batches[round_]
    return out


def shard_items(make, world_size: int, num_workers: int) -> dict[tuple[int, int], list[int]]:
    return {
        (rank, w): list(make(rank).indices(w, num_workers))
        for rank in range(world_size)
        for w in range(num_workers)
    }


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shapes_stream_shards_are_disjoint_and_cover_the_stream(batch_size):
    def make(rank):
        return ShapesStream(0, num_scenes=37, batch_size=batch_size, rank=rank, world_size=2)

    shards = shard_items(make, world_size=2, num_workers=2)
    everything = [i for items in shards.values() for i in items]
    assert sorted(everything) == list(range(37))  # disjoint, and the same indices as one stream
    assert list(ShapesStream(0, num_scenes=37).indices(0, 1)) == list(range(37))
    for rank in range(2):
        # Whatever the number of workers, a rank receives its sequence rank, rank + 2, ... in order.
        for workers in (1, 2, 3):
            delivered = loader_order(
                list(shard_items(make, 2, workers).values())[rank * workers : (rank + 1) * workers],
                batch_size,
            )
            assert delivered == list(range(rank, 37, 2))


def test_start_resumes_exactly():
    def take(stream, workers, n):
        shards = [stream.indices(w, workers) for w in range(workers)]
        order = loader_order([[next(s) for _ in range(n)] for s in shards], batch_size=4)
        return order[:n]

    for workers in (1, 2, 3):
        full = take(ShapesStream(0, batch_size=4, rank=1, world_size=2), workers, 60)
        assert full == list(range(1, 120, 2))
        for consumed in (0, 4, 12, 20):  # steps x batch size, an odd number of batches included
            resumed = take(
                ShapesStream(0, start=consumed, batch_size=4, rank=1, world_size=2), workers, 60 - consumed
            )
            assert resumed == full[consumed:]


def test_rank_comes_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    assert list(ShapesStream(0, num_scenes=12).indices(0, 1)) == [2, 5, 8, 11]
    assert list(ShapesStream(0, num_scenes=12, rank=0, world_size=1).indices(0, 1)) == list(range(12))
    with pytest.raises(ValueError):
        ShapesStream(0, rank=2, world_size=2)


def test_shapes_stream_through_dataloader_workers():
    stream = ShapesStream(100, num_scenes=8, batch_size=2, rank=0, world_size=1)
    loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=list)
    examples = [ex for batch in loader for ex in batch]
    assert [ex["caption"] for ex in examples] == [
        generate_scene(100 + i, render_image=False).caption for i in range(8)
    ]
    first, scene = examples[0], generate_scene(100)
    assert set(first) == {"image", "caption", "regions", "width", "height", "index"}
    assert [ex["index"] for ex in examples] == list(range(8))
    assert np.array_equal(np.asarray(first["image"]), np.asarray(scene.image))
    assert first["regions"] == [
        {"box": list(map(float, o.box)), "expression": e}
        for o, e in zip(scene.objects, scene.expressions, strict=True)
    ]


@pytest.fixture
def image_records(tmp_path) -> Path:
    shutil.copytree(IMAGES, tmp_path / "images")
    records = [
        record(
            image="images/red.png", width=12, height=8, regions=[{"box": [0, 0, 4, 4], "expression": "x"}]
        ),
        record(image="images/blue.png", width=10, height=10, caption=None, regions=[]),
        record(image="images/grey.png", width=8, height=12, regions=[]),
        record(image=str(tmp_path / "images" / "rotated.jpg"), width=8, height=16, regions=[]),  # absolute
        record(image="images/red.png", width=12, height=8, regions=[]),
    ]
    write_records(tmp_path / "records.jsonl", records)
    return tmp_path / "records.jsonl"


def test_records_dataset_epochs_shuffle_and_shards(image_records):
    def make(rank, start=0, seed=3):
        return RecordsDataset(
            image_records, shuffle_seed=seed, epochs=3, start=start, batch_size=2, rank=rank, world_size=2
        )

    shards = {k: list(make(k[0]).record_indices(k[1], 2)) for k in [(0, 0), (0, 1), (1, 0), (1, 1)]}
    assert Counter(i for items in shards.values() for i in items) == {i: 3 for i in range(5)}
    one = make(0, seed=3)
    stream = [int(i) for e in range(3) for i in one.order(e)]
    assert all(sorted(one.order(e)) == list(range(5)) for e in range(3))
    assert [list(one.order(e)) for e in range(3)] != [list(range(5))] * 3  # shuffled, differently per epoch
    assert loader_order([shards[0, 0], shards[0, 1]], 2) == stream[0::2]
    resumed = [list(make(0, start=4).record_indices(w, 2)) for w in range(2)]
    assert loader_order(resumed, 2) == stream[0::2][4:]
    unshuffled = RecordsDataset(image_records, shuffle_seed=None, epochs=1)
    assert list(unshuffled.record_indices(0, 1)) == list(range(5))


def test_records_dataset_examples(image_records):
    examples = list(RecordsDataset(image_records, shuffle_seed=None, epochs=1))
    assert [ex["image"].size for ex in examples] == [(12, 8), (10, 10), (8, 12), (8, 16), (12, 8)]
    assert all(ex["image"].mode == "RGB" for ex in examples)
    assert examples[0]["regions"] == [{"box": [0.0, 0.0, 4.0, 4.0], "expression": "x"}]
    assert examples[1]["caption"] is None and examples[0]["caption"] == "a thing"
    assert [ex["index"] for ex in examples] == list(range(5))
    # rotated.jpg is stored 16x8 with EXIF orientation 6: upright, its white half is on top.
    rotated = np.asarray(examples[3]["image"]).mean(axis=(1, 2))
    assert rotated[:8].mean() > 200 and rotated[8:].mean() < 50


def test_records_dataset_refuses_a_size_mismatch(tmp_path):
    shutil.copytree(IMAGES, tmp_path / "images")
    write_records(tmp_path / "r.jsonl", [record(image="images/red.png", width=8, height=12, regions=[])])
    with pytest.raises(ValueError, match="12x8"):
        next(iter(RecordsDataset(tmp_path / "r.jsonl", shuffle_seed=None)))


def test_py2_pickle_helper_is_a_real_pickle():
    # Guards the helper above: the standard unpickler reads it back as the same data.
    data = [{"a": "é", "n": -3, "x": 0.5, "l": []}]
    assert pickle.load(io.BytesIO(py2_pickle(data)), encoding="utf-8") == data
