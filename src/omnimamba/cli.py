"""The `omnimamba` command. Each verb parses its arguments, calls one library function and prints."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimamba", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("quickstart", help="run the main job on the embedded default")
    args = parser.parse_args(argv)
    print(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
