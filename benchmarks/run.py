"""The benchmark suite: every scenario, ours against the sequential baseline, as JSON.

    python -m benchmarks.run                         # the whole suite (11-20 min on 2 cores)
    python -m benchmarks.run emnist-cnn --rounds 30  # one scenario
    python -m benchmarks.run --quick                 # a smoke run: 5 rounds, one chunk size
    fedjax bench ...                                 # the same, from the CLI

Each scenario runs in two fresh processes, one for the library's round ("ours": the
jitted `fedjax_core.algorithms.base.jit_round` of FedAvg over `FederatedDataset`
cohorts, every candidate chunk size tried, the fastest reported) and one for the
sequential baseline (`benchmarks.baseline`), so that each peak memory (`ru_maxrss`)
is that scenario's alone and no compiled code is shared. Both time the same cohorts.
Results: `OUT/<scenario>.json` and `OUT/summary.json` (default `benchmarks/results/`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import measure
from benchmarks.scenarios import DESCRIPTIONS, SCENARIOS, Options, build

RESULTS = Path(__file__).parent / "results"
"""Where the suite's JSON files are kept in a source checkout."""
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_out() -> Path:
    """`benchmarks/results` of the source checkout; `./bench-results` for an installed copy."""
    return RESULTS if (PROJECT_ROOT / "pyproject.toml").exists() else Path("bench-results")

TARGETS = {
    "emnist-cnn": "speed-up over the baseline >= 1.5x and >= 60% of the measured matmul FLOP/s",
    "emnist-logreg": "speed-up over the baseline >= 20x",
    "cohort-1000": "speed-up over the baseline >= 20x",
    "cohort-10000": "speed-up over the baseline >= 20x; peak memory <= 1.2x that of cohort-1000",
    "padded": "padded steps < 15% on EMNIST-like client sizes (emnist-cnn, emnist-logreg, cohorts)",
}
"""The issue's targets, checked in `summary.json` under `targets`."""


# ==== the worker side: runs in a subprocess, one side of one scenario =========================

class _Rounds:
    """Times FedAvg rounds of the library with one chunk size, pipelined as
    `fedjax_api.Experiment` runs them: round r is dispatched, cohort r+1 is packed while
    it runs, then the round is waited for. A round's time covers all of that."""

    def __init__(self, setup, algorithm, chunk_size, state, key):
        import jax

        from fedjax_core import parallel
        from fedjax_core.algorithms.base import jit_round

        self.setup, self.chunk_size, self.state, self.key = setup, chunk_size, state, key
        self.step = jit_round(algorithm, setup.model, parallel.Plan(chunk_size=chunk_size))
        self.r = 0
        self.shapes = {}
        self.rows = []
        self.loss = None
        self._jax = jax

    def _shape(self, cohort):
        jax = self._jax
        return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(cohort))

    def advance(self, end: int) -> None:
        """Runs rounds `self.r .. end - 1`."""
        from benchmarks.scenarios import examples_seen, step_counts
        from fedjax_core.data.pack import padded_fraction

        jax, s = self._jax, self.setup
        t = time.perf_counter()
        cohort = s.cohort(self.r, dense=False)
        pack = time.perf_counter() - t
        while self.r < end:
            assert cohort is not None  # the next round's cohort is packed while this one runs
            r = self.r
            key = jax.random.fold_in(self.key, r)
            shape = self._shape(cohort)
            if shape not in self.shapes:
                t = time.perf_counter()
                self.step.lower(self.state, cohort, key).compile()
                self.shapes[shape] = time.perf_counter() - t
            snap = measure.cpu_snapshot()
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, cohort, key)
            t1 = time.perf_counter()
            nxt = s.cohort(r + 1, dense=False) if r + 1 < end else None
            next_pack = time.perf_counter() - t1
            jax.block_until_ready((self.state, metrics))
            dt = time.perf_counter() - t0
            foreign, own = measure.foreign_cpu(snap, measure.cpu_snapshot())
            self.rows.append({
                "round": r, "s": dt, "pack_s": pack, "examples": examples_seen(cohort),
                "steps": sum(step_counts(cohort)), "clients": int(cohort.num_clients),
                "padded_fraction": padded_fraction(cohort, s.batch_size, s.epochs,
                                                   self.chunk_size),
                "foreign_cpu_s": foreign, "own_cpu_s": own})
            self.loss = metrics["train/loss"]
            cohort, pack = nxt, next_pack
            self.r += 1
        if self.loss is not None:
            self.loss = float(self.loss)

    def summary(self, warmup: int) -> dict:
        timed = [row for row in self.rows if row["round"] >= warmup]
        times = [row["s"] for row in timed]
        compiles = list(self.shapes.values())
        out = {"chunk_size": self.chunk_size, "rounds_timed": len(timed),
               **measure.summarize_times(times),
               "compile_s": compiles[0] if compiles else None,
               "compile_total_s": sum(compiles), "compiled_shapes": len(compiles),
               "first_round_s": self.rows[0]["s"] if self.rows else None,
               "median_pack_s": statistics.median(r["pack_s"] for r in timed) if timed else None,
               "median_padded_fraction":
                   statistics.median(r["padded_fraction"] for r in timed) if timed else None,
               "last_loss": self.loss, "rounds": self.rows}
        return out


def _rates(rows: list[dict], flops: dict) -> dict:
    """Median over rounds of examples/s and FLOP/s (analytic FLOPs x examples seen)."""
    if not rows:
        return {}
    out = {"examples_per_s": statistics.median(r["examples"] / r["s"] for r in rows),
           "flops_per_s": statistics.median(r["examples"] * flops["train"] / r["s"] for r in rows),
           "median_examples_per_round": statistics.median(r["examples"] for r in rows),
           "median_steps_per_round": statistics.median(r["steps"] for r in rows),
           "median_foreign_cpu_share": statistics.median(
               r["foreign_cpu_s"] / max(r["foreign_cpu_s"] + r["own_cpu_s"], 1e-9) for r in rows)}
    if "conv_train" in flops:
        out["conv_flops_per_s"] = statistics.median(
            r["examples"] * flops["conv_train"] / r["s"] for r in rows)
    return out


def _ours_train(setup, options: Options) -> dict:
    import jax
    import optax

    from fedjax_core.algorithms.fedavg import fedavg

    alg = fedavg(optax.sgd(setup.client_lr), optax.sgd(setup.server_lr))
    state0 = alg.init(jax.jit(setup.model.init)(jax.random.key(0)))
    key = jax.random.key(0)
    w, n = options.warmup, options.rounds
    cands = setup.chunk_sizes
    sel = min(options.select_rounds, n) if len(cands) > 1 else n
    variants, runs = {}, {}
    for cs in cands:
        run = _Rounds(setup, alg, cs, state0, key)
        run.advance(w + sel)
        variants[cs] = run.summary(w)
        runs[cs] = run
        print(f"  ours chunk_size={cs}: median {variants[cs]['median_s']:.4f} s/round over "
              f"{sel} rounds (compile {variants[cs]['compile_s']:.1f} s)", flush=True)
    best = min(cands, key=lambda c: variants[c]["median_s"])
    if sel < n:
        runs[best].advance(w + n)
    result = runs[best].summary(w)
    timed = [r for r in result["rounds"] if r["round"] >= w]
    for cs, v in variants.items():
        v["selection_rounds"] = sel
        v.pop("rounds")
    return {"best_chunk_size": best, **result, **_rates(timed, setup.flops),
            "candidates": {f"chunk_size={cs}": v for cs, v in variants.items()},
            "compile_method": "lower(...).compile() of the jitted round, timed for each new "
                              "cohort shape before its first round"}


def _eval_padded(total: int, batch_size: int, group: int = 16) -> float:
    """Padded share of the example slots `fedjax_core.evaluate` computes: full groups of
    `group` batches, then the remainder's batches rounded up to a power of two."""
    full, rest = divmod(total, group * batch_size)
    last = min(group, 1 << (-(-rest // batch_size) - 1).bit_length()) if rest else 0
    return 1.0 - total / ((full * group + last) * batch_size)


def _time_eval(fn, options: Options) -> list[dict]:
    rows = []
    for r in range(options.warmup + options.rounds):
        snap = measure.cpu_snapshot()
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        foreign, own = measure.foreign_cpu(snap, measure.cpu_snapshot())
        rows.append({"round": r, "s": dt, "foreign_cpu_s": foreign, "own_cpu_s": own})
    return rows


def _eval_summary(rows, options, total, flops, padded, metrics) -> dict:
    timed = [r for r in rows if r["round"] >= options.warmup]
    s = measure.summarize_times([r["s"] for r in timed])
    for r in rows:
        r["examples"] = total
        r["steps"] = 0
    fwd = {"train": flops["forward"]}
    if "conv_forward" in flops:
        fwd["conv_train"] = flops["conv_forward"]
    out = {**s, "rounds_timed": len(timed), "first_round_s": rows[0]["s"],
           "compile_s": max(0.0, rows[0]["s"] - s["median_s"]),
           "compile_method": "first call minus the median of the timed calls",
           "median_padded_fraction": padded, "metrics": metrics, "rounds": rows,
           **_rates(timed, fwd)}
    out.pop("median_steps_per_round", None)
    return out


def _ours_eval(setup, options: Options) -> dict:
    import jax

    from fedjax_core.evaluate import evaluate

    params = jax.jit(setup.model.init)(jax.random.key(0))
    out = {}

    def once():
        out["m"] = evaluate(setup.model, params, setup.eval_data, setup.eval_batch_size)

    rows = _time_eval(once, options)
    total = int(sum(setup.eval_data.client_sizes))
    res = _eval_summary(rows, options, total, setup.flops,
                        _eval_padded(total, setup.eval_batch_size), out["m"])
    return {"best_chunk_size": None, **res}


def _probe_step(runner, params, cohort, key, steps: int = 8) -> tuple[float, float]:
    """`(median seconds of the baseline's jitted step on the first client's batches,
    seconds to compile it)`."""
    import jax
    import jax.numpy as jnp

    compile_s = runner.compile_step(params, cohort, key)
    w, s, l0 = params, runner.init(params), jnp.float32(0)
    real = int(cohort.mask[0].any(axis=-1).sum())
    times = []
    for k in range(steps + 2):
        kk = k % max(real, 1)
        batch = {n: v[0, kk] for n, v in cohort.batches.items()}
        t = time.perf_counter()
        w, s, l0 = runner.sgd_step(w, s, l0, batch, cohort.mask[0, kk], key, 0, kk)
        jax.block_until_ready(w)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]), compile_s


def _baseline_train(setup, options: Options) -> dict:
    import jax
    import numpy as np

    from benchmarks.baseline import SequentialFedAvg
    from benchmarks.scenarios import examples_seen, step_counts

    key = jax.random.key(0)
    params = jax.jit(setup.model.init)(jax.random.key(0))
    cohort0 = setup.cohort(0, dense=True)
    probes, compiles = {}, {}
    runners = {name: SequentialFedAvg(m, setup.client_lr, setup.server_lr)
               for name, m in setup.baseline_models.items()}
    if len(runners) > 1:
        for name, runner in runners.items():
            probes[name], compiles[name] = _probe_step(runner, params, cohort0, key)
            print(f"  baseline step with {name}: {1000 * probes[name]:.1f} ms", flush=True)
        chosen = min(probes, key=lambda n: probes[n])
    else:
        chosen = next(iter(runners))
    runner = runners[chosen]
    # The probe compiled the chosen step already (a second lowering hits the cache).
    compile_s = compiles.get(chosen) or runner.compile_step(params, cohort0, key)
    xla = measure.xla_flops(runner.step_flops(params, cohort0, key))
    del cohort0
    sub = setup.baseline_clients
    rows = []
    loss = None
    for r in range(options.warmup + options.rounds):
        snap = measure.cpu_snapshot()
        t0 = time.perf_counter()
        cohort = setup.cohort(r, dense=True)
        pack = time.perf_counter() - t0
        c = cohort.num_clients
        slots = None if not sub or sub >= c else np.unique(np.linspace(0, c - 1, sub).round()
                                                          .astype(int)).tolist()
        t1 = time.perf_counter()
        params, loss = runner.round(params, cohort, jax.random.fold_in(key, r), clients=slots)
        jax.block_until_ready(params)
        train = time.perf_counter() - t1
        foreign, own = measure.foreign_cpu(snap, measure.cpu_snapshot())
        scale = 1.0 if slots is None else c / len(slots)
        rows.append({"round": r, "s": pack + scale * train, "pack_s": pack,
                     "measured_s": pack + train, "timed_clients": c if slots is None else len(slots),
                     "examples": examples_seen(cohort), "steps": sum(step_counts(cohort)),
                     "clients": c, "foreign_cpu_s": foreign, "own_cpu_s": own})
        del cohort
    timed = [r for r in rows if r["round"] >= options.warmup]
    extrapolated = any(r["timed_clients"] < r["clients"] for r in rows)
    out = {**measure.summarize_times([r["s"] for r in timed]), "rounds_timed": len(timed),
           "first_round_s": rows[0]["s"], "compile_s": compile_s,
           "compile_method": "lower(...).compile() of the per-batch SGD step",
           "model_variant": chosen, "step_probe_s": probes or None,
           "xla_flops_per_step": xla,
           "xla_flops_per_example": None if xla is None else xla / setup.batch_size,
           "last_loss": None if loss is None else float(loss), "extrapolated": extrapolated, "rounds": rows,
           **_rates(timed, setup.flops)}
    if extrapolated:
        out["extrapolation"] = (f"each round: packing of the whole cohort (measured) + training "
                                f"time of {sub} of its clients, evenly spaced in slot order "
                                f"(slots are ordered by size), times cohort size / {sub}")
    return out


def _baseline_eval(setup, options: Options) -> dict:
    import jax

    from benchmarks.baseline import sequential_evaluate

    params = jax.jit(setup.model.init)(jax.random.key(0))
    out = {}

    def once():
        out["m"] = sequential_evaluate(setup.model, params, setup.eval_data,
                                       setup.eval_batch_size)

    rows = _time_eval(once, options)
    total = int(sum(setup.eval_data.client_sizes))
    return _eval_summary(rows, options, total, setup.flops,
                         _eval_padded(total, setup.eval_batch_size, group=1), out["m"])


def worker(side: str, name: str, options: Options) -> dict:
    """One side ("ours" or "baseline") of scenario `name`, in this process."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # compile times stay cold
    t = time.perf_counter()
    setup = build(name, options)
    build_s = time.perf_counter() - t
    if setup.kind == "train":  # device-resident data goes to the device at the first cohort
        assert setup.cohort is not None  # every train scenario packs cohorts
        setup.cohort(0, dense=side != "ours")
    data_rss = measure.peak_rss_mb()
    matmul = measure.matmul_gflops()
    rss_start = measure.reset_peak_rss()
    print(f"[{name} / {side}] built in {build_s:.1f} s; matmul {matmul['gflops']:.0f} GFLOP/s",
          flush=True)
    if setup.kind == "eval":
        res = _ours_eval(setup, options) if side == "ours" else _baseline_eval(setup, options)
    else:
        res = _ours_train(setup, options) if side == "ours" else _baseline_train(setup, options)
    hwm = measure.peak_rss_since_reset_mb()
    res.update(peak_rss_mb=measure.peak_rss_mb(), rss_after_build_mb=data_rss,
               rss_before_rounds_mb=rss_start, rounds_peak_rss_mb=hwm if rss_start else None,
               rounds_added_mb=hwm - rss_start if rss_start and hwm else None,
               build_s=build_s, matmul=matmul, device_peak_mb=measure.device_peak_mb())
    return {"setup": {"kind": setup.kind, "clients_per_round": setup.clients_per_round,
                      "batch_size": setup.batch_size, "epochs": setup.epochs,
                      "client_lr": setup.client_lr, "server_lr": setup.server_lr,
                      "flops_per_example": setup.flops, "chunk_sizes_tried": setup.chunk_sizes,
                      **setup.info},
            "result": res}


# ==== the driver side ===========================================================================

def spawn(side: str, name: str, options: Options, out_dir: Path, timeout: float) -> dict:
    """Runs one side (`"ours"` or `"baseline"`) of scenario `name` in a fresh process.

    Args:
      side: `"ours"` or `"baseline"`.
      name: a scenario of `SCENARIOS`.
      options: the run's `Options`.
      out_dir: where the worker writes its result file (`.NAME-SIDE.json`).
      timeout: seconds the worker may take.

    Returns:
      The worker's result dict, or `{"error": ...}` when it exited with an error.

    Raises:
      subprocess.TimeoutExpired: the worker ran longer than `timeout`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / f".{name}-{side}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH"))
                                        if p)
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", side, name,
           "--options", json.dumps(options._asdict()), "--result", str(result)]
    proc = subprocess.run(cmd, env=env, timeout=timeout)
    if proc.returncode != 0 or not result.exists():
        return {"error": f"the {side} worker of {name} exited with code {proc.returncode}"}
    data = json.loads(result.read_text())
    result.unlink()
    return data


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def combine(name: str, ours: dict, baseline: dict | None, fedjax: dict | None,
            options: Options) -> dict:
    """One scenario's JSON: settings, both sides, and the derived ratios."""
    o = ours.get("result", {})
    b = (baseline or {}).get("result")
    setup = ours.get("setup", (baseline or {}).get("setup", {}))
    peak = (o.get("matmul") or {}).get("gflops")
    out = {"scenario": name, "description": DESCRIPTIONS[name],
           "options": options._asdict(), "setup": setup, "ours": o or ours, "baseline": b or baseline,
           "matmul_gflops": peak,
           "speedup_vs_baseline": _ratio((b or {}).get("median_s"), o.get("median_s")),
           "flops_fraction_of_matmul": _ratio(o.get("flops_per_s"), None if peak is None
                                              else peak * 1e9),
           "baseline_flops_fraction_of_matmul": _ratio((b or {}).get("flops_per_s"),
                                                       None if peak is None else peak * 1e9)}
    if o.get("conv_flops_per_s") is not None and peak:
        out["conv_flops_fraction_of_matmul"] = o["conv_flops_per_s"] / (peak * 1e9)
    if b and o.get("last_loss") is not None and not b.get("extrapolated"):
        out["loss_ours_vs_baseline"] = [o.get("last_loss"), b.get("last_loss")]
    if fedjax is not None and name in ("emnist-cnn", "emnist-eval"):
        key = "median_round_s" if name == "emnist-cnn" else "eval_median_s"
        fj = fedjax.get(key)
        out["fedjax_0.0.17"] = {
            "median_s": fj, "speedup": _ratio(fj, o.get("median_s")),
            "jax": fedjax.get("jax"), "timed_rounds": fedjax.get("timed_rounds"),
            "foreign_cpu_total_s": fedjax.get("foreign_cpu_total_s"),
            "note": "FedJAX 0.0.17's own benchmark (../shared/bench/fedjax_emnist_bench.py) on "
                    "the same clients in the same round order; run separately, see its JSON"}
    return out


def _targets(rows: dict) -> dict:
    def get(name, key):
        return (rows.get(name) or {}).get(key)

    out = {}
    cnn_s, cnn_f = get("emnist-cnn", "speedup_vs_baseline"), get("emnist-cnn", "flops_fraction")
    if cnn_s is not None:
        out["emnist-cnn"] = {"target": TARGETS["emnist-cnn"], "speedup": cnn_s,
                             "flops_fraction": cnn_f,
                             "met": bool(cnn_s >= 1.5 and (cnn_f or 0) >= 0.6)}
    for name in ("emnist-logreg", "cohort-1000", "cohort-10000"):
        s = get(name, "speedup_vs_baseline")
        if s is not None:
            out[name] = {"target": TARGETS[name].split(";")[0], "speedup": s, "met": bool(s >= 20)}
    m1, m10 = get("cohort-1000", "peak_mb"), get("cohort-10000", "peak_mb")
    if m1 and m10:
        a1, a10 = get("cohort-1000", "rounds_added_mb"), get("cohort-10000", "rounds_added_mb")
        out["cohort-memory"] = {
            "target": "peak memory of cohort-10000 <= 1.2x cohort-1000",
            "ratio": m10 / m1, "met": bool(m10 <= 1.2 * m1),
            "rounds_added_mb": [a1, a10],
            "note": "ratio of the workers' whole-process peaks (ru_maxrss: the population, "
                    "its device copy and the rounds); rounds_added_mb is what the timed "
                    "rounds added above the memory resident before them (VmHWM)"}
    fractions = {n: get(n, "padded_fraction")
                 for n in ("emnist-cnn", "emnist-logreg", "cohort-1000", "cohort-10000")}
    padded = {n: v for n, v in fractions.items() if v is not None}
    if padded:
        out["padded"] = {"target": TARGETS["padded"], "fractions": padded,
                         "met": bool(all(v < 0.15 for v in padded.values()))}
    return out


def row(result: dict) -> dict:
    """The table's cells of one scenario's JSON."""
    o, b = result.get("ours") or {}, result.get("baseline") or {}
    fj = result.get("fedjax_0.0.17") or {}
    return {"scenario": result["scenario"], "ours_s": o.get("median_s"),
            "baseline_s": b.get("median_s"), "speedup_vs_baseline": result.get("speedup_vs_baseline"),
            "baseline_extrapolated": bool(b.get("extrapolated")),
            "flops_fraction": result.get("flops_fraction_of_matmul"),
            "conv_flops_fraction": result.get("conv_flops_fraction_of_matmul"),
            "padded_fraction": o.get("median_padded_fraction"),
            # device memory on an accelerator, the host's RSS on a CPU (where they are one)
            "peak_mb": o.get("device_peak_mb") or o.get("peak_rss_mb"),
            "baseline_peak_mb": b.get("device_peak_mb") or b.get("peak_rss_mb"),
            "rounds_added_mb": o.get("rounds_added_mb"),
            "compile_s": o.get("compile_s"), "best_chunk_size": o.get("best_chunk_size"),
            "examples_per_s": o.get("examples_per_s"),
            "fedjax_s": fj.get("median_s"), "speedup_vs_fedjax": fj.get("speedup"),
            "error": o.get("error") or b.get("error")}


def run_suite(names=None, options: Options = Options(), out_dir: Path | str | None = None,
              fedjax_json: Path | str | None = None, baseline: bool = True,
              timeout: float = 3600.0) -> dict:
    """Runs scenarios `names` (default: all), writes their JSON and `summary.json`.

    The summary's rows cover every scenario JSON in `out_dir`, so one scenario can be
    re-run and the summary stays whole (each row's `finished` says when it ran).

    Args:
      names: scenario names (see `scenarios.SCENARIOS`); None: all.
      options: rounds, warm-up, candidates and scale-down options.
      out_dir: where the JSON files go (None: `default_out()`).
      fedjax_json: the JSON of FedJAX 0.0.17's own benchmark, to compare scenarios
        `emnist-cnn` (median round) and `emnist-eval` (median evaluation) with.
      baseline: also time the sequential baseline.
      timeout: seconds allowed per worker process.

    Returns:
      The summary (also in `out_dir/summary.json`).

    Example:
      >>> summary = run_suite(["emnist-logreg"], Options(rounds=2, num_clients=40,
      ...                     clients_per_round=4), out_dir="/tmp/bench")
      >>> summary["rows"]["emnist-logreg"]["speedup_vs_baseline"]
    """
    names = list(names or SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            raise ValueError(f"unknown scenario {n!r}; choose from {', '.join(SCENARIOS)}")
    out_dir = default_out() if out_dir is None else Path(out_dir)
    fedjax = json.loads(Path(fedjax_json).read_text()) if fedjax_json else None
    started = time.time()
    rows = {}
    for n in names:
        print(f"== {n}: {DESCRIPTIONS[n]}", flush=True)
        t = time.perf_counter()
        ours = spawn("ours", n, options, out_dir, timeout)
        base = spawn("baseline", n, options, out_dir, timeout) if baseline else None
        result = combine(n, ours, base, fedjax, options)
        result["wall_s"] = time.perf_counter() - t
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (out_dir / f"{n}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(format_table({n: row(result)}), flush=True)
    # The summary covers every scenario whose JSON is in out_dir: those run now and any
    # kept from an earlier run (each row says when it finished).
    matmuls = {}
    for n in SCENARIOS:
        try:
            r = json.loads((out_dir / f"{n}.json").read_text())
        except (OSError, ValueError):
            continue
        rows[n] = {**row(r), "finished": r.get("finished"), "rerun": n in names}
        if r.get("matmul_gflops"):
            matmuls[n] = r["matmul_gflops"]
    summary = {"machine": measure.machine_info(), "options": options._asdict(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
               "wall_s": time.time() - started, "scenarios_run": names,
               "matmul_gflops_per_scenario": matmuls,
               "fedjax_json": str(fedjax_json) if fedjax_json else None,
               "rows": rows, "targets": _targets(rows)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if kind == "x":
        return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"
    if kind == "%":
        return f"{100 * v:.0f}%" if v >= 0.01 or v == 0 else f"{100 * v:.1f}%"
    if kind == "mb":
        return f"{v:.0f}"
    return str(v)


COLUMNS = [("scenario", "scenario", ""), ("ours_s", "s/round ours", "s"),
           ("baseline_s", "baseline", "s"), ("speedup_vs_baseline", "speed-up", "x"),
           ("flops_fraction", "FLOP/s %", "%"), ("padded_fraction", "padded %", "%"),
           ("peak_mb", "peak MB", "mb"), ("compile_s", "compile s", "s"),
           ("best_chunk_size", "chunk", "")]
"""(row key, header, format) of the printed table."""


def table_cells(r: dict) -> list[str]:
    """The printed cells of one row (`row(...)`), in `COLUMNS` order."""
    cells = []
    for key, _, kind in COLUMNS:
        v = r.get(key)
        cell = _fmt(v, kind)
        if key == "baseline_s" and r.get("baseline_extrapolated") and v is not None:
            cell += "*"
        if key == "flops_fraction" and r.get("conv_flops_fraction") is not None:
            cell += f" (conv {_fmt(r['conv_flops_fraction'], '%')})"
        cells.append(cell)
    return cells


def format_table(rows: dict) -> str:
    """A plain-text table of `{scenario: row}`."""
    head = [h for _, h, _ in COLUMNS]
    body = [table_cells(r) for r in rows.values()]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
    for r in rows.values():
        if r.get("speedup_vs_fedjax") is not None:
            lines.append(f"{r['scenario']}: FedJAX 0.0.17 {r['fedjax_s']:.3f} s, speed-up "
                         f"{r['speedup_vs_fedjax']:.2f}x")
        if r.get("error"):
            lines.append(f"{r['scenario']}: {r['error']}")
    if any(r.get("baseline_extrapolated") for r in rows.values()):
        lines.append("* baseline extrapolated from a subset of each cohort's clients")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """The results table of `docs/benchmarks.md` from a `summary.json`."""
    m = summary["machine"]
    peaks = list((summary.get("matmul_gflops_per_scenario") or {}).values())
    matmul = f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s" if peaks else "-"
    intro = (f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, {m.get('memory_gib')} GiB; "
             f"JAX {m['jax']} ({m['backend']}); f32 matmul measured at {matmul} in the "
             f"scenarios' workers, each just before its rounds; "
             f"{summary['options']['rounds']} timed rounds after "
             f"{summary['options']['warmup']} warm-up rounds.")
    lines = [intro, "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "| " + " | ".join(["---"] * len(COLUMNS)) + " |"]
    for r in summary["rows"].values():
        lines.append("| " + " | ".join(f"`{c}`" if i == 0 else c
                                       for i, c in enumerate(table_cells(r))) + " |")
    notes = [f"- `{r['scenario']}` against FedJAX 0.0.17 itself: FedJAX {r['fedjax_s']:.3f} s, "
             f"speed-up {r['speedup_vs_fedjax']:.2f}x." for r in summary["rows"].values()
             if r.get("speedup_vs_fedjax") is not None]
    if notes:
        lines += [""] + notes
    if any(r.get("baseline_extrapolated") for r in summary["rows"].values()):
        lines.append("")
        lines.append("`*` baseline extrapolated from 1,000 of each cohort's clients.")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="fedjax-sim benchmark suite (writes JSON).")
    p.add_argument("scenarios", nargs="*", help=f"scenarios (default all): {', '.join(SCENARIOS)}")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first rounds (default 3)")
    p.add_argument("--select-rounds", type=int, default=None,
                   help="rounds per candidate chunk size before choosing (default 3)")
    p.add_argument("--chunk-sizes", default=None, help="candidate chunk sizes, e.g. 1,10,100")
    p.add_argument("--num-clients", type=int, default=None, help="population (scale down)")
    p.add_argument("--clients-per-round", type=int, default=None, help="cohort (scale down)")
    p.add_argument("--baseline-clients", type=int, default=None,
                   help="clients per cohort the baseline times before extrapolating (default 1000)")
    p.add_argument("--quick", action="store_true",
                   help="5 timed rounds, 1 warm-up, one chunk size per scenario")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                   help="compute precision of every model (f32 params either way)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--fedjax-json", default=None,
                   help="JSON of FedJAX 0.0.17's benchmark, to compare emnist-cnn and emnist-eval")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    p.add_argument("--markdown", default=None, metavar="SUMMARY_JSON",
                   help="print the docs' results table of a summary.json and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--options", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def make_options(rounds=None, warmup=None, select_rounds=None, chunk_sizes=None,
                 num_clients=None, clients_per_round=None, baseline_clients=None,
                 quick=False, precision="f32") -> Options:
    """`Options` from command-line values (None: default; `quick` changes the defaults)."""
    if isinstance(chunk_sizes, str):
        chunk_sizes = tuple(int(c) for c in chunk_sizes.split(",") if c.strip())
    return Options(rounds=rounds if rounds is not None else (5 if quick else 20),
                   warmup=warmup if warmup is not None else (1 if quick else 3),
                   select_rounds=select_rounds if select_rounds is not None else (2 if quick else 3),
                   chunk_sizes=tuple(chunk_sizes) if chunk_sizes else None,
                   num_clients=num_clients, clients_per_round=clients_per_round,
                   baseline_clients=baseline_clients, quick=quick, precision=precision)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.worker:
        raw = json.loads(args.options)
        if raw.get("chunk_sizes") is not None:
            raw["chunk_sizes"] = tuple(raw["chunk_sizes"])
        data = worker(args.worker, args.scenarios[0], Options(**raw))
        Path(args.result).write_text(json.dumps(data))
        return
    options = make_options(args.rounds, args.warmup, args.select_rounds, args.chunk_sizes,
                           args.num_clients, args.clients_per_round, args.baseline_clients,
                           args.quick, args.precision)
    summary = run_suite(args.scenarios or None, options, args.out, args.fedjax_json,
                        baseline=not args.no_baseline, timeout=args.timeout)
    print()
    print(format_table({n: summary["rows"][n] for n in summary["scenarios_run"]
                        if n in summary["rows"]}))
    print(f"machine: {summary['machine']['cpu_model']}, {summary['machine']['cpu_count']} cores, "
          f"jax {summary['machine']['jax']} ({summary['machine']['backend']}); results in "
          f"{args.out or default_out()}")


if __name__ == "__main__":
    main()
