"""`python -m shards COMMAND ...`: one subcommand per module, each adds its own parser."""

import argparse
import logging
import sys

from shards import adapters, build, stats, synth, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="Write and check video-text shards.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (synth, adapters, build, verify, stats):
        module.add_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
