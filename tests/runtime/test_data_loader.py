"""ResumableLoader: int64 batches, deterministic order by (seed, epoch), exact mid-epoch resume, disjoint
equal DDP shards that add up to the single-process batch, drop_last, and num_workers > 0."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from rwkvslice.data import ResumableLoader, build_dataset, collate
from rwkvslice.errors import ConfigError


class Numbered(torch.utils.data.Dataset):
    """Window i is (i, i, ...) / (-i, ...): a batch says exactly which windows it holds."""

    def __init__(self, n, ctx_len=4):
        self.n, self.ctx_len = n, ctx_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((self.ctx_len,), i, dtype=torch.int32), torch.full((self.ctx_len,), -i)


def ids(batch):
    idx, targets = batch
    assert idx.dtype == targets.dtype == torch.int64
    assert torch.equal(idx, -targets) and (idx == idx[:, :1]).all()
    return idx[:, 0].tolist()


def take(loader, n):
    return [ids(b) for b in itertools.islice(iter(loader), n)]


def test_batches_are_int64_with_the_right_shape(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * i}) + "\n" for i in range(1, 20)))
    loader = ResumableLoader(build_dataset(path, "byte", 8), 4, seed=3)
    idx, targets = next(iter(loader))
    assert idx.shape == targets.shape == (4, 8)
    assert idx.dtype == targets.dtype == torch.int64


def test_each_epoch_is_a_permutation_and_epochs_differ():
    loader = ResumableLoader(Numbered(12), 3, seed=0)
    assert len(loader) == 4
    batches = take(loader, 12)
    epochs = [sum(batches[e * 4 : e * 4 + 4], []) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert loader.state_dict()["epoch"] == 3 and loader.epoch == 3


def test_same_seed_same_batches_other_seed_other_batches():
    a = take(ResumableLoader(Numbered(50), 5, seed=7), 25)
    b = take(ResumableLoader(Numbered(50), 5, seed=7), 25)
    c = take(ResumableLoader(Numbered(50), 5, seed=8), 25)
    assert a == b and a != c


@pytest.mark.parametrize("stop", [0, 1, 3, 4, 5, 9])  # 4 steps/epoch: start, mid-epoch, epoch edges
def test_resume_gives_exactly_the_remaining_batches(stop):
    reference = take(ResumableLoader(Numbered(13), 3, seed=1), 14)
    first = ResumableLoader(Numbered(13), 3, seed=1)
    seen = take(first, stop)
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == divmod(stop, 4)
    resumed = ResumableLoader(Numbered(13), 3, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert seen + take(resumed, 14 - stop) == reference


def test_breaking_out_of_a_loop_keeps_the_position():
    loader = ResumableLoader(Numbered(20), 4, seed=2)
    reference = take(ResumableLoader(Numbered(20), 4, seed=2), 6)
    got = []
    for batch in loader:
        got.append(ids(batch))
        if len(got) == 2:
            break
    got += take(loader, 4)  # a new iterator continues where the last one stopped
    assert got == reference


def test_resume_with_other_settings_is_refused():
    state = ResumableLoader(Numbered(20), 4, seed=2).state_dict()
    for other in (ResumableLoader(Numbered(20), 4, seed=3), ResumableLoader(Numbered(20), 5, seed=2),
                  ResumableLoader(Numbered(21), 4, seed=2)):
        with pytest.raises(ConfigError, match="cannot resume the data position"):
            other.load_state_dict(state)
    with pytest.raises(ConfigError, match="outside an epoch"):
        ResumableLoader(Numbered(20), 4, seed=2).load_state_dict({**state, "index": 5})


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_shards_that_add_up_to_one_big_batch(world_size):
    b, n, steps = 2, 23, 9
    per_rank = [take(ResumableLoader(Numbered(n), b, seed=5, rank=r, world_size=world_size), steps)
                for r in range(world_size)]
    single = take(ResumableLoader(Numbered(n), b * world_size, seed=5), steps)
    steps_per_epoch = n // (b * world_size)
    for s in range(steps):
        assert sum((per_rank[r][s] for r in range(world_size)), []) == single[s]
    for e in range(steps // steps_per_epoch):
        epoch_ids = [i for r in range(world_size)
                     for batch in per_rank[r][e * steps_per_epoch : (e + 1) * steps_per_epoch] for i in batch]
        assert len(epoch_ids) == len(set(epoch_ids))  # no window on two ranks or twice in an epoch
    assert len({len(ResumableLoader(Numbered(n), b, rank=r, world_size=world_size))
                for r in range(world_size)}) == 1


def test_drop_last_false_fills_the_last_batch_by_wrapping_around():
    loader = ResumableLoader(Numbered(10), 4, seed=0, drop_last=False)
    assert len(loader) == 3
    epoch = take(loader, 3)
    assert all(len(batch) == 4 for batch in epoch)
    flat = sum(epoch, [])
    assert set(flat) == set(range(10)) and flat[10:] == flat[:2]
    tiny = take(ResumableLoader(Numbered(3), 4, seed=0, drop_last=False), 2)  # smaller than one batch
    assert all(len(batch) == 4 and set(batch) == {0, 1, 2} for batch in tiny)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="fewer than one step needs"):
        ResumableLoader(Numbered(5), 3, world_size=2)
    with pytest.raises(ConfigError, match="rank must be in"):
        ResumableLoader(Numbered(50), 3, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        ResumableLoader(Numbered(50), 0)
    with pytest.raises(ConfigError, match="num_workers"):
        ResumableLoader(Numbered(50), 2, num_workers=-1)
    for drop_last in (True, False):
        with pytest.raises(ConfigError, match="^the dataset has no windows$"):
            ResumableLoader(Numbered(0), 1, drop_last=drop_last)


def test_num_workers_gives_the_same_batches_and_position(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("\n\n".join(f"document {i} " * (i % 5 + 1) for i in range(60)))
    ds = build_dataset(path, "byte", 16)
    plain = ResumableLoader(ds, 4, seed=9)
    workers = ResumableLoader(ds, 4, seed=9, num_workers=2)
    steps = len(plain) + 3  # crosses an epoch boundary
    a = list(itertools.islice(iter(plain), steps))
    it = iter(workers)
    b = list(itertools.islice(it, steps))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    # workers prefetch ahead, but the position counts only the batches handed out
    assert workers.state_dict() == plain.state_dict()
    del it


def test_collate_casts_both_idx_and_targets_to_int64():
    items = [(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3, 4], dtype=torch.int32)),
             (torch.tensor([5, 6], dtype=torch.int16), torch.tensor([7, 8], dtype=torch.int16))]
    idx, targets = collate(items)
    assert idx.dtype == targets.dtype == torch.int64
    assert idx.tolist() == [[1, 2], [5, 6]] and targets.tolist() == [[3, 4], [7, 8]]


def test_the_default_seed_is_zero():
    # epoch 0 visits the windows in numpy.random.default_rng([seed, 0]).permutation(N) (module docstring)
    order = np.random.default_rng([0, 0]).permutation(12).tolist()
    assert take(ResumableLoader(Numbered(12), 4), 3) == [order[0:4], order[4:8], order[8:12]]


class WhereLoaded(torch.utils.data.Dataset):
    """Window i is int32 (i, i) / (w, w), w = 1 when it is loaded in a DataLoader worker, else 0."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        w = int(torch.utils.data.get_worker_info() is not None)
        return torch.tensor([i, i], dtype=torch.int32), torch.tensor([w, w], dtype=torch.int32)


@pytest.mark.parametrize("num_workers", [None, 0, 1])
def test_num_workers_zero_loads_in_this_process_and_more_in_workers(num_workers):
    kwargs = {} if num_workers is None else {"num_workers": num_workers}
    loader = ResumableLoader(WhereLoaded(), 2, seed=0, **kwargs)
    batch = next(iter(loader))
    assert type(batch) is tuple and len(batch) == 2  # our collate, not DataLoader's default (a list)
    idx, where = batch
    assert idx.dtype == where.dtype == torch.int64  # cast by collate also in the workers
    assert where.tolist() == [[int(bool(num_workers))] * 2] * 2  # the default (None) is 0: no workers


@pytest.mark.parametrize("kwargs, expected", [
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"batch_size": 2.0}, "batch_size must be an integer >= 1, got 2.0"),
    ({"world_size": 0}, "world_size must be an integer >= 1, got 0"),
    ({"world_size": True}, "world_size must be an integer >= 1, got True"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ({"num_workers": 1.5}, "num_workers must be an integer >= 0, got 1.5"),
    ({"rank": True, "world_size": 2}, "rank must be in [0, world_size=2), got True"),
    ({"rank": 1.0, "world_size": 2}, "rank must be in [0, world_size=2), got 1.0"),
])
def test_bad_setting_types_and_values_name_the_setting(kwargs, expected):
    kwargs = {"batch_size": 2} | kwargs
    with pytest.raises(ConfigError) as err:
        ResumableLoader(Numbered(50), **kwargs)
    assert str(err.value) == expected


@pytest.mark.parametrize("num_workers", [0, 1])
def test_packed_data_batches_carry_their_resets(tmp_path, num_workers):
    """Packed .jsonl windows come out as (idx, targets, resets), resets bool (B, T) equal to the dataset's
    own per-window resets, in workers too, and resuming continues with the same triples."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "ab" * (i % 4 + 1)}) + "\n" for i in range(24)))
    ds = build_dataset(path, "byte", 12, pack=True)
    loader = ResumableLoader(ds, 2, seed=3, num_workers=num_workers)
    it = iter(loader)
    first = next(it)
    assert len(first) == 3 and first[2].dtype == torch.bool and first[2].shape == first[0].shape
    order = loader.epoch_steps(0)[0]
    assert torch.equal(first[2], torch.stack([ds[i][2] for i in order]))
    assert first[2][:, 0].all() and (first[2].sum(1) >= 2).any()  # every window starts a sample; some pack
    state = loader.state_dict()
    second = next(it)
    del it
    resumed = ResumableLoader(ds, 2, seed=3, num_workers=num_workers)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert all(torch.equal(x, y) for x, y in zip(second, again, strict=True))


def test_collate_stacks_resets_as_bool():
    items = [(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([True, False])),
             (torch.tensor([5, 6]), torch.tensor([7, 8]), torch.tensor([True, True]))]
    idx, targets, resets = collate(items)
    assert resets.dtype == torch.bool and resets.tolist() == [[True, False], [True, True]]
    assert idx.tolist() == [[1, 2], [5, 6]] and targets.tolist() == [[3, 4], [7, 8]]
