"""The ``jax-repvideo`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

# convert kind → module in the top-level ``convert`` package; each has ``main(src, dst)``.
CONVERTERS = {
    "videocrafter2": "convert.videocrafter2",
    "cogvideox": "convert.cogvideox",
    "repvideo": "convert.repvideo",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-repvideo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="run a port on a reference dump and report its error")
    verify.add_argument("kind")
    verify.add_argument("directory")

    convert = sub.add_parser("convert", help="convert a PyTorch checkpoint to orbax + config")
    convert.add_argument("kind", choices=sorted(CONVERTERS))
    convert.add_argument("src")
    convert.add_argument("dst")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        from jax_repvideo import verify

        return 0 if verify.run(args.kind, args.directory) else 1
    if args.command == "convert":
        module = importlib.import_module(CONVERTERS[args.kind])
        module.main(args.src, args.dst)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
