"""``python -m data_prep.merge DIR``: join the partial manifests of a job array into ``manifest.json``.

Run it once every piece (``--num-jobs J --job-index I``) has finished, e.g. as a Slurm job submitted with
``--dependency=afterok:<array job>``. The pieces wrote into the array's staging directory beside DIR; the merged,
verified result replaces DIR in one swap, so DIR keeps its earlier content until then. It fails, naming the pieces,
while any piece's manifest is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep.runner import summarize
from data_prep.shards import ShardError, merge_manifests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.merge", description=__doc__.splitlines()[0])
    parser.add_argument("dir", metavar="DIR", help="output directory of the job array")
    parser.add_argument("--keep-parts", action="store_true", help="keep manifest.part-*.json after merging")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="swap the merged output in without checking its files first (default: check)")
    args = parser.parse_args(argv)
    try:
        manifest = merge_manifests(args.dir, remove_parts=not args.keep_parts, verify_output=args.verify)
    except ShardError as err:
        print(f"merge failed: {err}", file=sys.stderr)
        return 1
    print(summarize(manifest, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
