"""The CPU worker threads of the chunked path."""

import threading

import pytest
import torch

from reformer.native import workers as cpu_workers


@pytest.mark.parametrize("n,parts", [(10, 3), (2, 5), (7, 1), (8, 2)])
def test_split_evenly_covers_the_range_in_order(n, parts):
    pieces = cpu_workers.split_evenly(n, parts)
    assert [i for piece in pieces for i in piece] == list(range(n))
    assert len(pieces) == min(n, parts) and all(len(p) > 0 for p in pieces)
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_parts_run_on_single_threaded_workers_and_the_caller_keeps_its_threads(monkeypatch):
    monkeypatch.setattr(cpu_workers, "worker_count", lambda: 3)
    before = torch.get_num_threads()

    def part(i):
        return i, threading.current_thread().name, torch.get_num_threads()

    results = cpu_workers.run_parts([lambda i=i: part(i) for i in range(6)])
    assert [r[0] for r in results] == list(range(6))  # results in the order of the parts
    assert all(name.startswith("reformer-cpu") and threads == 1 for _, name, threads in results)
    assert torch.get_num_threads() == before


def test_one_part_or_one_thread_runs_in_place(monkeypatch):
    here = threading.current_thread().name
    assert cpu_workers.run_parts([lambda: threading.current_thread().name]) == [here]
    monkeypatch.setattr(cpu_workers, "worker_count", lambda: 1)
    assert cpu_workers.run_parts([lambda: threading.current_thread().name] * 2) == [here, here]


def test_errors_in_a_part_reach_the_caller(monkeypatch):
    monkeypatch.setattr(cpu_workers, "worker_count", lambda: 2)

    def bad():
        raise ValueError("part failed")

    with pytest.raises(ValueError, match="part failed"):
        cpu_workers.run_parts([lambda: 1, bad])


def _caches(root, entries):
    root.mkdir()
    for i, (level, size) in enumerate(entries):
        (root / f"index{i}").mkdir()
        (root / f"index{i}" / "level").write_text(f"{level}\n")
        (root / f"index{i}" / "size").write_text(f"{size}\n")
    return root


def test_l2_cache_size_from_sysfs(tmp_path):
    from reformer.native.workers import l2_cache_bytes

    assert l2_cache_bytes(_caches(tmp_path / "a", [(1, "48K"), (1, "32K"), (2, "2048K"), (3, "491520K")])) == 2**21
    assert l2_cache_bytes(_caches(tmp_path / "b", [(1, "32K"), (2, "1M")])) == 2**20
    assert l2_cache_bytes(_caches(tmp_path / "c", [(2, "big")])) == 0
    assert l2_cache_bytes(tmp_path / "missing") == 0
