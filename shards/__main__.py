"""`python -m shards COMMAND ...`: one subcommand per module, each adds its own parser.

Exit codes: 0 done; 1 the command ran and found a problem (`verify`: bad samples; `build`, `manifest`:
nothing written; `index`: parts missing or unfinished); 2 an input is missing, unreadable or malformed
(one line on stderr naming it, no traceback; checked before any work starts) or the command line is wrong.
"""

import argparse
import logging
import sys

from shards import adapters, build, index, stats, synth, verify
from shards.preflight import MissingInput

INPUT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="Write and check video-text shards.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (synth, adapters, build, index, verify, stats):
        module.add_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MissingInput as e:
        print(f"python -m shards {args.command}: error: {e}", file=sys.stderr, flush=True)
        return INPUT_ERROR
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # an input that vanished after the checks, or one no check names: still one line, not a traceback
        name = f" {e.filename}" if getattr(e, "filename", None) else ""
        reason = e.strerror or str(e)
        print(f"python -m shards {args.command}: error:{name}: {reason}", file=sys.stderr, flush=True)
        return INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
