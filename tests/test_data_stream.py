"""BlockStream: deterministic, exactly resumable, rank-sharded micro-batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from data.packing import PackedBlocks
from data.streams.shuffled import BlockStream
from trainer.base.errors import UserError


def blocks(n: int = 23, t: int = 8) -> PackedBlocks:
    ids = np.arange(n * t, dtype=np.int32).reshape(n, t)  # row i starts with i * t: easy to identify
    doc = np.zeros((n, t), dtype=np.int32)
    doc[:, t // 2:] = 1
    return PackedBlocks(ids, doc, (np.arange(n) % 3).astype(np.int16), ["code", "math", "prose"])


def rows(batch) -> list[int]:
    return (batch["input_ids"][:, 0] // batch["input_ids"].shape[1]).tolist()


def take(stream: BlockStream, k: int) -> list[list[int]]:
    return [rows(stream.next_batch()) for _ in range(k)]


def test_batch_format():
    batch = BlockStream(blocks(), batch_size=4, seed=0).next_batch()
    assert set(batch) == {"input_ids", "document_ids", "domain_ids"}
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (4, 8)
    assert batch["document_ids"].dtype == torch.int64 and batch["document_ids"].shape == (4, 8)
    assert batch["domain_ids"].dtype == torch.int64 and batch["domain_ids"].shape == (4,)
    assert (batch["domain_ids"] == torch.tensor(rows(batch)) % 3).all()


def test_same_seed_same_batches_other_seed_differs():
    assert take(BlockStream(blocks(), 4, seed=5), 12) == take(BlockStream(blocks(), 4, seed=5), 12)
    assert take(BlockStream(blocks(), 4, seed=5), 12) != take(BlockStream(blocks(), 4, seed=6), 12)


def test_epochs_are_seeded_permutations_without_repeats():
    s = BlockStream(blocks(23), 4, seed=9)
    # 5 * 4 = 20 of 23 blocks; the 3 left over wait for a later epoch
    epoch0 = [i for batch in take(s, 5) for i in batch]
    assert len(set(epoch0)) == 20 and s.epoch == 0
    assert epoch0 == np.random.default_rng((9, 0)).permutation(23)[:20].tolist()
    first_of_epoch1 = take(s, 1)[0]
    assert s.epoch == 1
    assert first_of_epoch1 == np.random.default_rng((9, 1)).permutation(23)[:4].tolist()


@pytest.mark.parametrize("steps_before", [3, 5, 6, 11])  # mid-epoch, at the boundary, just after, later
def test_resume_continues_exactly(steps_before):
    original = BlockStream(blocks(23), 4, seed=1)
    take(original, steps_before)
    state = original.state_dict()
    assert state.pop("kind") == "blocks" and all(type(v) is int for v in state.values())
    state["kind"] = "blocks"
    buf = io.BytesIO()
    torch.save({"data": state}, buf)
    buf.seek(0)
    restored_state = torch.load(buf, weights_only=True)["data"]
    restored = BlockStream(blocks(23), 4, seed=12345)  # seed comes back from the state
    restored.load_state_dict(restored_state)
    assert take(restored, 10) == take(original, 10)


def test_ranks_are_disjoint_and_cover_the_global_batch():
    single = BlockStream(blocks(23), 6, seed=3)
    r0 = BlockStream(blocks(23), 3, seed=3, rank=0, world_size=2)
    r1 = BlockStream(blocks(23), 3, seed=3, rank=1, world_size=2)
    for _ in range(9):  # crosses two epoch boundaries
        a, b, whole = take(r0, 1)[0], take(r1, 1)[0], take(single, 1)[0]
        assert not set(a) & set(b)
        assert a + b == whole
    assert r0.state_dict() == r1.state_dict()


def test_too_few_blocks_is_a_user_error():
    with pytest.raises(UserError, match="train.batch_size"):
        BlockStream(blocks(5), batch_size=3, seed=0, world_size=2)


def test_resume_with_other_data_is_a_user_error():
    state = BlockStream(blocks(23), 4, seed=0).state_dict()
    with pytest.raises(UserError, match="data"):
        BlockStream(blocks(30), 4, seed=0).load_state_dict(state)


def test_pop_metrics_reports_the_global_windows_domain_shares():
    two = PackedBlocks(input_ids=np.zeros((12, 4), np.int32), document_ids=np.zeros((12, 4), np.int32),
                       domain_ids=np.array([0] * 9 + [1] * 3, np.int16), domains=["a", "b"])
    rank1 = BlockStream(two, 3, seed=0, rank=1, world_size=2)  # one rank still logs all 6 samples of a window
    assert rank1.pop_metrics() == {}
    for _ in range(2):
        rank1.next_batch()
    shares = rank1.pop_metrics()
    assert shares == {"data/a/fraction": 0.75, "data/b/fraction": 0.25}  # 2 windows = all 12 blocks
    assert rank1.pop_metrics() == {}
