"""A full disk (or a file size limit) midway: no file that looks complete is left, and the error names the space the
output needs. An existing output is never replaced without overwrite=True."""

import errno
import json
import subprocess
import sys

import gguf
import pytest

from swiftune_export import OutOfSpaceError, merge_adapter, save_merged, write_gguf
from swiftune_export.atomic import human_bytes


def _leftovers(folder, *keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_disk_full_while_writing_gguf(llama_dir, tmp_path, monkeypatch):
    target = tmp_path / "out" / "m.gguf"
    target.parent.mkdir()
    target.write_bytes(b"the previous export")
    written = []
    original = gguf.GGUFWriter.write_tensor_data

    def fill_up(self, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    with pytest.raises(OutOfSpaceError) as caught:
        write_gguf(llama_dir, target, quant="f32", overwrite=True)
    message = str(caught.value)
    # F32 weights of this model: the data size is known from the plan before any byte is written.
    assert "No space left on device" in message and "the output needs about" in message and "free" in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, OSError)
    assert target.read_bytes() == b"the previous export"
    assert _leftovers(target.parent) == ["m.gguf"]


def test_disk_full_while_merging(tmp_path, adapter, monkeypatch):
    calls = []
    from swiftune_export import safetensors_files

    original = safetensors_files.write_safetensors

    def fill_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(safetensors_files, "write_safetensors", fill_up)
    with pytest.raises(OutOfSpaceError, match="needs about"):
        merge_adapter(adapter[0], tmp_path / "merged", max_shard_bytes=400)
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_too_little_free_space_is_refused_before_writing(tmp_path, llama_dir, monkeypatch):
    monkeypatch.setattr("swiftune_export.atomic.free_bytes", lambda folder: 1000)
    with pytest.raises(OutOfSpaceError, match="not enough free space") as caught:
        save_merged(llama_dir, out=tmp_path / "gguf", method="gguf", quantization="f16")
    # The 16-bit weights of this model, read from the safetensors header, are the size the merge step needs.
    size = (llama_dir / "model.safetensors").stat().st_size
    assert human_bytes(size).split()[1] in str(caught.value)
    assert _leftovers(tmp_path, "llama") == []


def test_file_size_limit_in_a_real_process(tmp_path, llama_dir):
    """The operating system refuses the data (RLIMIT_FSIZE: writes past the limit fail with EFBIG, or are cut short,
    which Python's buffered files report without an errno), in a child process so that the limit does not touch the
    test run."""
    script = f"""
import resource, signal, sys
from swiftune_export import write_gguf
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
try:
    write_gguf({str(llama_dir)!r}, {str(tmp_path / "m.gguf")!r}, quant="f32")
except OSError as error:
    print(type(error).__name__, error.errno, error)
    sys.exit(3)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith((f"OutOfSpaceError {errno.EFBIG} ", f"OutOfSpaceError {errno.ENOSPC} ")), (
        result.stdout
    )
    assert "the output needs about" in result.stdout
    assert _leftovers(tmp_path, "llama") == []


def test_existing_gguf_needs_overwrite(llama_dir, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_gguf(llama_dir, target)
    assert target.read_bytes() == b"keep"
    write_gguf(llama_dir, target, quant="q8_0", overwrite=True)
    assert json.dumps(gguf.GGUFReader(target).fields["general.architecture"].contents()) == '"llama"'
