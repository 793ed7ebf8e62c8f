"""Request bodies for wrk (loadtests/wrk_images.lua): held-out shapes-world scenes as JSON caption requests, one
file each, so that an external load generator sends a different image with every request.

    .venv/bin/python loadtests/wrk_bodies.py --out /tmp/wrk --count 4000
    wrk -t1 -c64 -d20s -s loadtests/wrk_images.lua http://127.0.0.1:8000/v1/caption -- /tmp/wrk 4000

The scenes are made as `locca bench` section 6 makes them (benchmarks/efficiency.py: a process per core, kept
as PNG bytes), about 20 ms each.
"""

import argparse
from pathlib import Path

from benchmarks.efficiency import distinct_images, write_bodies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the bodies (0.json, 1.json, ...)")
    p.add_argument("--count", type=int, default=64, help="how many scenes (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="sent with every request (default: none)")
    args = p.parse_args()
    fields = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    images = [data for data, _ in distinct_images(args.count, offset=1_900_000_000)]
    write_bodies(images, Path(args.out), **fields)
    print(f"wrote {args.count} bodies to {args.out}")


if __name__ == "__main__":
    main()
