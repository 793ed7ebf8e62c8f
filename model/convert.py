"""Converters from public grounding data sets into the JSONL records of `model.records`.

- COCO captions (`captions_*.json`): one record per image that has a caption; `caption` is its first caption
  in file order and the extra field `captions` lists all of them (whitespace stripped); no regions.
- RefCOCO / RefCOCO+ / RefCOCOg (`instances.json` + `refs(unc).p`, the layout of lichengunc/refer): one record
  per image with its referred objects, `caption` null, one region per sentence (`sent`), box from the
  annotation's COCO `[x, y, w, h]` turned into `[x0, y0, x1, y1]` and clipped to the image (COCO boxes
  overshoot the border by a fraction of a pixel now and then). `--split` keeps only refs of those splits.

The refs file is a pickle, and unpickling can run arbitrary code, so it is read by `DataOnlyUnpickler`, which
refuses every global: a genuine refs file holds only lists, dicts, strings and numbers. The same list saved as
`.json` is accepted too.

    python -m model.convert coco --captions captions_val2014.json --image-root val2014 --out coco_val.jsonl
"""

import argparse
import json
import os
import pickle
from pathlib import Path

from model.records import write_records


def coco_captions(captions_path: str | os.PathLike, image_root: str) -> list[dict]:
    """Records of a COCO captions file; image paths are `image_root/file_name`."""
    with open(captions_path, encoding="utf-8") as f:
        data = json.load(f)
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        text = ann["caption"].strip()
        if text:
            captions.setdefault(ann["image_id"], []).append(text)
    return [
        {
            "image": os.path.join(image_root, im["file_name"]),
            "width": im["width"],
            "height": im["height"],
            "caption": captions[im["id"]][0],
            "captions": captions[im["id"]],
            "regions": [],
        }
        for im in data["images"]
        if im["id"] in captions
    ]


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler for plain data: any global (class, function) is refused, so loading cannot run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a refs file holds only lists, dicts, strings, numbers"
        )


def load_refs(path: str | os.PathLike) -> list[dict]:
    """The refs list of a `refs(*).p` pickle (Python 2 or 3) or of its `.json` twin."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            refs = json.loads(path.read_text(encoding="utf-8"))
        else:
            with open(path, "rb") as f:
                # The original files were written by Python 2: its byte strings hold UTF-8 text.
                refs = DataOnlyUnpickler(f, encoding="utf-8").load()
    except (pickle.UnpicklingError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a refs file: {e}") from e
    if not (isinstance(refs, list) and all(isinstance(r, dict) for r in refs)):
        raise ValueError(f"{path}: a refs file is a list of dicts, got {type(refs).__name__}")
    return refs


def _clipped_box(bbox, width: int, height: int) -> list[float] | None:
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


def refcoco(
    instances_path: str | os.PathLike,
    refs_path: str | os.PathLike,
    image_root: str,
    splits: list[str] | None = None,
) -> list[dict]:
    """Records of a RefCOCO-style data set, one per image, in order of first reference."""
    with open(instances_path, encoding="utf-8") as f:
        instances = json.load(f)
    images = {im["id"]: im for im in instances["images"]}
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    records: dict[int, dict] = {}
    for ref in load_refs(refs_path):
        if splits and ref["split"] not in splits:
            continue
        if ref["image_id"] not in images or ref["ann_id"] not in boxes:
            raise ValueError(
                f"{refs_path}: ref {ref.get('ref_id')} names an image or annotation "
                f"missing from {instances_path}"
            )
        im = images[ref["image_id"]]
        box = _clipped_box(boxes[ref["ann_id"]], im["width"], im["height"])
        if box is None:
            continue  # an empty box cannot be referred to
        record = records.setdefault(
            im["id"],
            {
                "image": os.path.join(image_root, im["file_name"]),
                "width": im["width"],
                "height": im["height"],
                "caption": None,
                "regions": [],
            },
        )
        for sentence in ref["sentences"]:
            text = sentence["sent"].strip()
            if text:
                record["regions"].append({"box": list(box), "expression": text})
    return [r for r in records.values() if r["regions"]]


# ---------------------------------------------------------------------------------------------- CLI


def _image_root_for(image_root: str, out: str) -> str:
    """Image root as the records should store it: absolute stays absolute; relative (to the working
    directory) is rewritten relative to the output file's folder, which is how records resolve it."""
    if os.path.isabs(image_root):
        return image_root
    return os.path.relpath(os.path.abspath(image_root), os.path.dirname(os.path.abspath(out)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", required=True, metavar="{coco,refcoco}")
    coco = sub.add_parser(
        "coco",
        help="COCO captions -> one record per image",
        description="Convert a COCO captions file (captions_*.json) into grounding records.",
    )
    coco.add_argument("--captions", required=True, help="captions_*.json file")
    refs = sub.add_parser(
        "refcoco",
        help="RefCOCO/RefCOCO+/RefCOCOg -> records with regions",
        description="Convert instances.json + refs(*).p (or refs.json) into grounding records.",
    )
    refs.add_argument("--instances", required=True, help="instances.json (COCO detection format)")
    refs.add_argument("--refs", required=True, help="refs(unc).p pickle, or the same list as .json")
    refs.add_argument(
        "--split",
        action="append",
        dest="splits",
        metavar="SPLIT",
        help="keep refs of this split (train, val, testA, ...); repeat for several; default all",
    )
    for p in (coco, refs):
        p.add_argument(
            "--image-root",
            required=True,
            help="folder holding the images (relative paths are stored relative to --out's folder)",
        )
        p.add_argument("--out", required=True, help="output records .jsonl")


def run(args: argparse.Namespace) -> int:
    root = _image_root_for(args.image_root, args.out)
    if args.source == "coco":
        records = coco_captions(args.captions, root)
    else:
        records = refcoco(args.instances, args.refs, root, args.splits)
    count = write_records(args.out, records)
    print(f"wrote {count} records to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="locca data convert", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
