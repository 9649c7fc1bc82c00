"""``python -m bench {serve,overhead} ...``: the benchmarks' one entry point (see :mod:`bench`)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per benchmark."""
    from bench import serve

    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="capsa-serve against its floors and peers (wrk, gRPC, CNN case)",
                                  description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(serve_parser)
    sub.add_parser("overhead", help="capsa's cost of risk (bench/capsa_overhead.py; its options follow)",
                   add_help=False)
    return top


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen benchmark; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["overhead"]:  # capsa_overhead.py parses its own options
        script = Path(__file__).resolve().parent / "capsa_overhead.py"
        saved, sys.argv = sys.argv, [str(script), *argv[1:]]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
        return 0
    args = parser().parse_args(argv)
    from bench import serve

    return serve.run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
