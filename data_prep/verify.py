"""``python -m data_prep.verify DIR [DIR ...]``: re-read every shard and check it against the manifest.

Exits 0 when every directory matches its manifest, 1 (with a message naming the shard) otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep.shards import ShardError, verify


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="prepared directory holding manifest.json")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.dirs:
        try:
            report = verify(directory)
        except ShardError as err:
            print(f"FAILED {directory}: {err}", file=sys.stderr)
            status = 1
            continue
        print(f"ok {directory}: {report['num_samples']} episodes, {report['tasks']} tasks, {report['shards']} shard(s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
