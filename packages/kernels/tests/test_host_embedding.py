"""Embedding lookup from a host-memory table: the kernel (on the GPU, or the interpreter on CPU) returns exactly the
rows of the float64 lookup, on the ids' device; the module keeps its table on the host through .to() and state_dict."""

import pytest
import torch

from swiftune_kernels import host_embedding, pin_table
from swiftune_kernels.modules import HostEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 123), (5, 1), (300, 2048 + 17)])
def test_rows_equal_the_float64_lookup(device, dtype, shape):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=dtype)
    table = pin_table(weight)
    ids = torch.randint(0, shape[0], (3, 11), device=device)
    ids[0, 0], ids[-1, -1] = 0, shape[0] - 1  # both ends of the table
    out = host_embedding(ids, table)
    expected = torch.nn.functional.embedding(ids.cpu(), weight.double()).to(dtype)
    assert out.device == ids.device and out.dtype == dtype and out.shape == (3, 11, shape[1])
    assert torch.equal(out.cpu(), expected)


def test_int32_ids_empty_ids_and_any_shape(device):
    weight = torch.randn(9, 6)
    table = pin_table(weight)
    ids = torch.tensor([[[8, 0]], [[3, 3]]], dtype=torch.int32, device=device)
    assert torch.equal(host_embedding(ids, table).cpu(), weight[ids.cpu().long()])
    assert host_embedding(torch.empty(0, dtype=torch.long, device=device), table).shape == (0, 6)


def test_reference_path_equals_the_kernel(reference_only):
    weight = torch.randn(17, 5, dtype=torch.bfloat16)
    ids = torch.randint(0, 17, (4, 3))
    assert torch.equal(host_embedding(ids, pin_table(weight)), weight[ids])


def test_pin_table_copies_exactly_and_is_frozen():
    weight = torch.nn.Parameter(torch.randn(7, 3))
    table = pin_table(weight)
    assert table.device.type == "cpu" and not table.requires_grad
    assert torch.equal(table, weight.detach()) and table.data_ptr() != weight.data_ptr()
    if torch.cuda.is_available():
        assert table.is_pinned()


def test_bad_input_is_refused_with_what_to_do():
    table = pin_table(torch.randn(4, 3))
    with pytest.raises(TypeError, match="token ids"):
        host_embedding(torch.zeros(2), table)
    with pytest.raises(ValueError, match="frozen"):
        host_embedding(torch.zeros(2, dtype=torch.long), table.clone().requires_grad_())
    with pytest.raises(ValueError, match="2-D"):
        host_embedding(torch.zeros(2, dtype=torch.long), table[0])
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        host_embedding(torch.tensor([4]), table)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        host_embedding(torch.tensor([-1]), table)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a table on the GPU, an unpinned host table")
def test_cuda_needs_a_pinned_host_table():
    ids = torch.zeros(2, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="host memory"):
        host_embedding(ids, torch.randn(4, 3, device="cuda"))
    with pytest.raises(ValueError, match="pin_table"):
        host_embedding(ids, torch.randn(4, 3))


def test_module_matches_nn_embedding_and_keeps_its_state_dict_key(device):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8, padding_idx=1, device=device).requires_grad_(False)
    host = HostEmbedding.from_embedding(embedding)
    ids = torch.randint(0, 50, (2, 9), device=device)
    assert torch.equal(host(ids), embedding(ids))
    assert list(host.state_dict()) == ["weight"] and list(host.parameters()) == []
    assert host.weight.device.type == "cpu" and host.padding_idx == 1
    back = host.to_embedding()
    assert type(back) is torch.nn.Embedding and back.weight.device == embedding.weight.device
    assert torch.equal(back(ids), embedding(ids)) and not back.weight.requires_grad


def test_module_to_moves_the_rows_not_the_table(device):
    embedding = torch.nn.Embedding(20, 4).requires_grad_(False)
    host = HostEmbedding.from_embedding(embedding)
    host.to(device)
    assert host.weight.device.type == "cpu" and host.device.type == device.type
    host.to(torch.float16)
    assert host.weight.dtype == torch.float16 and host.weight.device.type == "cpu"
    ids = torch.tensor([3, 19], device=device)
    out = host(ids)
    assert out.device.type == device.type and torch.equal(out.cpu(), embedding.weight.half()[ids.cpu()])


def test_module_refuses_trained_or_max_norm_embeddings():
    with pytest.raises(ValueError, match="frozen"):
        HostEmbedding.from_embedding(torch.nn.Embedding(4, 3))
    with pytest.raises(ValueError, match="max_norm"):
        HostEmbedding.from_embedding(torch.nn.Embedding(4, 3, max_norm=1.0).requires_grad_(False))


def test_a_deep_copy_of_the_module_looks_up_the_same_rows(device):
    import copy

    embedding = torch.nn.Embedding(30, 5, device=device).requires_grad_(False)
    twin = copy.deepcopy(HostEmbedding.from_embedding(embedding))
    ids = torch.tensor([[0, 29, 7]], device=device)
    assert torch.equal(twin(ids), embedding(ids))
    if torch.cuda.is_available():
        assert twin.weight.is_pinned()
