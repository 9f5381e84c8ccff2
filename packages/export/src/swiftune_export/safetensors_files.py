"""Reading a model folder's safetensors weights one tensor at a time, and writing sharded output with an index.

Shards are written here rather than with ``safetensors.torch.save_file``, which first turns every tensor of a shard
into a bytes object (twice the shard in memory) and reports a full disk as an untyped error; this writer streams
each tensor's bytes to the file and lets the OS error (ENOSPC, EFBIG) through as an ``OSError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"

# torch dtype -> safetensors dtype name (the format's spelling).
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order when there is an index.

    Raises:
        FileNotFoundError: no safetensors weights (pickle .bin weights are not read: unpickling runs code).
    """
    index = model_dir / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [check_complete(model_dir / name) for name in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [check_complete(single)]
    if any(model_dir.glob("*.bin")):
        raise FileNotFoundError(
            f"'{model_dir}' has only pickle .bin weights, which swiftune does not read because unpickling runs code; "
            "convert them to safetensors first."
        )
    raise FileNotFoundError(f"No safetensors weights in '{model_dir}'.")


def check_complete(path: Path) -> Path:
    """Return ``path`` when its header parses and its size is what the header says; a clear ValueError otherwise.

    A file cut short (an interrupted copy or download) would otherwise fail deep inside the safetensors reader
    with a message that names neither the file nor the fix.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the header is unreadable or the file is shorter or longer than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file '{path}' does not exist.")
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little") if size >= 8 else -1
        if not 0 < header_size <= size - 8:
            problem = "its header is missing or cut off"
        else:
            try:
                header = json.loads(handle.read(header_size))
                end = max((entry["data_offsets"][1] for key, entry in header.items() if key[:2] != "__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                problem = "its header is not valid"
            else:
                if 8 + header_size + end != size:
                    problem = f"it holds {size} bytes where its header describes {8 + header_size + end}"
    if problem is not None:
        raise ValueError(f"'{path}' is not a complete safetensors file ({problem}); copy or save the model again.")
    return path


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from the files one tensor at a time, so that memory holds one tensor, not a model."""
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def header_bytes(files: list[Path]) -> int:
    """Bytes of all tensors in the files, from their headers only."""
    total = 0
    for path in files:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        total += sum(
            entry["data_offsets"][1] - entry["data_offsets"][0] for key, entry in header.items() if key[:2] != "__"
        )
    return total


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, one tensor's bytes at a time.

    Raises:
        ValueError: a dtype the safetensors format has no name for.
        OSError: the file system refused the data (a full disk: ENOSPC; a file size limit: EFBIG).
    """
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"Tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store.")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            # Byte view of the tensor's own storage: no copy for contiguous CPU tensors.
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            handle.write(memoryview(data.numpy()))


class ShardedWriter:
    """Collects tensors and writes them as safetensors shards of at most ``max_shard_bytes``, plus an index.

    Args:
        out_dir: the folder to write into.
        max_shard_bytes: a shard is written once adding the next tensor would pass this size.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes the current shard first if this tensor would overflow it."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def close(self) -> list[Path]:
        """Write the last shard, rename shards to ``model-0000i-of-0000n.safetensors`` and write the index."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return [self.out_dir / "model.safetensors"]
        weight_map, paths = {}, []
        for i, names in enumerate(self._shards):
            final = self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return paths

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._shards)}.tmp"
        write_safetensors(path, self._pending)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0
