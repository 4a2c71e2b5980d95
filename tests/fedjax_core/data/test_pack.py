import numpy as np
import pytest

from fedjax_core.data import (
    InMemoryFederatedData,
    pack_clients,
    pack_cohort,
    step_bucket,
)
from fedjax_core.data.pack import padded_fraction
from fedjax_core.data.sampling import uniform_without_replacement


def test_pack_hand_computed_no_shuffle():
    c = pack_clients([{"x": np.arange(5.0)}, {"x": np.array([7.0])}], batch_size=2, bucket=False)
    np.testing.assert_array_equal(c.batches["x"][0], [[0, 1], [2, 3], [4, 0]])
    np.testing.assert_array_equal(c.batches["x"][1], [[7, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(c.mask[1], [[True, False], [False, False], [False, False]])
    np.testing.assert_array_equal(c.num_examples, [5, 1])


def test_epochs_are_separate_permutations_batched_across_the_boundary():
    rng = np.random.default_rng(0)
    c = pack_clients([{"x": np.arange(3)}], batch_size=2, epochs=2, rngs=[rng], bucket=False)
    flat = c.batches["x"][0].reshape(-1)
    assert c.num_steps == 3 and c.mask.all()
    assert sorted(flat[:3]) == [0, 1, 2] and sorted(flat[3:]) == [0, 1, 2]


def test_step_buckets():
    assert [step_bucket(n) for n in (1, 2, 3, 5, 7, 9, 13, 17, 33, 100)] == \
        [1, 2, 3, 6, 8, 12, 16, 24, 48, 128]
    for n in range(1, 2000):
        b = step_bucket(n)
        assert n <= b < 1.5 * n or b == n == 1


def test_pack_cohort_is_deterministic_and_depends_on_round():
    data = InMemoryFederatedData({f"c{i}": {"x": np.arange(10) + 100 * i} for i in range(4)})
    a = pack_cohort(data, [2, 0], batch_size=3, epochs=1, seed=1, round_num=0)
    b = pack_cohort(data, [2, 0], batch_size=3, epochs=1, seed=1, round_num=0)
    c = pack_cohort(data, [2, 0], batch_size=3, epochs=1, seed=1, round_num=1)
    np.testing.assert_array_equal(a.batches["x"], b.batches["x"])
    assert not np.array_equal(a.batches["x"], c.batches["x"])
    assert sorted(a.batches["x"][0][a.mask[0]]) == list(range(200, 210))
    np.testing.assert_array_equal(a.client_index, [2, 0])
    assert a.num_steps == 4  # ceil(10 / 3) = 4, a bucket
    assert padded_fraction(a, 3, 1) == 0.0


def test_pack_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch size"):
        pack_clients([{"x": np.arange(3)}], batch_size=0)
    with pytest.raises(ValueError, match="epochs"):
        pack_clients([{"x": np.arange(3)}], batch_size=1, epochs=0)


def test_uniform_sampler():
    a = uniform_without_replacement(50, 10, seed=0, round_num=3)
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, uniform_without_replacement(50, 10, seed=0, round_num=3))
    assert not np.array_equal(a, uniform_without_replacement(50, 10, seed=0, round_num=4))
    # Uniform: each client's inclusion frequency is near K/N over many rounds.
    counts = np.zeros(20)
    for r in range(2000):
        counts[uniform_without_replacement(20, 5, seed=1, round_num=r)] += 1
    np.testing.assert_allclose(counts / 2000, 0.25, atol=0.04)
    with pytest.raises(ValueError, match="cannot sample 11 clients per round from 10"):
        uniform_without_replacement(10, 11, seed=0, round_num=0)


def test_in_memory_validation():
    with pytest.raises(ValueError, match="same feature names"):
        InMemoryFederatedData({"a": {"x": np.zeros(2)}, "b": {"y": np.zeros(2)}})
    with pytest.raises(ValueError, match="disagree"):
        InMemoryFederatedData({"a": {"x": np.zeros(2), "y": np.zeros(3)}})


def test_fixed_steps_gives_every_round_one_shape():
    from fedjax_core.data.pack import fixed_steps

    data = InMemoryFederatedData({f"c{i}": {"x": np.zeros((n, 2), np.float32)}
                                  for i, n in enumerate([1, 3, 10, 25])})
    steps = fixed_steps(data, cohort_size=2, batch_size=4, epochs=1, max_bytes=10**6)
    assert steps == step_bucket(7) == 8  # ceil(25 / 4) = 7 -> 8
    shapes = {pack_cohort(data, idx, 4, 1, seed=0, round_num=r, steps=steps).mask.shape
              for r, idx in enumerate([[0, 1], [2, 3], [1, 2]])}
    assert shapes == {(2, 8, 4)}
    # Too big for the budget: each cohort gets its own bucket instead.
    assert fixed_steps(data, cohort_size=2, batch_size=4, epochs=1, max_bytes=100) is None
    with pytest.raises(ValueError, match="needs 7 steps but the cohort is padded to 3"):
        pack_cohort(data, [3], 4, 1, seed=0, round_num=0, steps=3)


def test_padded_fraction_counts_computed_steps():
    from fedjax_core.data.pack import padded_fraction

    c = pack_clients([{"x": np.zeros(n)} for n in (8, 2, 4, 4)], batch_size=2, bucket=False)
    # steps 4, 1, 2, 2: one by one nothing is padded; in pairs (4,1) -> 8 and (2,2) -> 4.
    assert padded_fraction(c, 2, 1, chunk_size=1) == 0.0
    assert padded_fraction(c, 2, 1, chunk_size=2) == 1 - 9 / 12
    assert padded_fraction(c, 2, 1, chunk_size=4) == 1 - 9 / 16


def test_max_steps_cuts_the_shuffled_stream_but_not_the_weight():
    rng = np.random.default_rng(3)
    c = pack_clients([{"x": np.arange(10)}, {"x": np.arange(3)}], batch_size=2, epochs=2,
                     rngs=[rng, np.random.default_rng(4)], bucket=False, max_steps=4)
    assert c.num_steps == 4
    assert c.mask[0].sum() == 8 and c.mask[1].sum() == 6  # 3 x 2 epochs = 6 < 8
    assert len(set(c.batches["x"][0].reshape(-1).tolist())) == 8  # first epoch, no repeats
    np.testing.assert_array_equal(c.num_examples, [10, 3])


def test_transform_is_seeded_per_round_and_slot():
    data = InMemoryFederatedData({f"c{i}": {"x": np.zeros((3, 2), np.float32)} for i in range(3)})

    def noise(arrays, rng):
        return {"x": arrays["x"] + rng.normal(size=arrays["x"].shape).astype(np.float32)}

    a = pack_cohort(data, [0, 2], 3, 1, seed=0, round_num=5, transform=noise)
    b = pack_cohort(data, [0, 2], 3, 1, seed=0, round_num=5, transform=noise)
    c = pack_cohort(data, [0, 2], 3, 1, seed=0, round_num=6, transform=noise)
    np.testing.assert_array_equal(a.batches["x"], b.batches["x"])
    assert not np.array_equal(a.batches["x"], c.batches["x"])
    assert not np.array_equal(np.sort(a.batches["x"][0].ravel()), np.sort(a.batches["x"][1].ravel()))
