"""Two gloo ranks: distributed Sinkhorn-Knopp and EMA centre equal their single-process counterparts."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from franca.ssl import EmaCenter, sinkhorn_knopp

WORLD_SIZE = 2
NUM_PROTOTYPES = 6
MOMENTUM = 0.9


def _logits(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, NUM_PROTOTYPES, generator=torch.Generator().manual_seed(seed)) * 3


# Rows of each case given to rank 0 and rank 1 (uneven counts as for iBOT masked patches, and an empty rank).
SPLITS = {"even": (4, 4), "uneven": (5, 3), "empty_rank": (7, 0)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for seed, (name, (rows0, rows1)) in enumerate(SPLITS.items()):
            logits = _logits(seed, rows0 + rows1)
            local = logits[:rows0] if rank == 0 else logits[rows0:]
            results[f"sk_{name}"] = sinkhorn_knopp(local, 0.1, n_iterations=3)
            results[f"sk_{name}_explicit_n"] = sinkhorn_knopp(
                local, 0.1, n_iterations=3, n_samples=rows0 + rows1
            )
            center = EmaCenter([NUM_PROTOTYPES, 2], momentum=MOMENTUM)
            center.update([local, local[:, :2]])
            results[f"center_{name}"] = [c.clone() for c in center.centers()]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for seed, (name, (rows0, rows1)) in enumerate(SPLITS.items()):
        logits = _logits(seed, rows0 + rows1)
        expected = sinkhorn_knopp(logits, 0.1, n_iterations=3)
        if (
            rows0 and rows1
        ):  # the halves alone give other targets, so the comparison below tests the collectives
            separately = torch.cat([sinkhorn_knopp(logits[:rows0], 0.1), sinkhorn_knopp(logits[rows0:], 0.1)])
            assert not torch.allclose(separately, expected, atol=1e-3)
        for key in (f"sk_{name}", f"sk_{name}_explicit_n"):
            assert per_rank[0][key].shape == (rows0, NUM_PROTOTYPES)
            assert per_rank[1][key].shape == (rows1, NUM_PROTOTYPES)
            torch.testing.assert_close(torch.cat([per_rank[0][key], per_rank[1][key]]), expected)
        # EMA centre after one update from zero: (1 - momentum) * mean over the rows of both ranks
        for rank in range(WORLD_SIZE):
            full, small = per_rank[rank][f"center_{name}"]
            torch.testing.assert_close(full, (1 - MOMENTUM) * logits.mean(dim=0, keepdim=True))
            torch.testing.assert_close(small, (1 - MOMENTUM) * logits[:, :2].mean(dim=0, keepdim=True))
