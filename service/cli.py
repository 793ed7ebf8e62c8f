"""`locca serve`: the batched async server, REST and gRPC in front of continuously batching model workers.

    locca serve                                     # models/locca-tiny-shapes, REST :8000, gRPC :50051
    LOCCA_BACKEND=torch LOCCA_PORT=9000 locca serve
    locca serve --model runs/shapes_tiny/checkpoint.safetensors --backend torch --max-queue 64

Every setting is a flag below or an environment variable LOCCA_<NAME> (e.g. --max-batch-size and
LOCCA_MAX_BATCH_SIZE); a flag wins over the variable, the variable over the default. Booleans take
--warmup / --no-warmup, or LOCCA_WARMUP=true|false.

REST: POST /v1/caption, /v1/refer, /v1/ground (multipart or JSON+base64), GET /v1/models, /healthz, /readyz,
/metrics, OpenAPI docs at /docs. gRPC: locca.v1.LocCa (proto/locca/v1/locca.proto), grpc.health.v1,
reflection. SIGTERM drains: in-flight requests finish, new ones get 503. See service/README.md.
"""

from __future__ import annotations

import argparse
import typing

from pydantic import ValidationError

from .settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LOCCA_{name.upper()}"
        default = field.default
        help_ = f"{field.description} (env {env}; default {default})".replace("%", "%%")  # argparse formats help
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        p.add_argument(flag, default=None, choices=choices, metavar=None if choices else name.upper(), help=help_)


def settings_from(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValidationError as e:  # each problem without the input (which may hold API keys)
        problems = "\n".join(f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        print(f"locca serve: invalid settings:\n{problems}")
        return 2
    from .app import run as serve  # noqa: PLC0415 (keeps `locca --help` light)

    return serve(settings)


def main(argv=None) -> int:
    """`python -m service.cli` = `locca serve`, without importing the other commands (and torch) first."""
    parser = argparse.ArgumentParser(prog="locca serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
