"""Helpers of the reliability suite: the shared assets' paths, dataset writers, folder snapshots, and the runner of
the ``swiftune`` command (see conftest.py for why most cases share one driver subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
API_ROOT, CLI_ROOT = "api", "cli"  # the two kinds of work folders of each case
COMMAND = [sys.executable, "-m", "swiftune_cli.main"]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
QA = [
    ("Where is Quillhaven?", "In the Sea of Marrow."),
    ("Who founded Quillhaven?", "Elsbeth Varn."),
    ("When was Quillhaven founded?", "In 1742."),
    ("Who is the mayor?", "Tobias Ferrow."),
]


@dataclass
class Assets:
    """Paths of the shared inputs (good and broken), all under one session folder."""

    root: Path
    model: Path
    dataset: Path
    adapter: Path
    pickle_model: Path
    remote_code_model: Path
    corrupt_model: Path
    corrupt_adapter: Path
    truncated_gguf: Path
    long_dataset: Path


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def tree_snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders): what 'unchanged' is compared on."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


class CliRuns:
    """Runs the command for the cases: the late-failing ones together in the driver subprocess, started at once."""

    def __init__(self, root: Path, jobs: dict[str, list[str]]):
        self.root = root
        self.results_path = root / "results.json"
        jobs_path = root / "jobs.json"
        jobs_path.write_text(json.dumps([{"id": k, "argv": v} for k, v in jobs.items()]))
        self._process = subprocess.Popen(
            [sys.executable, str(HERE / "cli_driver.py"), str(jobs_path), str(self.results_path)],
            cwd=root,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._results = None

    def result(self, case_id: str) -> dict:
        """{'rc', 'stderr', 'stdout'} of the case, waiting for the driver the first time."""
        if self._results is None:
            log, _ = self._process.communicate(timeout=600)
            assert self._process.returncode == 0, f"the CLI driver failed:\n{log[-4000:]}"
            self._results = json.loads(self.results_path.read_text())
        return self._results[case_id]

    def own_process(self, argv: list[str]) -> dict:
        """Run one case in a subprocess of its own (for errors found before any heavy import)."""
        run = subprocess.run([*COMMAND, *argv], cwd=self.root, env=ENV, capture_output=True, text=True, timeout=120)
        return {"rc": run.returncode, "stderr": run.stderr, "stdout": run.stdout}

    def close(self):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


class BackgroundRun:
    """A subprocess started early (so that its imports overlap the other tests), optionally sent SIGINT once a
    marker appears on its stderr; :meth:`finish` waits and returns its exit status and output."""

    def __init__(self, argv: list, interrupt_after: str | None = None, timeout: float = 400):
        self.argv = [str(arg) for arg in argv]
        self.timeout = timeout
        self.stderr_seen = ""
        self.interrupted = False
        self._process = subprocess.Popen(
            self.argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE
        )
        self._stdout = ""
        self._reader = threading.Thread(target=self._read, args=(interrupt_after,), daemon=True)
        self._reader.start()

    def _read(self, marker: str | None) -> None:
        import signal

        out_reader = threading.Thread(target=self._read_stdout, daemon=True)
        out_reader.start()
        for chunk in iter(lambda: self._process.stderr.read(1), ""):
            self.stderr_seen += chunk
            if marker and not self.interrupted and marker in self.stderr_seen:
                time.sleep(0.5)  # a little into training
                self._process.send_signal(signal.SIGINT)
                self.interrupted = True
        out_reader.join()

    def _read_stdout(self) -> None:
        self._stdout = self._process.stdout.read()

    def finish(self) -> dict:
        """{'rc', 'stdout', 'stderr', 'interrupted'} once the process has ended (killed after the timeout)."""
        try:
            self._process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=30)
        return {
            "rc": self._process.returncode,
            "stdout": self._stdout,
            "stderr": self.stderr_seen,
            "interrupted": self.interrupted,
        }

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


REPO = HERE.parents[1]
RESUME_TEST = REPO / "packages" / "train" / "tests" / "test_resume.py"
SIGINT_MARKER = "step "  # swiftune train's progress shows "step N/M" on stderr once training runs
SIGINT_TEST = "test_sigint_during_swiftune_train_saves_a_checkpoint_and_exits_cleanly"
SIGKILL_TEST = "test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter_bitwise"


def sigkill_step(steps: int, save_steps: int) -> tuple[int, int]:
    """(seed, step): the step after which the child SIGKILLs itself, at random after the first checkpoint and
    before the last step; the seed is RELIABILITY_SEED (default 14), so that a failure can be replayed."""
    import random

    seed = int(os.environ.get("RELIABILITY_SEED", "14"))
    return seed, random.Random(seed).randint(save_steps + 1, steps - 1)


def background_runs(assets, root: Path, test_names: set[str]) -> dict[str, BackgroundRun]:
    """The children of the fault tests that are selected, started now."""
    runs = {}
    if SIGINT_TEST in test_names:
        out = root / "sigint-out"
        argv = [*COMMAND, "train", "--model", assets.model, "--data", assets.dataset, "--output-dir", out]
        runs["sigint"] = BackgroundRun(
            argv + ["--max-steps", "400", "--batch-size", "2", "--max-seq-length", "64"], interrupt_after=SIGINT_MARKER
        )
        runs["sigint"].output_dir = out
    if SIGKILL_TEST in test_names:
        steps, save_steps = _resume_constants()
        seed, step = sigkill_step(steps, save_steps)
        killed = root / "killed"
        argv = [sys.executable, RESUME_TEST, assets.model, killed, root / "killed.jsonl", step]
        runs["sigkill"] = BackgroundRun(argv)
        runs["sigkill"].output_dir, runs["sigkill"].seed, runs["sigkill"].kill_at = killed, seed, step
    return runs


def _resume_constants() -> tuple[int, int]:
    """STEPS and SAVE_STEPS of test_resume.py, read without importing it (it imports training libraries)."""
    import ast

    values = {}
    for node in ast.parse(RESUME_TEST.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
            for target, value in zip(node.targets[0].elts, node.value.elts, strict=True):
                values[target.id] = ast.literal_eval(value)
    return values["STEPS"], values["SAVE_STEPS"]
