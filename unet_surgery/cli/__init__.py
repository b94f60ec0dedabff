"""The ``unet-surgery`` command line: one sub-module per sub-command, each with ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from unet_surgery.errors import SurgeryError

# Each module defines ``register(subparsers)`` which adds its parser and sets ``func``.
SUBCOMMAND_MODULES = (
    "unet_surgery.cli.demo_cmd",
    "unet_surgery.cli.inspect_cmd",
    "unet_surgery.cli.recipes_cmd",
    "unet_surgery.cli.apply_cmd",
    "unet_surgery.cli.disperse_cmd",
    "unet_surgery.cli.export_cmd",
    "unet_surgery.cli.toy_cmd",
    "unet_surgery.cli.generate_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-surgery",
        description="Map diffusion UNets, apply high-resolution recipes, export patched models.",
    )
    from unet_surgery import __version__

    parser.add_argument("--version", action="version", version=f"unet-surgery {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def os_error_line(exc: OSError) -> str:
    """``strerror: filename`` (the errno's own words, so permission denied is not "not found")."""
    what = exc.strerror or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Expected failures print one ``error:`` line and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SurgeryError as exc:
        print(f"unet-surgery {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `unet-surgery recipes list | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # permission denied, disk full, read-only folder: the OS's words, one line
        print(f"unet-surgery {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unet-surgery {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
