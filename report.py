"""Build or rebuild the HTML report of run dirs: ``python report.py <run dir> [<run dir> ...]``.

A training run and the evaluation of its checkpoint give one report (written into the first
run dir unless ``--out``); open ``report.html`` in a browser (no network needed)."""

import argparse
import sys

from vebi.errors import VebiError
from vebi.pipelines.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run dirs (logs/<task>/<experiment>/<time>)")
    parser.add_argument("--out", help="the report file (default: <first run dir>/report.html)")
    arguments = parser.parse_args(argv)
    try:
        path = write_report(arguments.runs, arguments.out)
    except VebiError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"report: {path}  (open it in a browser: file://{path.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
