"""Tiny offline copies of every data set, in each hub repo's own schema and layout.

The loaders cannot tell these from a download. Each data set's writer is its
``DatasetSpec.write_fixture`` (``vlm_sweep.data.sets.<name>``, built from
``vlm_sweep.data.fixture_parts``); this is the command line:

    python -m vlm_sweep.data.fixtures <name> <dir>    # a wrong name: one line listing the known ones
    python launch.py dataset=<name> dataset.path=...  # the command it prints

Content is random but seeded: the same arguments write the same rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from vlm_sweep.data.sets import all_specs, get_spec
from vlm_sweep.errors import UserError


def main(argv: Optional[List[str]] = None) -> int:
    """Write a data set's tiny copy and print the launch command that trains on it."""
    parser = argparse.ArgumentParser(prog="python -m vlm_sweep.data.fixtures",
                                     description="Write a tiny offline copy of a data set.")
    parser.add_argument("dataset", help=f"one of: {', '.join(all_specs())}")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        spec = get_spec(args.dataset, key="dataset")
    except UserError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return 2
    from vlm_sweep.console import silence_known_noise

    silence_known_noise()  # datasets' "Creating parquet from Arrow format" bars say nothing here
    path = spec.write_fixture(args.directory, seed=args.seed)
    print(f"wrote {spec.name} to {path}")
    extra = "".join(f"{arg} " for arg in spec.launch_args)
    print(f"train on it: python launch.py {extra}dataset={spec.name} dataset.path={Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
