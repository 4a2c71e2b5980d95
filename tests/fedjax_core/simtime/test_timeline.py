"""The simulated clock against a plain-Python event simulator written from the rules
(docs/simulated_time.md): selected and dropped clients, round times, async staleness."""

import math

import numpy as np
import pytest

from fedjax_core import simtime
from fedjax_core.data.sampling import SAMPLE_STREAM, host_rng, uniform_without_replacement

N = 12
SIZES = np.array([7, 3, 12, 1, 9, 4, 15, 6, 2, 11, 5, 8])
INTERVALS = {0: [(0, 50)], 1: [(30, 200)], 3: [(0, 10), (40, 300)], 5: [(100, 400)],
             8: [(0, 5)], 10: [(20, 60), (80, 500)]}  # others: always online
PERIOD = 600.0


def model(seed=1):
    p = simtime.heterogeneous(N, seed=seed, compute_s=0.5, download_mbps=1.0, upload_mbps=0.5)
    return simtime.TimeModel(p, simtime.client_steps(SIZES, 2), 2, 4e6, 2e6)


def trace():
    rows = [(c, a, b) for c, spans in INTERVALS.items() for a, b in spans]
    c, a, b = zip(*rows)
    return simtime.IntervalTrace(c, a, b, N, period_s=PERIOD)


# ---- the reference: plain Python, one client at a time --------------------------------------

def ref_online(i, t):
    if i not in INTERVALS:
        return True
    tt = t % PERIOD
    return any(a <= tt < b for a, b in INTERVALS[i])


def ref_time(m, i, steps=None):
    p = m.profiles
    comm = m.download_bits / p.download_bps[i] + m.upload_bits / p.upload_bps[i]
    step = m.batch_size * p.compute_s[i]
    return comm, step, comm + (m.steps[i] if steps is None else steps) * step


def ref_sync(m, k, rounds, rule, seed, overcommit=1.3, deadline=None, partial=False):
    t, out = 0.0, []
    for r in range(rounds):
        online = [i for i in range(N) if ref_online(i, t)]
        draw = math.ceil(overcommit * k) if rule == "overcommit" else k
        rng = host_rng(seed, r, SAMPLE_STREAM)
        chosen = [online[j] for j in rng.choice(len(online), min(draw, len(online)),
                                                replace=False)]
        times = {i: ref_time(m, i)[2] for i in chosen}
        steps = {i: int(m.steps[i]) for i in chosen}
        if rule == "all":
            kept, length = chosen, max(times.values())
        elif rule == "overcommit":
            by_finish = sorted(range(len(chosen)), key=lambda j: (times[chosen[j]], j))[:k]
            kept = [chosen[j] for j in sorted(by_finish)]
            length = max(times[i] for i in kept)
        elif not partial:
            kept = [i for i in chosen if times[i] <= deadline]
            length = deadline if len(kept) < len(chosen) else max(times.values())
        else:
            kept, length = [], 0.0
            for i in chosen:
                comm, step, _ = ref_time(m, i)
                fit = min(steps[i], max(int((deadline - comm) // step), 0))
                if fit >= 1:
                    kept.append(i)
                    steps[i] = fit
                    length = max(length, comm + fit * step)
            if not kept:
                length = deadline
        slots = sorted(kept, key=lambda i: -SIZES[i])  # stable: ties keep draw order
        out.append((chosen, slots, [steps[i] for i in slots], t + length))
        t += length
    return out


def ref_async(m, k, c, max_staleness, steps_n, seed, online=ref_online):
    """Events: each in-flight update arrives; the K-th usable arrival steps the server."""
    flight, seq, t, plans = [], 0, 0.0, []

    def dispatch(now, version):
        nonlocal seq
        busy = {f[1] for f in flight}
        idle = [i for i in range(N) if i not in busy and online(i, now)]
        free = c - len(flight)
        if free > 0 and idle:
            rng = host_rng(seed, version, SAMPLE_STREAM, 0)
            for j in rng.choice(len(idle), min(free, len(idle)), replace=False):
                i = idle[j]
                flight.append((now + ref_time(m, i)[2], i, version, seq))
                seq += 1

    dispatch(0.0, 0)
    for v in range(steps_n):
        buffer = []
        for f in sorted(flight, key=lambda f: (f[0], f[3])):  # arrivals in time order
            if f[2] >= v - max_staleness:
                buffer.append(f)
                if len(buffer) == k:
                    break
        end = buffer[-1][0]
        stale = [f for f in flight if f[2] < v - max_staleness and f[0] <= end]
        for f in buffer + stale:
            flight.remove(f)
        slots = sorted(buffer, key=lambda f: -SIZES[f[1]])
        plans.append(([f[1] for f in slots], [v - f[2] for f in slots], end, len(stale)))
        t = end
        dispatch(t, v + 1)
    return plans


# ---- the checks -----------------------------------------------------------------------------

@pytest.mark.parametrize("rule, kw", [("all", {}), ("overcommit", {}),
                                      ("deadline", {"deadline_s": 40.0}),
                                      ("deadline", {"deadline_s": 40.0, "partial": True})])
def test_sync_rules_agree_with_the_event_simulator(rule, kw):
    m = model()
    clock = simtime.SyncTimeline(m, trace(), SIZES, 4, seed=3, rule=rule, **kw)
    ref = ref_sync(m, 4, 8, rule, 3, deadline=kw.get("deadline_s"), partial=kw.get("partial"))
    dropped = 0
    for r, (chosen, slots, steps, end) in enumerate(ref):
        plan = clock.plan(r)
        assert plan.selected.tolist() == chosen
        assert plan.clients.tolist() == slots
        assert plan.steps.tolist() == steps
        assert plan.end_s == pytest.approx(end, rel=1e-12)
        dropped += len(chosen) - len(slots)
    if rule != "all":
        assert dropped > 0  # the rule did drop clients in these rounds


def test_all_online_draws_exactly_the_uniform_sampler():
    m = model()
    clock = simtime.SyncTimeline(m, simtime.AlwaysAvailable(N), SIZES, 5, seed=7)
    for r in range(4):
        assert sorted(clock.plan(r).selected) == sorted(uniform_without_replacement(N, 5, 7, r))


@pytest.mark.parametrize("avail", ["always", "trace"])
@pytest.mark.parametrize("k", [3, 1])  # FedBuff's buffer of 3; FedAsync: one update per step
def test_async_staleness_agrees_with_the_event_simulator(avail, k):
    m = model(seed=2)
    a = simtime.AlwaysAvailable(N) if avail == "always" else trace()
    clock = simtime.AsyncTimeline(m, a, SIZES, k, 7, 2, seed=5)
    ref = ref_async(m, k, 7, 2, 10 if k > 1 else 24, seed=5,
                    online=(lambda i, t: True) if avail == "always" else ref_online)
    seen = []
    for v, (clients, staleness, end, discarded) in enumerate(ref):
        plan = clock.plan(v)
        assert plan.clients.tolist() == clients
        assert plan.staleness.tolist() == staleness
        assert plan.end_s == pytest.approx(end, rel=1e-12)
        assert len(plan.selected) - len(plan.clients) == discarded
        seen += staleness
    assert max(seen) > 0 and min(seen) == 0


def test_diurnal_availability_is_deterministic_and_diurnal():
    a = simtime.DiurnalMarkov(20000, seed=0)
    b = simtime.DiurnalMarkov(20000, seed=0)
    at = [a.available(h * 3600.0).mean() for h in range(0, 48, 6)]
    b.available(30 * 3600.0)  # asked out of order: same answers
    assert b.available(12 * 3600.0).tolist() == a.available(12 * 3600.0).tolist()
    assert 0.2 < np.mean(at) < 0.4  # base on-fraction 0.3
    # local 02:00 is the peak: clients whose local time is about 02:00 are on about 50%
    on = a.available(24 * 3600.0)
    hour = np.mod((24 * 3600.0 + a.phase_s) / 3600.0, 24.0)
    assert on[np.abs(hour - 2.0) < 1.5].mean() > on[np.abs(hour - 14.0) < 1.5].mean() + 0.2


def test_profiles_spread_and_csv(tmp_path):
    p = simtime.heterogeneous(20000, seed=0)
    ratio = np.percentile(p.compute_s, 95) / np.percentile(p.compute_s, 5)
    assert 8 < ratio < 12.5
    bw = np.percentile(p.download_bps, 95) / np.percentile(p.download_bps, 5)
    assert 70 < bw < 140
    f = tmp_path / "devices.csv"
    f.write_text("client_id,compute_s_per_example,download_mbps,upload_mbps\n"
                 "b,0.5,2,1\na,0.25,4,\n")
    q = simtime.load_csv(f, [b"a", b"b"])
    assert q.compute_s.tolist() == [0.25, 0.5]
    assert q.download_bps.tolist() == [4e6, 2e6]
    assert q.upload_bps.tolist() == [4e6, 1e6]
    with pytest.raises(ValueError, match="no row for 1 of the 3 clients"):
        simtime.load_csv(f, ["a", "b", "c"])


def test_upload_bits_follow_the_aggregator():
    from fedjax_core.aggregate.compression import stochastic_quantization
    assert simtime.upload_bits(None, 1000) == 32000
    assert simtime.upload_bits(stochastic_quantization(bits=4), 1000) == 4 * 1000 + 64
