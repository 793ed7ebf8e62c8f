"""The `locca` command: one entry point, subcommands registered as they become real."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="locca", description=__doc__)
    parser.add_subparsers(dest="command", required=True)
    args = parser.parse_args(argv)
    return args.func(args)
