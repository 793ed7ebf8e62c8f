"""locca: train, evaluate and manage LocCa models (Wan et al., NeurIPS 2024).

Each subcommand lives beside the code it drives; `locca COMMAND --help` explains it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "train": ("model.train", "train or resume a model (single process, or DDP under torchrun)"),
    "eval": ("model.evaluate", "evaluate a checkpoint on held-out shapes-world scenes"),
    "transfer": ("model.transfer", "the encoder-transfer experiment: LocCa vs Cap-only pretraining, frozen-encoder "
                 "probes"),
    "export": ("export.onnx_export", "export a checkpoint to an ONNX bundle (encoder, KV-cache decoder, manifest)"),
    "serve": ("service.cli", "serve a model: REST and gRPC, continuous batching, supervised model workers"),
    "predict": ("locca.predict", "caption, refer or ground one image, here or via --url: JSON and a drawing"),
    "data": ("model.data_cli", "write shapes-world data sets; convert COCO / RefCOCO annotations"),
    "bench": ("benchmarks.cli", "benchmarks: our engine and server against HF generate() and a naive server"),
}
# command -> the module that runs it when --url is given: a client of a running server, in the client package,
# which the command's own module (in the model layer) may not import (tests/test_layers.py)
REMOTE = {"eval": "client.remote_eval"}
# what the `train` extra installs (pyproject.toml): a serving install has none of it
TRAIN_EXTRA = {"torch", "matplotlib", "pycocoevalcap", "onnx", "onnxscript"}


def load(command: str, module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        raise SystemExit(f"locca {command} needs the train extra, and {e.name} is not installed: "
                         "pip install 'locca-serve[train]'") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="locca", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        if name != chosen:  # only the command that runs is imported: `locca serve` does not load training code
            sub.add_parser(name, help=help_, add_help=False)
            continue
        mod = load(name, module)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    args = parser.parse_args(argv)
    if getattr(args, "url", None) and args.command in REMOTE:
        return load(args.command, REMOTE[args.command]).run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
