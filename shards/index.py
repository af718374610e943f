"""`python -m shards index DIR_OR_URL`: index.json of a shard set built in parts (`build --part I/N`).

Every part leaves its journal, build-pIIIIofNNNN.jsonl, beside its shards. Once all N journals are
there and each ends with "done", their entries in part order are exactly a single-machine build's
records in manifest order, and index.json is made from them as `build` makes it from build.jsonl
(counts, bytes, durations, sentences and skips summed). Until then nothing is written and the parts
that are missing or unfinished are named (exit 1). Run it again at any time: same journals, same index.
"""

import argparse
import sys

from shards import format as fmt
from shards.build import JOURNAL, Part, journal_name, make_index, part_journals, read_journal, same_build
from shards.preflight import MissingInput, require_folder
from shards.storage import Storage, join

SHOWN = 20  # parts named in the message when many are not done


class Incomplete(Exception):
    """Some parts are missing, unfinished or lost shards; str() names each one."""


def merge(out: str, storage: Storage = Storage()) -> dict:
    """Write and return the index of a set built in parts; raises Incomplete naming what is not done."""
    names = storage.listdir(out)
    parts = part_journals(names)
    if not parts:
        kind = f"a single-machine build ({JOURNAL}), whose index.json `build` writes" if JOURNAL in names else \
            "no part journals (build-pIIIIofNNNN.jsonl)"
        raise MissingInput(f"shard set {out} holds {kind}: nothing to index")
    counts = sorted({p.count for p in parts})
    if len(counts) > 1 or JOURNAL in names:
        kinds = [f"{n} parts" for n in counts] + ([f"a single-machine build ({JOURNAL})"] if JOURNAL in names else [])
        raise SystemExit(f"{out} mixes builds ({' and '.join(kinds)}); keep one of them")
    n = counts[0]
    journals = {p.index: read_journal(join(out, name), storage) for p, name in parts.items()}
    present = set(names)
    problems = []
    for i in range(n):
        if i not in journals:
            problems.append(f"part {i}/{n} missing (no {journal_name(Part(i, n))})")
            continue
        head, entries = journals[i][0]["header"], journals[i][1:]
        start, end = head["records"]
        if not (entries and entries[-1].get("done")):
            done = entries[-1]["records_end"] if entries else start
            problems.append(f"part {i}/{n} unfinished ({done - start} of {end - start} records done)")
        gone = [e["shard"] for e in entries if "shard" in e and e["shard"] not in present]
        if gone:
            problems.append(f"part {i}/{n} lists {gone[0]} but it is gone (delete {journal_name(Part(i, n))} "
                            f"and the part's shards, and build the part again)")
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise Incomplete("; ".join(problems[:SHOWN]) + more)
    headers = [journals[i][0]["header"] for i in range(n)]
    for i, head in enumerate(headers):
        if not same_build(head, headers[0]):
            raise SystemExit(f"part {i}/{n} of {out} was built from another manifest or with other settings than "
                             f"part 0/{n}; rebuild it")
        if head["records"][0] != (headers[i - 1]["records"][1] if i else 0):
            raise SystemExit(f"part {i}/{n} of {out} covers records {head['records']}, which do not follow part "
                             f"{i - 1}/{n}'s {headers[i - 1]['records']}")
    index = make_index([e for i in range(n) for e in journals[i][1:]], headers[0], headers[0]["manifest"])
    fmt.write_index(out, index, storage)
    return index


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("index", help="write index.json once every part of a build in parts is done",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the --out folder or s3:// prefix of `build --part I/N`")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint URL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    storage = Storage(args.s3_endpoint)
    require_folder(args.out, "shard set", storage)
    try:
        index = merge(args.out, storage)
    except Incomplete as e:
        print(f"python -m shards index: {args.out} is not complete, index.json not written: {e}", file=sys.stderr,
              flush=True)
        return 1
    print(f"{join(args.out, fmt.INDEX)}: {index['num_samples']} samples in {len(index['shards'])} shards, "
          f"{index['total_duration'] / 3600:.2f} h; skipped: {index['skipped'] or 'none'}")
    return 0 if index["num_samples"] else 1
