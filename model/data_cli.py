"""`locca data`: write the shapes data set, or convert public data sets, into grounding records (JSONL).

    locca data shapes --out data/shapes_val --count 1000 --seed 1000000
    locca data convert coco --captions captions_train2014.json --image-root train2014 --out coco.jsonl
    locca data convert refcoco --instances instances.json --refs 'refs(unc).p' --image-root train2014 \\
        --split train --out refcoco_train.jsonl
"""

import argparse

from model import convert
from model.records import write_shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="{shapes,convert}")
    shapes = sub.add_parser(
        "shapes",
        help="generate shapes-world scenes as images + records.jsonl",
        description="Write COUNT shapes-world scenes to OUT/images/NNNNNN.png and OUT/records.jsonl. "
        "Scene i is drawn from seed SEED + i, the same scene as item i of a ShapesStream with "
        "seed_offset SEED: give evaluation sets seeds far from the training stream's.",
    )
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--count", type=int, required=True, help="number of scenes")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the first scene (default 0)")
    conv = sub.add_parser(
        "convert",
        help="convert COCO captions or RefCOCO into records",
        description=convert.__doc__.split("\n\n")[0],
    )
    convert.add_arguments(conv)


def run(args: argparse.Namespace) -> int:
    if args.data_command == "shapes":
        if args.count < 1:
            raise SystemExit("--count must be at least 1")
        path = write_shapes(args.out, args.count, seed=args.seed)
        print(f"wrote {args.count} scenes to {path}")
        return 0
    return convert.run(args)
