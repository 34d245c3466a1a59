"""The one exact top-k inner-product search: against a brute-force argsort (ties included, chunked or not), faiss
against torch, the backend choice, and the one-shot knn_search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from franca.core.errors import ConfigError
from franca.eval.search import ExactSearcher, faiss_available, knn_search, resolve_search, top_k


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every row by a stable argsort of (-score, index) in float64 sums of the same float32 products."""
    scores = (queries @ bank.T).numpy()
    values, indices = [], []
    for row in scores:
        order = np.lexsort((np.arange(row.size), -row))[:k]  # by score descending, then index ascending
        values.append(row[order])
        indices.append(order)
    return torch.from_numpy(np.stack(values)), torch.from_numpy(np.stack(indices)).long()


def tied_bank(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank of small integers (exact float products) with many duplicate rows, and integer queries."""
    bank = torch.randint(-2, 3, (200, 6), generator=generator).float()
    bank[50:120] = bank[7]  # 71 equal rows
    queries = torch.randint(-2, 3, (37, 6), generator=generator).float()
    queries[:5] = bank[7]
    return bank, queries


@pytest.mark.parametrize("bank_chunk,query_chunk", [(1000, 1000), (13, 7), (1, 3)])
def test_torch_search_equals_a_brute_force_argsort_with_ties(bank_chunk: int, query_chunk: int) -> None:
    bank, queries = tied_bank(torch.Generator().manual_seed(0))
    for k in (1, 10, 60, 200):
        values, indices = ExactSearcher(bank, "torch", "cpu", bank_chunk, query_chunk).search(queries, k)
        expected_values, expected_indices = brute_force(queries, bank, k)
        assert torch.equal(indices, expected_indices), (k, bank_chunk)
        assert torch.equal(values, expected_values)


def test_search_on_random_features_and_k_clipped_to_the_bank() -> None:
    generator = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(300, 8, generator=generator), dim=1)
    queries = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    values, indices = ExactSearcher(bank, "torch", bank_chunk=13, query_chunk=7).search(queries, 10)
    reference = (queries.double() @ bank.double().T).topk(10, dim=1)
    assert torch.equal(indices, reference.indices)
    assert torch.allclose(values.double(), reference.values, atol=1e-6)
    values, indices = ExactSearcher(bank[:20], "torch", bank_chunk=6).search(queries, 50)
    assert indices.shape == (50, 20) and torch.equal(
        indices.sort(dim=1).values, torch.arange(20).expand(50, 20)
    )


def test_top_k_keeps_the_lowest_columns_of_a_tie_at_the_kth_place() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    values, columns = top_k(scores, 4)
    assert values.tolist() == [[3.0, 3.0, 2.0, 2.0]] and columns.tolist() == [[1, 3, 2, 4]]
    values, columns = top_k(scores, 7)  # k = n: every column, ties by index
    assert columns.tolist() == [[1, 3, 2, 4, 5, 0, 6]]


def test_faiss_search_equals_torch_search() -> None:
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(500, 16, generator=generator), dim=1)
    queries = F.normalize(torch.randn(40, 16, generator=generator), dim=1)
    faiss_searcher = ExactSearcher(bank, "faiss")
    assert faiss_searcher.backend == "faiss"
    faiss_values, faiss_indices = faiss_searcher.search(queries, 30)
    torch_values, torch_indices = ExactSearcher(bank, "torch", bank_chunk=64).search(queries, 30)
    assert torch.equal(faiss_indices, torch_indices)
    assert torch.allclose(faiss_values, torch_values, atol=1e-5)
    # with exact ties faiss returns the same scores, ordered like torch (index ascending among equal scores)
    bank, queries = tied_bank(generator)
    faiss_values, faiss_indices = ExactSearcher(bank, "faiss").search(queries, 60)
    expected_values, _ = brute_force(queries, bank, 60)
    assert torch.equal(faiss_values, expected_values)
    for values, indices in zip(faiss_values, faiss_indices):
        for value in values.unique():
            group = indices[values == value]
            assert torch.equal(group, group.sort().values)


def test_resolve_search_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_search("torch", "cpu") == "torch" and resolve_search(False, "cpu") == "torch"
    assert resolve_search("auto", "cuda") == "torch"
    assert resolve_search("auto", "cpu") == ("faiss" if faiss_available() else "torch")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_search("annoy", "cpu")
    monkeypatch.setattr("franca.eval.search.faiss_available", lambda: False)
    assert resolve_search("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match="pip install faiss-cpu"):
        resolve_search(True, "cpu")


def test_searcher_checks_its_inputs() -> None:
    with pytest.raises(ConfigError, match="empty"):
        ExactSearcher(torch.zeros(0, 4), "torch")
    with pytest.raises(ValueError, match="2-D"):
        ExactSearcher(torch.zeros(4), "torch")
    with pytest.raises(ValueError, match=r"\[q, 4\]"):
        ExactSearcher(torch.zeros(3, 4), "torch").search(torch.zeros(2, 5), 1)


def test_knn_search_chunks_queries_and_bank() -> None:
    bank, queries = tied_bank(torch.Generator().manual_seed(3))
    values, indices = knn_search(bank, queries, 25, chunk_size=4, train_chunk_size=9, use_faiss=False)
    expected_values, expected_indices = brute_force(queries, bank, 25)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)
    with pytest.raises(ValueError, match="same width"):
        knn_search(bank, queries[:, :3], 5, use_faiss=False)
