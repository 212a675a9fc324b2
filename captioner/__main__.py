"""``python -m captioner`` (or the ``captioner`` command): the version and the commands to run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import captioner

COMMANDS = """commands (from the repository root):
  python train.py experiment=quickstart        train the built-in demo, then test it
  python train.py                              train on COCO (see README.md)
  python evaluate.py beam=5                    score the latest run's best checkpoint
  python -m captioner.caption image=photo.jpg  caption your own images
  python -m captioner.data.preprocess --help   images and captions to HDF5 alone
  python -m captioner.convert_tutorial --help  convert a tutorial checkpoint"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="captioner", description=captioner.__doc__, epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"captioner {captioner.__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
