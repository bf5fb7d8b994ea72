"""MixSchedule and MixedStream: scheduled domain weights, credit allocation, exact resume, rank sharding."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch

from data.packing import PackedBlocks
from data.streams.mixed import MixedStream
from data.streams.schedule import MixSchedule
from trainer.base.errors import UserError

DOMAINS = ["code", "math", "stem"]  # sorted; domain k's blocks start at k * OFFSET
OFFSET, T = 100_000, 8
SIZES = {"code": 5, "math": 37, "stem": 13}  # code is smaller than a window: its epochs wrap inside one
MIX = {"math": 0.70, "stem": 0.25, "code": 0.05}
LATE = {"math": 0.85, "stem": 0.10, "code": 0.05}
POLYGLU = [(0.0, MIX), (0.8, MIX), (1.0, LATE)]


def sources(sizes: dict[str, int] = SIZES) -> dict[str, PackedBlocks]:
    out = {}
    for k, d in enumerate(DOMAINS):
        n = sizes[d]
        ids = (np.arange(n * T, dtype=np.int32).reshape(n, T) + k * OFFSET).astype(np.int32)
        out[d] = PackedBlocks(ids, np.zeros((n, T), np.int32), np.full(n, k, np.int16), DOMAINS)
    return out


def stream(seed=0, batch_size=8, rank=0, world_size=1, schedule=None, max_steps=100, accum=2, sizes=SIZES):
    return MixedStream(sources(sizes), schedule or MixSchedule(POLYGLU, DOMAINS), batch_size, seed,
                       micro_steps_per_update=accum, max_steps=max_steps, rank=rank, world_size=world_size)


def ids(batch) -> list[tuple[int, int]]:
    """(domain index, block index) per sample."""
    first = batch["input_ids"][:, 0]
    return list(zip((first // OFFSET).tolist(), ((first % OFFSET) // T).tolist(), strict=True))


def take(s: MixedStream, k: int) -> list[list[tuple[int, int]]]:
    return [ids(s.next_batch()) for _ in range(k)]


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-12 for k in a)


# --- MixSchedule ---------------------------------------------------------------------------------------------


def test_schedule_interpolation():
    s = MixSchedule(POLYGLU, DOMAINS)
    mid = {"code": 0.05, "math": 0.775, "stem": 0.175}
    for f, want in [(0.0, MIX), (0.5, MIX), (0.8, MIX), (0.9, mid), (1.0, LATE), (1.7, LATE), (-0.3, MIX)]:
        got = s.weights_at(f)
        assert list(got) == DOMAINS and close(got, want), (f, got)
        assert abs(sum(got.values()) - 1) < 1e-12


def test_schedule_normalises_and_describes():
    s = MixSchedule([(0.0, {"a": 3, "b": 1}), (1.0, {"a": 0, "b": 2})], ["b", "a"])
    assert s.domains == ["a", "b"]
    assert close(s.weights_at(0.5), {"a": 0.375, "b": 0.625})
    assert s.describe() == [{"at": 0.0, "weights": {"a": 0.75, "b": 0.25}},
                            {"at": 1.0, "weights": {"a": 0.0, "b": 1.0}}]
    c = MixSchedule.constant({"x": 1.0, "y": 3.0})
    assert c.weights_at(0.0) == c.weights_at(1.0) == {"x": 0.25, "y": 0.75}


@pytest.mark.parametrize("points, match", [
    ([], "data.mix is empty"),
    ([(0.1, MIX)], r"must be 0\.0"),
    ([(0.0, MIX), (1.5, MIX)], r"in \[0, 1\]"),
    ([(0.0, MIX), (-0.1, MIX)], r"in \[0, 1\]"),
    ([(0.0, MIX), (0.5, MIX), (0.5, MIX)], "strictly increasing"),
    ([(0.0, MIX), (0.6, MIX), (0.4, MIX)], "strictly increasing"),
    ([(0.0, {"math": 1.0, "stem": 1.0})], "'code'"),
    ([(0.0, {**MIX, "prose": 0.1})], "'prose'"),
    ([(0.0, {**MIX, "code": -0.1})], ">= 0"),
    ([(0.0, {**MIX, "code": float("nan")})], ">= 0"),
    ([(0.0, {"math": 0, "stem": 0, "code": 0})], "sum to 0"),
    ([(0.0,)], "pair"),
])
def test_schedule_validation(points, match):
    with pytest.raises(UserError, match=match) as err:
        MixSchedule(points, DOMAINS)
    assert "data.mix" in str(err.value) and "\n" not in str(err.value)


# --- MixedStream ---------------------------------------------------------------------------------------------


def test_batch_format_and_domain_ids_match_blocks():
    batch = stream().next_batch()
    assert set(batch) == {"input_ids", "document_ids", "domain_ids"}
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (8, T)
    assert batch["domain_ids"].tolist() == [k for k, _ in ids(batch)]


def test_realised_proportions_follow_the_schedule():
    max_steps, accum, batch = 100, 2, 8
    s = stream(batch_size=batch, max_steps=max_steps, accum=accum)
    sched = MixSchedule(POLYGLU, DOMAINS)
    for pct in (10, 50, 85, 95):
        start = pct * max_steps // 100 * accum - 25  # ~50 micro-steps around pct% of training
        while s.micro_step < start:
            s.next_batch()
        counts, want = np.zeros(3), np.zeros(3)
        for _ in range(50):
            step = s.micro_step // accum
            want += [sched.weights_at(step / max_steps)[d] * batch for d in DOMAINS]
            counts += np.bincount(s.next_batch()["domain_ids"].numpy(), minlength=3)
        np.testing.assert_allclose(counts / counts.sum(), want / want.sum(), atol=0.02, err_msg=f"at {pct}%")


def test_cumulative_counts_track_credit_target_within_one_sample():
    s = stream(batch_size=7, max_steps=60, accum=3)  # odd window, so shares are rarely whole samples
    sched = MixSchedule(POLYGLU, DOMAINS)
    target, counts = dict.fromkeys(DOMAINS, 0.0), dict.fromkeys(DOMAINS, 0)
    for m in range(200):  # runs past max_steps: the last weights are held
        w = sched.weights_at((m // 3) / 60)
        for d in DOMAINS:
            target[d] += w[d] * 7
        for k, _ in ids(s.next_batch()):
            counts[DOMAINS[k]] += 1
        for d in DOMAINS:
            assert abs(counts[d] - target[d]) < 1 + 1e-9, (m, d, counts[d], target[d])
            assert s.cursor[d] == counts[d]


def test_same_seed_same_batches_other_seed_differs():
    assert take(stream(seed=5), 15) == take(stream(seed=5), 15)
    assert take(stream(seed=5), 15) != take(stream(seed=6), 15)
    assert take(stream(seed=-3), 3) == take(stream(seed=-3), 3)  # negative seeds are folded, not rejected


def test_matches_reference_spec():
    """An independent, naive reading of the spec yields exactly the same windows."""
    seed, batch, accum, max_steps = 11, 4, 2, 30
    sched = MixSchedule(POLYGLU, DOMAINS)
    s = stream(seed=seed, batch_size=batch, accum=accum, max_steps=max_steps)
    credit, cursor = dict.fromkeys(DOMAINS, 0.0), dict.fromkeys(DOMAINS, 0)
    for m in range(80):
        w = sched.weights_at((m // accum) / max_steps)
        for d in DOMAINS:
            credit[d] += w[d] * batch
        window = []
        for _ in range(batch):
            d = max(DOMAINS, key=lambda x: credit[x])
            credit[d] -= 1
            n, k = SIZES[d], cursor[d]
            perm = np.random.default_rng((seed, zlib.crc32(d.encode()), k // n)).permutation(n)
            window.append((DOMAINS.index(d), int(perm[k % n])))
            cursor[d] += 1
        order = np.random.default_rng((seed, m, 1)).permutation(batch)
        assert ids(s.next_batch()) == [window[i] for i in order], m


def test_every_block_once_per_epoch():
    s = stream(batch_size=8)
    seen = {d: [] for d in DOMAINS}
    for _ in range(60):
        for k, b in ids(s.next_batch()):
            seen[DOMAINS[k]].append(b)
    for d in DOMAINS:
        n, c = SIZES[d], s.cursor[d]
        assert c == len(seen[d]) and c >= 2 * n
        counts = np.bincount(seen[d], minlength=n)
        # Whole epochs visit every block once; the unfinished one has visited c % n distinct blocks.
        assert set(counts.tolist()) <= {c // n, c // n + 1} and (counts == c // n + 1).sum() == c % n, d


def test_exact_resume_through_a_checkpoint():
    a = stream(seed=3)
    take(a, 37)
    state = a.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded == state and loaded["kind"] == "mixed" and loaded["num_blocks"] == SIZES
    b = stream(seed=999)  # the seed comes from the state
    b.load_state_dict(loaded)
    assert take(b, 20) == take(a, 20)


def test_resume_with_another_world_size_continues_the_global_sequence():
    single = stream(batch_size=8)
    take(single, 13)
    state = single.state_dict()
    ranks = [stream(batch_size=4, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(20):
        assert take(ranks[0], 1)[0] + take(ranks[1], 1)[0] == take(single, 1)[0]
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_ranks_disjoint_and_cover_the_window():
    big = {"code": 50, "math": 60, "stem": 70}  # no domain wraps within a window, so blocks are distinct
    whole = stream(batch_size=9, sizes=big)
    ranks = [stream(batch_size=3, rank=r, world_size=3, sizes=big) for r in range(3)]
    for _ in range(25):
        slices = [take(r, 1)[0] for r in ranks]
        union = [x for sl in slices for x in sl]
        assert len(set(union)) == 9 and union == take(whole, 1)[0]
    # Shuffling spreads domains over ranks: some rank slice holds more than one domain.
    assert any(len({k for k, _ in take(r, 1)[0]}) > 1 for r in ranks for _ in range(5))


def test_load_state_dict_errors():
    s = stream()
    with pytest.raises(UserError, match="another data stream"):
        s.load_state_dict({"epoch": 0, "cursor": 0, "seed": 0, "num_blocks": 55})  # a BlockStream state
    state = stream().state_dict()
    with pytest.raises(UserError, match=r"13 training blocks of 'stem' but this run has 14"):
        stream(sizes={**SIZES, "stem": 14}).load_state_dict(state)
    fewer = {**state, "num_blocks": {"math": 37, "stem": 13}}
    with pytest.raises(UserError, match="'code'"):
        s.load_state_dict(fewer)
    more = {**state, "num_blocks": {**SIZES, "prose": 4}}
    with pytest.raises(UserError, match="'prose'"):
        s.load_state_dict(more)


def test_constructor_errors():
    with pytest.raises(UserError, match="data.domains.stem has 0"):
        stream(sizes={**SIZES, "stem": 0})
    with pytest.raises(ValueError, match="rank"):
        stream(rank=2, world_size=2)
    with pytest.raises(UserError, match="data.mix"):
        MixedStream(sources(), MixSchedule.constant({"math": 1.0}), 4, 0, 1, 10)
    tiny = stream(sizes={"code": 1, "math": 2, "stem": 1}, batch_size=16)  # sources smaller than a window
    assert len(take(tiny, 3)[2]) == 16


def test_pop_metrics():
    s = stream(batch_size=8, max_steps=10, accum=1)
    assert s.pop_metrics() == {}
    counts = np.zeros(3)
    for _ in range(9):  # steps 0..8: the last one is at 80% -> still the flat part
        counts += np.bincount(s.next_batch()["domain_ids"].numpy(), minlength=3)
    m = s.pop_metrics()
    assert set(m) == {f"data/{d}/{k}" for d in DOMAINS for k in ("fraction", "target")}
    for i, d in enumerate(DOMAINS):
        assert m[f"data/{d}/fraction"] == counts[i] / counts.sum()
        assert abs(m[f"data/{d}/target"] - MIX[d]) < 1e-12
    assert s.pop_metrics() == {}
    s.next_batch()  # step 9 -> 90%
    assert abs(s.pop_metrics()["data/math/target"] - 0.775) < 1e-12
    # Metrics count the global window, not only this rank's slice.
    r1 = stream(batch_size=2, rank=1, world_size=4)
    r1.next_batch()
    m = r1.pop_metrics()
    assert abs(sum(m[f"data/{d}/fraction"] for d in DOMAINS) * 8 - 8) < 1e-9
    assert all((m[f"data/{d}/fraction"] * 8).is_integer() for d in DOMAINS)
