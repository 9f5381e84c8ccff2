"""Every bad input of cases.py, through the Python API and through the ``swiftune`` command.

Each must: raise the case's exception type from the API with a message that matches; make the command exit non-zero
with exactly one ``swiftune <command>: error: ...`` line on stderr matching the same pattern, and no traceback;
and leave the case's folder (where the output would go) exactly as it was.
"""

from __future__ import annotations

import re

import pytest
from cases import CASES
from support import API_ROOT, CLI_ROOT, tree_snapshot


def _params(kind: str):
    params = []
    for case in CASES:
        reason = case.xfail_cli if kind == "cli" else case.xfail_api
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@pytest.mark.parametrize("case", _params("api"))
def test_api(case, assets, case_folders, cli_runs, loaded_model):
    work, before = case_folders[API_ROOT, case.id]
    with pytest.raises(case.error) as raised:
        case.api(assets, work, loaded_model)
    message = " ".join(str(raised.value).split())
    assert re.search(case.match, message), message
    assert tree_snapshot(work) == before, "the failed call left output behind"


@pytest.mark.parametrize("case", _params("cli"))
def test_cli(case, assets, case_folders, cli_runs):
    work, before = case_folders[CLI_ROOT, case.id]
    argv = case.cli(assets, work)
    result = cli_runs.own_process(argv) if case.early else cli_runs.result(case.id)
    stderr = result["stderr"]
    assert result["rc"] in (1, 2), f"exit status {result['rc']}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if re.match(r"swiftune( \w+)?: error: ", line)]
    assert len(errors) == 1, stderr[-3000:]
    assert re.search(case.match, errors[0]), errors[0]
    print(errors[0])  # shown with -rA: the sentence a user reads
    assert tree_snapshot(work) == before, "the failed command left output behind"
