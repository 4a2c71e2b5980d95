"""The background cohort prefetcher: order, errors, shutdown, and hidden-time bookkeeping."""

import threading
import time

import pytest

from fedjax_api.prefetch import Prefetcher


def test_items_come_in_round_order_and_match_make():
    made = []

    def make(r):
        made.append(r)
        return r * r

    with Prefetcher(make, 3, 9, depth=2) as p:
        assert [p.get(r) for r in range(3, 9)] == [9, 16, 25, 36, 49, 64]
        assert p.items == 6
    assert made == list(range(3, 9))


def test_runs_on_another_thread_and_ahead_of_the_consumer():
    threads = set()
    started = threading.Event()

    def make(r):
        threads.add(threading.current_thread().name)
        if r == 1:
            started.set()
        return r

    with Prefetcher(make, 0, 5, depth=2) as p:
        assert started.wait(5)  # round 1 was made before anyone asked for round 0
        assert p.get(0) == 0
    assert threads == {"fedjax-prefetch"}


def test_error_is_raised_by_the_get_of_that_round():
    def make(r):
        if r == 2:
            raise KeyError("client 7 is missing")
        return r

    with Prefetcher(make, 0, 5) as p:
        assert p.get(0) == 0 and p.get(1) == 1
        with pytest.raises(KeyError, match="client 7"):
            p.get(2)


def test_out_of_order_and_past_the_end_are_refused():
    with Prefetcher(lambda r: r, 0, 2) as p:
        with pytest.raises(ValueError, match="expected round 0, got 1"):
            p.get(1)
        p.get(0), p.get(1)
        with pytest.raises(ValueError, match="past the prefetched range"):
            p.get(2)


def test_close_stops_a_thread_blocked_on_a_full_queue():
    p = Prefetcher(lambda r: r, 0, 1000, depth=1)
    time.sleep(0.05)
    p.close()
    assert not p._thread.is_alive()


def test_host_time_hidden_behind_slow_consumer_and_not_behind_an_eager_one():
    # Each item takes 50 ms to make. A consumer that works 150 ms per round never
    # waits after the first item: everything but the first item is hidden.
    def make(r):
        time.sleep(0.05)
        return r

    with Prefetcher(make, 0, 4, depth=2) as slow:
        for r in range(4):
            slow.get(r)
            time.sleep(0.15)
    assert slow.host_s >= 0.2  # four items of at least 50 ms
    assert slow.wait_s < 0.5 * slow.host_s  # only the first item was waited for
    assert slow.hidden_s == pytest.approx(slow.host_s - slow.wait_s)

    with Prefetcher(make, 0, 4, depth=2) as eager:  # asks at once: waits for each item
        for r in range(4):
            eager.get(r)
    assert eager.wait_s >= 0.7 * eager.host_s
    assert eager.hidden_fraction <= 0.3


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Prefetcher(lambda r: r, 0, 1, depth=0)


def test_to_device_copies_the_cohort_in_the_prefetch_thread_unchanged():
    import jax
    import numpy as np

    from fedjax_api import tasks
    from fedjax_api.prefetch import to_device
    from fedjax_core import parallel
    from fedjax_core.parallel import Plan
    from tests.fedjax_api.tiny_task import NAME

    host = tasks.get(NAME).train.sample(4, 0)
    for plan, devices in ((Plan(), 1), (Plan(mesh=parallel.client_mesh(4)), 4)):
        put = to_device(host, plan)
        for a, b in zip(jax.tree.leaves((put.batches, put.mask, put.num_examples)),
                        jax.tree.leaves((host.batches, host.mask, host.num_examples))):
            assert isinstance(a, jax.Array) and len(a.sharding.device_set) == devices
            np.testing.assert_array_equal(np.asarray(a), b)
        assert put.client_index is host.client_index  # the stores are fitted on the host
    assert to_device("not a cohort", Plan()) == "not a cohort"
