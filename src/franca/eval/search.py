"""Exact top-k inner-product search: the one nearest-neighbour search of :mod:`franca.eval` (k-NN, HummingBird).

For queries [q, d] and a bank [n, d] it returns, per query, the ``k`` largest inner products ``query @ bank.T``
(normalise both first for cosine similarity) and their bank indices, sorted by decreasing score. Two backends give
the same neighbours up to float rounding:

- ``torch``: the queries in chunks of ``query_chunk`` rows against the bank in chunks of ``bank_chunk`` rows, each
  chunk's top-k merged into a running top-k, so memory stays at ``query_chunk x (bank_chunk + k)`` scores whatever
  the bank size. Runs on the bank's device (CUDA or the CPU).
- ``faiss``: a flat (exact) ``IndexFlatIP`` on the CPU.

``"auto"`` picks faiss when it is installed and the search runs on the CPU, torch otherwise
(:func:`resolve_search`).

Ties: equal scores rank the **lower bank index first**, so results do not depend on the chunking. The torch search
both selects and orders that way (of several entries tied at the k-th score, the lowest indices are kept). The faiss
results are put in the same order, but which of several entries tied at the k-th score faiss returns is its own
choice (its heap, not the lowest index); its scores may also differ from torch's in the last float bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from franca.core.errors import ConfigError
from franca.core.progress import ProgressBar
from franca.eval import defaults

SEARCH_CHOICES = defaults.SEARCH_CHOICES


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_search(search: bool | str, device: torch.device | str) -> str:
    """The backend, ``"torch"`` or ``"faiss"``, of a search choice for features searched on ``device``.

    ``search``: ``"auto"`` (faiss when installed and ``device`` is the CPU), ``"torch"`` or ``"faiss"``; k-NN's
    ``use_faiss`` values True / False are accepted as ``"faiss"`` / ``"torch"``. ConfigError for another value, or
    for faiss when it is not installed.
    """
    if search is True or search == "faiss":
        if not faiss_available():
            raise ConfigError(
                "a faiss search was asked for (--search faiss, --faiss yes) but faiss is not installed; "
                "pip install faiss-cpu or use the torch search"
            )
        return "faiss"
    if search is False or search == "torch":
        return "torch"
    if search == "auto":
        return "faiss" if torch.device(device).type == "cpu" and faiss_available() else "torch"
    raise ConfigError(f"search {search!r} is not one of {', '.join(SEARCH_CHOICES)}")


def _lowest_index_order(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of (values, indices) [q, k] sorted by decreasing value, equal values by increasing index."""
    indices, order = indices.sort(dim=1)
    values, order2 = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order2)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``scores`` [q, n]: (values [q, k], columns [q, k] int64).

    Sorted by decreasing value; of equal values the lower column comes first and, at the k-th place, is the one kept
    (``torch.topk`` leaves both unspecified). ``k`` must be at most n.
    """
    extra = int(k < scores.shape[1])  # one more: a tie across the k-th place shows as an equal (k+1)-th value
    values, columns = scores.topk(k + extra, dim=1, largest=True, sorted=True)
    rows = torch.nonzero(values[:, k] == values[:, k - 1]).flatten() if extra else None
    values, columns = values[:, :k].contiguous(), columns[:, :k].contiguous()
    if rows is not None and rows.numel():  # keep the lowest columns of the entries tied at the k-th place
        kth = values[rows, k - 1 :]
        slots = values[rows] == kth  # the places of the tied entries in the top k
        tied = scores[rows] == kth
        first = tied & (tied.cumsum(dim=1) <= slots.sum(dim=1, keepdim=True))
        fixed = columns[rows]
        fixed[slots] = torch.nonzero(first)[:, 1]
        columns[rows] = fixed
    return _lowest_index_order(values, columns)


def _torch_search(queries: Tensor, bank: Tensor, k: int, bank_chunk: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` inner products of ``queries`` [q, d] in ``bank`` [n, d], scanning the bank ``bank_chunk`` rows at a
    time and merging each chunk's top-k into the running one (k <= n)."""
    best_values: Tensor | None = None
    best_indices: Tensor | None = None
    for start in range(0, bank.shape[0], bank_chunk):
        scores = queries @ bank[start : start + bank_chunk].T
        values, indices = top_k(scores, min(k, scores.shape[1]))
        indices = indices + start
        if best_values is not None and best_indices is not None:
            # earlier chunks hold lower indices and come first: equal values stay in index order
            values = torch.cat([best_values, values], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
            values, order = top_k(values, min(k, values.shape[1]))
            indices = indices.gather(1, order)
        best_values, best_indices = values, indices
    assert best_values is not None and best_indices is not None
    return best_values, best_indices


class ExactSearcher:
    """Exact maximum-inner-product search over a fixed bank [n, d], with torch or faiss (see the module docstring).

    The bank is indexed once (a float32 copy on ``device``, or a faiss ``IndexFlatIP``); :meth:`search` answers
    queries. ``search`` is ``"auto"``, ``"torch"``, ``"faiss"`` or k-NN's ``use_faiss`` True / False;
    ``device`` (default: the bank's) is where the torch search runs. Attributes: ``backend`` ("torch" or "faiss"),
    ``num_train`` (bank rows: the train set of k-NN, the memory of HummingBird), ``dim``, ``device``.
    """

    def __init__(
        self,
        bank: Tensor,
        search: bool | str = "auto",
        device: torch.device | str | None = None,
        bank_chunk: int = defaults.KNN_TRAIN_CHUNK_SIZE,
        query_chunk: int = defaults.KNN_CHUNK_SIZE,
    ) -> None:
        if bank.ndim != 2:
            raise ValueError(f"the search bank must be 2-D [n, d], got shape {tuple(bank.shape)}")
        if bank.shape[0] == 0:
            raise ConfigError("nothing to search: the bank (k-NN train set, HummingBird memory) is empty")
        self.device = torch.device(device) if device is not None else bank.device
        self.num_train, self.dim = int(bank.shape[0]), int(bank.shape[1])
        self.bank_chunk, self.query_chunk = max(1, int(bank_chunk)), max(1, int(query_chunk))
        self.backend = resolve_search(search, self.device)
        if self.backend == "faiss":
            import faiss

            self.index = faiss.IndexFlatIP(self.dim)
            self.index.add(bank.detach().to("cpu", torch.float32).contiguous().numpy())
        else:
            self.bank = bank.detach().to(self.device, torch.float32)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(scores [q, k'] float32, bank indices [q, k'] int64) of ``queries`` [q, d], on the CPU, by decreasing
        score (equal scores: lower index first); k' = min(k, n)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"search queries must be [q, {self.dim}], got {tuple(queries.shape)}")
        k = max(1, min(int(k), self.num_train))
        if self.backend == "faiss":
            values, indices = self.index.search(
                queries.detach().to("cpu", torch.float32).contiguous().numpy(), k
            )
            return _lowest_index_order(torch.from_numpy(values), torch.from_numpy(indices).to(torch.int64))
        queries = queries.detach().to(self.device, torch.float32)
        parts = [
            _torch_search(queries[start : start + self.query_chunk], self.bank, k, self.bank_chunk)
            for start in range(0, queries.shape[0], self.query_chunk)
        ]
        if not parts:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
        return torch.cat([values for values, _ in parts]).cpu(), torch.cat(
            [index for _, index in parts]
        ).cpu()


def knn_search(
    train_feats: Tensor,
    test_feats: Tensor,
    k: int,
    chunk_size: int = defaults.KNN_CHUNK_SIZE,
    train_chunk_size: int = defaults.KNN_TRAIN_CHUNK_SIZE,
    use_faiss: bool | str = "auto",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest ``test @ train.T`` per test row: (scores [n_test, k], train indices [n_test, k] int64) on the
    CPU, by decreasing score (equal scores: lower index first); ``k`` is clipped to n_train.

    ``train_feats`` [n_train, d], ``test_feats`` [n_test, d] (normalise them first for cosine similarity); test rows
    are searched ``chunk_size`` at a time, the train set scanned ``train_chunk_size`` rows at a time.
    ``use_faiss``: ``"auto"``, True or False (see :func:`resolve_search`); ``device``: where the torch search runs
    (default: the test features').
    """
    if test_feats.ndim != 2 or test_feats.shape[1] != train_feats.shape[-1]:
        raise ValueError(
            f"k-NN needs 2-D features of the same width, got train {tuple(train_feats.shape)} "
            f"and test {tuple(test_feats.shape)}"
        )
    device = device if device is not None else test_feats.device
    searcher = ExactSearcher(train_feats, use_faiss, device, train_chunk_size, chunk_size)
    values, indices = [], []
    starts = range(0, test_feats.shape[0], max(1, chunk_size))
    for start in ProgressBar(
        starts, desc=f"k-NN ({searcher.backend})", unit="chunk", disable=not progress, leave=False
    ):
        chunk_values, chunk_indices = searcher.search(test_feats[start : start + chunk_size], k)
        values.append(chunk_values)
        indices.append(chunk_indices)
    return torch.cat(values), torch.cat(indices)
