"""Run ``swiftune`` (its entry point, ``swiftune_cli.main.main``) once per job in this one process.

``python cli_driver.py JOBS.json RESULTS.json``: JOBS holds [{"id", "argv"}]; RESULTS gets {id: {"rc", "stdout",
"stderr"}}. An exception that escapes ``main`` (which turns every error into one line) is recorded as rc "uncaught"
with its traceback in stderr, so the test sees it as a failure. argparse's exit is recorded with its status.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def run_job(argv: list[str]) -> dict:
    from swiftune_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - recorded for the test to report
            rc = "uncaught"
            err.write(traceback.format_exc())
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    jobs_path, results_path = sys.argv[1:3]
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    results = {job["id"]: run_job(job["argv"]) for job in jobs}
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)
