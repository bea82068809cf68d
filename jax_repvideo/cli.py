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
    "cogvideox-vae": "convert.cogvideox_vae",
    "t5": "convert.t5",
}

# command → module with ``main(config_path, overrides) -> int``.
CONFIG_COMMANDS = {
    "generate": "jax_repvideo.generate",
    "train": "jax_repvideo.training.train",
    "plan": "jax_repvideo.plan",
    "analyze": "jax_repvideo.analysis",
}
CONFIG_COMMANDS_HELP = {
    "generate": "prompt → video (mp4/gif) from a preset",
    "train": "fine-tune RepVideo from a video folder",
    "plan": "print per-device parameter and activation memory for a preset and mesh",
    "analyze": "per-layer adjacent-frame similarity plot and JSON",
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
    convert.add_argument("--config", help="architecture config file for converters that take one "
                                          "(videocrafter2: U-Net/VAE/text sections; default: the full-size model)")

    # Commands that take a YAML preset plus key=value overrides; each lives in its own module
    # with ``main(config_path, overrides) -> int``.
    for name, help_text in CONFIG_COMMANDS_HELP.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("config")
        command.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jax_repvideo import compilation_cache

    compilation_cache.enable()  # persistent compile cache when JAX_REPVIDEO_COMPILATION_CACHE=DIR is set
    if args.command == "verify":
        from jax_repvideo import verify

        return 0 if verify.run(args.kind, args.directory) else 1
    if args.command == "convert":
        module = importlib.import_module(CONVERTERS[args.kind])
        if args.config is None:
            module.main(args.src, args.dst)
        else:
            module.main(args.src, args.dst, config=args.config)
        return 0
    module = importlib.import_module(CONFIG_COMMANDS[args.command])
    return module.main(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
