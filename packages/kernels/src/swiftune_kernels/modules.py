"""nn.Module wrappers of the ops, with parameters named and shaped like transformers' so state_dicts load.

Each module only holds parameters and calls its functional; the functional dispatches (Triton or reference).
"""

from __future__ import annotations

import torch
from torch import nn

from swiftune_kernels.host_embedding import host_embedding, pin_table
from swiftune_kernels.layer_norm import layer_norm
from swiftune_kernels.rms_norm import CASTINGS, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; see :func:`swiftune_kernels.rms_norm.rms_norm`.

    ``offset=0.0, casting="llama"`` matches LlamaRMSNorm (and Mistral, Qwen2/3, Phi3); ``offset=1.0,
    casting="gemma"`` matches GemmaRMSNorm. The weight is initialised so that ``offset + weight`` is 1.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the mean square before the reciprocal square root.
        offset: 0.0 (weight used as given) or 1.0 (``1 + weight``).
        casting: "llama" or "gemma".
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        casting: str = "llama",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if casting not in CASTINGS:
            raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}.")
        self.hidden_size = hidden_size
        self.eps = eps
        self.offset = offset
        self.casting = casting
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, self.offset, self.casting)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension; see :func:`swiftune_kernels.layer_norm.layer_norm`.

    Parameters ``weight`` (ones) and ``bias`` (zeros, or None when ``bias=False``), as ``torch.nn.LayerNorm``.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the variance before the reciprocal square root.
        bias: whether the module has a learnable bias.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return layer_norm(hidden_states, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"


class HostEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose table stays in page-locked host memory; lookups return rows on ``device``.

    The table is a persistent buffer named ``weight``, so state_dicts keep ``embed_tokens.weight``, and it is not
    a parameter: ``model.parameters()`` (and with it transformers' ``model.device``) sees only what is on the GPU.
    See :func:`swiftune_kernels.host_embedding.host_embedding`.

    Args:
        weight: ``(V, H)`` table to copy to the host (frozen).
        device: where the looked-up rows go (the decoder's device).
        padding_idx: kept for ``nn.Embedding``'s interface; a frozen table needs nothing else from it.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device | str, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.device = torch.device(device)
        self.register_buffer("weight", pin_table(weight))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> HostEmbedding:
        """The host-memory twin of ``embedding`` (frozen, not scaled, no max_norm); rows go to its device."""
        if embedding.max_norm is not None:
            raise ValueError("an embedding with max_norm rewrites its table on lookup; it cannot be kept frozen.")
        if embedding.weight.requires_grad:
            raise ValueError(
                "this embedding is trained (requires_grad); only frozen embeddings can live in host memory. Freeze "
                "it, or keep it on the GPU."
            )
        return cls(embedding.weight, embedding.weight.device, embedding.padding_idx)

    def to_embedding(self) -> nn.Embedding:
        """A plain frozen ``nn.Embedding`` on :attr:`device` with the same table."""
        embedding = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            device=self.device,
            dtype=self.weight.dtype,
        )
        embedding.weight.data.copy_(self.weight)
        return embedding.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if ids.is_cuda and not self.weight.is_pinned():
            # A copy of the module (copy.deepcopy, e.g. a reference model) holds a plain host copy: pin it once.
            self.weight = pin_table(self.weight)
        return host_embedding(ids, self.weight)

    def _apply(self, fn, recurse: bool = True):
        # model.to(device) / .cuda() / .half() must not pull the table back onto the GPU (that would undo the
        # point); they move where the rows go, and a dtype change converts the host table.
        probe = fn(torch.empty(0, device=self.device, dtype=self.weight.dtype))
        self.device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight = pin_table(self.weight.to(probe.dtype))
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table in host memory, rows to {self.device}"
