"""Build or rebuild the HTML report of run dirs: ``python report.py <run dir> [<run dir> ...]``.

A training run and the evaluation of its checkpoint give one report (written into the first
run dir unless ``--out``); open ``report.html`` in a browser (no network needed)."""

import argparse
import sys

from vebi.errors import VebiError
from vebi.pipelines.report import write_report
from vebi.utils.cli import ENVIRONMENT_ERRNOS, describe_os_error
from vebi.utils.log import printable
from vebi.utils.signals import JobInterrupted, stop_on_signals


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the report's path and URL; 1 with one ``error:`` line for bad run files or
    an ``--out`` it may not write; 128 + the signal on SIGINT/SIGTERM (nothing half-written:
    every page goes to a temporary name first, removed on the way out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run dirs (logs/<task>/<experiment>/<time>)")
    parser.add_argument(
        "--out",
        help="the report file, ending in .html: a new file or a report written before "
        "(default: <first run dir>/report.html); its class pages go to the folder of the same "
        "name without .html",
    )
    arguments = parser.parse_args(argv)
    try:
        with stop_on_signals():
            path = write_report(arguments.runs, arguments.out)
    except JobInterrupted as error:
        print(f"error: report.py interrupted by {error}: no report written", file=sys.stderr)
        return error.exit_code
    except VebiError as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {printable(describe_os_error(error))}", file=sys.stderr)
        return 1
    print(f"report: {printable(str(path))}  (open it in a browser: {path.resolve().as_uri()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
