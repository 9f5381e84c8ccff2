"""The swiftune command end to end, each step a real subprocess: train from a YAML config under a pseudo-terminal
(the progress bar redraws in place), export the adapter to GGUF, and chat with the GGUF through llama.cpp, which
must give the answer that training taught."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import gguf
import pytest

COMMAND = [sys.executable, "-m", "swiftune_cli.main"]
QUESTION, ANSWER = "Who founded Quillhaven?", "Elsbeth Varn."
STEPS = 20
# One thread: a tiny model gains nothing from more, and on a shared machine they only wait for each other.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def memorizable_model(tmp_path_factory):
    """A tiny Llama whose weights start at std 0.3: at transformers' default 0.02 the frozen lm_head of a hidden-32
    model keeps every logit within a fraction of a unit of the others, and no LoRA could make one answer likely."""
    from swiftune_loader.testing import build_tiny_model
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), build_chat_tokenizer(), initializer_range=0.3)


def run_with_tty_stderr(argv, timeout):
    """Run ``argv`` with stderr on a pseudo-terminal (stdout a pipe); returns (exit status, stdout, stderr)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=ENV, text=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        stdout, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return process.returncode, stdout, b"".join(chunks).decode("utf-8", "replace")


def swiftune(*args, timeout=300):
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def trained(memorizable_model, tmp_path_factory):
    """``swiftune train --config`` run once, stderr on a pseudo-terminal: (folder, exit status, stdout, terminal)."""
    folder = tmp_path_factory.mktemp("e2e")
    data = folder / "one_fact.jsonl"
    row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    data.write_text((json.dumps(row) + "\n") * 8)
    config = folder / "train.yaml"
    config.write_text(
        f"model: {memorizable_model}\ndataset: {data}\noutput_dir: {folder / 'run'}\n"
        "max_steps: 3            # the flag below wins\n"
        "learning_rate: 2e-2     # YAML reads this as a string; the schema makes it a number\n"
        "lora_r: 16\nlora_alpha: 32\nbatch_size: 8\nmax_seq_length: 64\n"
        f"questions: [{QUESTION!r}]\n"
    )
    argv = [*COMMAND, "train", "--config", str(config), "--max-steps", str(STEPS)]
    return (folder, *run_with_tty_stderr(argv, 300))


def test_train_shows_a_live_progress_bar_on_a_terminal(trained):
    _, status, _, terminal = trained
    assert status == 0, terminal[-3000:]
    # The bar is redrawn in place: a carriage return, the bar, the status, and clear-to-end-of-line.
    frames = re.findall(r"\r\[[#-]{20}\] (step \d+/\d+[^\r\n]*?)\x1b\[K", terminal)
    assert len(frames) >= STEPS, terminal[-3000:]
    last = frames[-1]
    assert last.startswith(f"step {STEPS}/{STEPS}  loss ")
    assert re.search(r"  lr [\d.e+-]+  [\d,]+ tok/s  \d+:\d\d elapsed  ~0:00 left$", last), last
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", " ".join(frames))]
    assert losses[-1] < losses[0] / 4, losses


def test_trained_answer_survives_export_to_gguf_and_chat_through_llama_cpp(trained):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF reader of swiftune chat")
    folder, status, stdout, terminal = trained
    assert status == 0, terminal[-3000:]
    assert f"finished at step {STEPS}/{STEPS}" in stdout  # the flag overrode the file's max_steps
    assert f"after:  {ANSWER}" in stdout, stdout
    curve = folder / "run" / "loss_curve.png"
    assert f"loss curve: {curve}" in stdout and curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    exported = swiftune("export", folder / "run", "--method", "gguf", "--quant", "f16,q8_0", "--out", folder / "gguf")
    assert exported.returncode == 0, exported.stderr
    assert "[1/4] merging the adapter" in exported.stdout and "[3/4] writing GGUF q8_0" in exported.stdout
    assert sorted(p.name for p in (folder / "gguf").iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    arch = gguf.GGUFReader(folder / "gguf" / "model-f16.gguf").fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"

    for quant in ("f16", "q8_0"):
        chat = swiftune("chat", folder / "gguf" / f"model-{quant}.gguf", "--prompt", QUESTION, "--max-new-tokens", 24)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == ANSWER, (quant, chat.stdout)
