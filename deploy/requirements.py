"""Print the project's pinned requirements from pyproject.toml, one a line, for `pip install -r`.

The image installs its dependencies in a layer of their own, before the source is copied in, so a code
change does not reinstall torch; pyproject.toml stays the one place where versions are pinned.

    python deploy/requirements.py                              # [project] dependencies
    python deploy/requirements.py --extra gpu --drop onnxruntime   # GPU image: onnxruntime-gpu instead
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], drop: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    drop_names = {d.lower() for d in drop}
    # The distribution name is what comes before any version specifier, marker or extras bracket.
    return [r for r in reqs if re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() not in drop_names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    p.add_argument("--extra", action="append", default=[], help="add an optional-dependencies group")
    p.add_argument("--drop", action="append", default=[], help="leave out a distribution (by name)")
    args = p.parse_args()
    print("\n".join(requirements(args.pyproject, args.extra, args.drop)))


if __name__ == "__main__":
    main()
