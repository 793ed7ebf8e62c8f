"""Request bodies for wrk (loadtests/wrk_images.lua): held-out shapes-world scenes as JSON caption requests, one
file each, so that an external load generator sends a different image with every request.

    .venv/bin/python loadtests/wrk_bodies.py --out /tmp/wrk --count 64
    wrk -t2 -c64 -d20s -s loadtests/wrk_images.lua http://127.0.0.1:8000/v1/caption -- /tmp/wrk 64
"""

import argparse
import base64
import io
import json
from pathlib import Path

from model.heldout import heldout_scenes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the bodies (0.json, 1.json, ...)")
    p.add_argument("--count", type=int, default=64, help="how many scenes (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="sent with every request (default: none)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(heldout_scenes(args.count, offset=1_900_000_000)):
        buf = io.BytesIO()
        scene.image.save(buf, "PNG")
        body = {"image": base64.b64encode(buf.getvalue()).decode()}
        if args.max_new_tokens:
            body["max_new_tokens"] = args.max_new_tokens
        (out / f"{i}.json").write_text(json.dumps(body))
    print(f"wrote {args.count} bodies to {out}")


if __name__ == "__main__":
    main()
