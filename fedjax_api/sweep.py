"""`Sweep`: K runs of one task that differ in their learning rates, options or seed, as one program.

Every member computes what its own `Experiment` would (same cohorts, keys, batches and
evaluation; equal up to floating-point reassociation, 1e-5 in the tests), but all members
train in one jitted call per round
(`fedjax_core.sweep.sweep_round`): members that share a seed share the sampled cohort and
train side by side under `vmap`.

A run directory holds, beside `sweep.json` (the members, their final metrics and ranks)
and `summary.csv` (one row per member), one ordinary run directory per member under
`members/` (`config.json`, `config.toml`, `metrics.jsonl`, `train.csv`, `eval.csv`), so
`fedjax report` and `fedjax plot` read each member as a run, and
`fedjax run --config members/<member>/config.toml` repeats one alone.
"""

import csv
import io
import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from fedjax_api import rundir
from fedjax_api.algorithm import AlgorithmOptions, build_algorithm
from fedjax_api.callbacks import (
    Callback,
    Evaluation,
    Evaluator,
    NonFiniteGuard,
    RunDirOwner,
    RunLog,
    TensorBoard,
)
from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_api.experiment import Experiment
from fedjax_api.loop import Loop, OnRecord, cohort_sampler, final_metrics
from fedjax_api.report import higher_is_better
from fedjax_api.server import SweepServer, keeps_client_state
from fedjax_api.versions import versions
from fedjax_core import atomic
from fedjax_core import sweep as core
from fedjax_core.parallel import Plan

SUMMARY_FILE = "sweep.json"
TABLE_FILE = "summary.csv"
MEMBERS_DIR = "members"

SWEEPABLE = ("client_lr", "server_lr")
"""Config fields a member may set beside its seed and the algorithm's numeric options."""

@attrs.frozen(kw_only=True)
class Member:
    """One run of a sweep: its learning rates, seed and algorithm options.

    Attributes:
      client_lr: client SGD learning rate.
      server_lr: server learning rate.
      seed: seeds sampling, shuffles, the init and the client keys (as `Experiment.seed`).
      options: algorithm options of this member (e.g. `{"b2": 0.999}`), over the config's.
    """

    client_lr: float = attrs.field(converter=float)
    server_lr: float = attrs.field(converter=float)
    seed: int = attrs.field(converter=int)
    options: dict[str, float] = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        """e.g. `client_lr=0.01 server_lr=1 seed=0`."""
        parts = [f"client_lr={self.client_lr:g}", f"server_lr={self.server_lr:g}"]
        parts += [f"{k}={_fmt(v)}" for k, v in sorted(self.options.items())]
        return " ".join(parts + [f"seed={self.seed}"])

    def settings(self) -> dict:
        """The member's values, flat: `{"client_lr", "server_lr", "seed", **options}`."""
        return {"client_lr": self.client_lr, "server_lr": self.server_lr, "seed": self.seed,
                **self.options}


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@attrs.frozen(kw_only=True)
class MemberResult:
    """One member's outcome.

    Attributes:
      member: the member.
      history: its records (as `RunResult.history`).
      final: `{"test": metrics, "train": metrics}` after the last round.
      diverged_round: the first round whose loss or update norm was NaN or infinite
        (the member trained on, its metrics NaN), or None.
      out_dir: its run directory, or None.
    """

    member: Member
    history: list[dict]
    final: dict[str, dict[str, float]]
    diverged_round: int | None = None
    out_dir: Path | None = None


@attrs.frozen(kw_only=True)
class SweepResult:
    """What `Sweep.run` returns.

    Attributes:
      members: one `MemberResult` per member, in the sweep's order.
      state: the algorithm's state of every member, leaves `[S, H, ...]` (see `layout`).
      layout: where each member sits in `state` (`fedjax_core.sweep.member(state, layout, k)`).
      wall_time_s: seconds the whole sweep took.
    """

    members: list[MemberResult]
    state: object = attrs.field(repr=False)
    layout: core.Layout = attrs.field(repr=False)
    wall_time_s: float = 0.0

    def ranked(self, metric: str | None = None) -> list[MemberResult]:
        """Members best first by the final `metric` (e.g. "test/accuracy"; default: test
        accuracy if reported, else test loss); losses, errors and perplexities rank lowest
        first (`report.higher_is_better`), other metrics highest first; NaN last."""
        metric = metric or default_metric(self.members[0].final)
        split, _, name = metric.partition("/")
        lower = higher_is_better(name) is False  # losses, errors, perplexities

        def key(m):
            v = m.final.get(split, {}).get(name, math.nan)
            return (not math.isfinite(v), v if lower else -v) if isinstance(v, float) else (
                True, 0.0)
        return sorted(self.members, key=key)


def default_metric(final: dict) -> str:
    """The metric a sweep ranks by: test accuracy when reported, else test loss."""
    return "test/accuracy" if "accuracy" in final.get("test", {}) else "test/loss"


def _values(name: str, given, default) -> list:
    values = [default] if given is None else list(given)
    if not values:
        raise ConfigError(f"--{name.replace('_', '-')} needs at least one value")
    return values


@attrs.frozen(kw_only=True)
class Sweep:
    """Runs K members of one configuration as one program per round.

    Attributes:
      config: what the members share (task, algorithm, rounds, clients per round, ...);
        its `client_lr`, `server_lr`, `seed` and `algorithm_options` are overridden by
        each member's.
      members: the members (at least one).
      seeds_together: seeds (cohorts) trained together under `vmap`; 1 runs them one
        after another inside the program (the members of each seed together), the fastest
        on a CPU. See `fedjax_core.sweep.sweep_round`.
      examples_on_device: put the training examples on the device once and pack only
        example indices each round (`FederatedDataset.device_resident`); the batches are
        the same. None: when the task's data is device-resident already, or has no
        per-round augmentation and its training examples fit in `max_cohort_bytes` of its
        dataset (256 MiB by default).
      out_dir: the sweep's run directory, or None to write nothing.

    Swept values (those that differ between members) enter the program as traced numbers;
    an algorithm that uses one to set a shape or a Python branch (e.g. q-FFL's client
    learning rate, HypCluster's number of clusters) is refused with a `ConfigError`
    naming it, and so is an algorithm that keeps state per client. Private (DP) runs are
    not swept.

    Example:
      >>> cfg = config.resolve("synthetic", rounds=20)
      >>> sweep = Sweep.grid(cfg, client_lr=[0.003, 0.01, 0.03], seeds=[0, 1])
      >>> result = sweep.run()
      >>> best = result.ranked()[0]
      >>> best.member.label, best.final["test"]["accuracy"]
    """

    config: ExperimentConfig
    members: tuple[Member, ...] = attrs.field(converter=tuple)
    seeds_together: int = 1
    examples_on_device: bool | None = None
    out_dir: Path | None = attrs.field(default=None,
                                       converter=attrs.converters.optional(Path))

    def __attrs_post_init__(self):
        if not self.members:
            raise ConfigError("a sweep needs at least one member")
        if self.seeds_together < 1:
            raise ConfigError(f"seeds-together must be at least 1, got {self.seeds_together}")
        if self.config.private:
            raise ConfigError("a sweep does not run private (DP) training: run each setting "
                              "with `fedjax run` and its --clip/--noise-multiplier options")
        if getattr(self.config, "devices", 1) != 1:
            raise ConfigError("a sweep runs on one device: drop --devices (its members "
                              "already train side by side)")
        seen = {}
        for m in self.members:
            if m.label in seen:
                raise ConfigError(f"member {m.label} is given twice; give each setting once")
            seen[m.label] = m
        keys = {tuple(sorted(m.options)) for m in self.members}
        if len(keys) > 1:
            raise ConfigError("every member must set the same algorithm options; got "
                              f"{' and '.join(str(list(k)) for k in sorted(keys))}")
        for name in self.swept():
            if any(isinstance(m.settings()[name], bool)
                   or not isinstance(m.settings()[name], (int, float))
                   for m in self.members):
                raise ConfigError(f"option {name!r} takes values that are not numbers; a "
                                  "sweep varies numbers only (give it one value)")
        for k in range(len(self.members)):
            self.member_config(k)  # each member must be a valid run
        if self.out_dir is not None and (self.out_dir / SUMMARY_FILE).exists():
            raise ConfigError(f"{str(self.out_dir)!r} already holds a sweep ({SUMMARY_FILE}); "
                              "choose a new --out")

    @classmethod
    def grid(cls, config: ExperimentConfig, *, client_lr: Sequence[float] | None = None,
             server_lr: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
             options: dict[str, Sequence[float]] | None = None, seeds_together: int = 1,
             examples_on_device: bool | None = None,
             out_dir: str | Path | None = None) -> "Sweep":
        """Every combination of the given values (the config's value where none is given).

        Members are ordered client_lr, then server_lr, then each option, then seed
        (the seed varies fastest).

        Example:
          >>> Sweep.grid(cfg, client_lr=[0.01, 0.1], seeds=[0, 1]).members[1].label
          'client_lr=0.01 server_lr=1 seed=1'
        """
        options = dict(options or {})
        axes = [_values("client_lr", client_lr, config.client_lr),
                _values("server_lr", server_lr, config.server_lr)]
        axes += [_values(name, options[name], None) for name in options]
        axes.append(_values("seeds", seeds, config.seed))
        members = []
        for combo in itertools.product(*axes):
            opts = dict(zip(options, combo[2:-1]))
            members.append(Member(client_lr=combo[0], server_lr=combo[1], seed=combo[-1],
                                  options=opts))
        return cls(config=config, members=members, seeds_together=seeds_together,
                   examples_on_device=examples_on_device, out_dir=out_dir)

    def member_config(self, k: int) -> ExperimentConfig:
        """Member k's full config: what `fedjax run` would run for it alone (validated)."""
        m = self.members[k]
        out = None if self.out_dir is None else str(self._member_dir(k))
        try:
            return attrs.evolve(self.config, client_lr=m.client_lr, server_lr=m.server_lr,
                                seed=m.seed, out=out, algorithm_options={
                                    **self.config.algorithm_options, **m.options})
        except ConfigError as e:
            raise ConfigError(f"member {m.label}: {e}") from None

    def swept(self) -> list[str]:
        """Names of the values that differ between members, seed excluded."""
        names = list(SWEEPABLE) + sorted(self.members[0].options)
        return [n for n in names
                if len({_plain(m.settings()[n]) for m in self.members}) > 1]

    def _member_dir(self, k: int) -> Path:
        assert self.out_dir is not None, "member directories exist only with an out_dir"
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.members[k].label.replace(" ", "_"))
        return self.out_dir / MEMBERS_DIR / f"{k:02d}_{slug}"

    def run(self, on_record: Callable[[dict], object] | None = None,
            callbacks: Sequence[Callback] = ()) -> SweepResult:
        """Trains every member for `config.rounds` rounds and evaluates them as their own
        `Experiment.run` would, in the same loop (`fedjax_api.loop.Loop`) over a vmapped
        server (`SweepServer`); calls `on_record(record)` for every member's record, the
        record carrying `"member": k` (the member's index) besides its own fields, and
        the hooks of `callbacks` likewise.

        A member whose loss or update becomes NaN or infinite does not stop the sweep: its
        `diverged_round` is set and its metrics are NaN from then on.
        """
        start = time.perf_counter()
        if self.config.client_store in ("host", "disk"):
            raise ConfigError(f"--client-store {self.config.client_store}: a sweep keeps its "
                              "members' state on the device; use `fedjax run` for a host or "
                              "disk client store")
        cfgs = [self.member_config(k) for k in range(len(self.members))]
        lay = core.layout([m.seed for m in self.members])
        task, plan = _task_and_plan(cfgs[0])
        algorithms = [build_algorithm(c, task) for c in cfgs]
        if keeps_client_state(algorithms[0], task.model):
            raise ConfigError(f"algorithm {self.config.algorithm!r} keeps state per client, "
                              "which a sweep does not stack; run its settings with `fedjax run`")
        swept = self.swept()
        hparams = {n: core.on_grid(lay, [m.settings()[n] for m in self.members])
                   for n in swept}
        rows = [cfgs[int(np.flatnonzero(lay.cells[:, 0] == s)[0])] for s in range(len(lay.seeds))]
        samplers = [cohort_sampler(t, c.clients_per_round, c.sampling, plan) for t, c in
                    zip(self._row_datasets(task.train, [c.seed for c in rows]), rows)]
        guard = NonFiniteGuard(stop=False)
        own: list[Callback] = [guard, Evaluation([Evaluator(
            task=task, seed=c.seed, eval_train_clients=c.eval_train_clients, plan=plan,
            eval_test_clients=c.eval_test_clients, final_eval=c.final_eval,
            personalize_steps=c.personalize_steps, personalize_lr=c.client_lr) for c in cfgs],
            self.config.eval_every)]
        if self.out_dir is not None:  # opened once the first round has run: a refused
            own.append(RunDirOwner(self.out_dir, lazy=True, holds=(SUMMARY_FILE,)))
            own.append(_SweepFile(self))  # sweep writes nothing
            for k, c in enumerate(cfgs):
                own.append(RunLog(self._member_dir(k), c.to_dict(), member=k, lazy=True,
                                  root=self.out_dir))
                if self.config.tensorboard:
                    own.append(TensorBoard(self._member_dir(k), member=k, lazy=True))
        try:  # a swept value that sets a shape or branch: one line naming the algorithm
            build = self._builder(cfgs[0], task, swept)
            server = SweepServer(
                step_fn=core.sweep_round(build, task.model, plan, self.seeds_together),
                state=core.sweep_init(build, task.model, lay, hparams), layout=lay,
                keys=core.seed_keys(lay.seeds), hparams=hparams, algorithms=algorithms,
                seeds=[m.seed for m in self.members], model=task.model, plan=plan)
            loop = Loop(server, rounds=self.config.rounds, members=len(self.members),
                        sample=lambda r: core.stack_cohorts([s(r) for s in samplers]),
                        callbacks=[*own, *([OnRecord(on_record)] if on_record else []),
                                   *callbacks])
            trained = loop.run()
        except core.SweepError as e:
            raise ConfigError(f"algorithm {self.config.algorithm!r}: {e}") from None
        assert isinstance(trained, SweepServer)
        results = [MemberResult(member=m, history=loop.histories[k],
                                final=final_metrics(loop.histories[k]),
                                diverged_round=guard.diverged.get(k),
                                out_dir=None if self.out_dir is None else self._member_dir(k))
                   for k, m in enumerate(self.members)]
        result = SweepResult(members=results, state=trained.state, layout=lay,
                             wall_time_s=time.perf_counter() - start)
        if self.out_dir is not None:
            self._write_summary(result, swept)
        return result

    def _builder(self, cfg: ExperimentConfig, task, swept: list[str]) -> core.Build:
        """`build(hparams)`: the algorithm of `build_algorithm`, with the swept values
        taken from `hparams` (traced numbers) and the others from `cfg`."""
        fields = cfg.to_dict()

        def build(hp):
            values = dict(fields)
            values["algorithm_options"] = dict(fields["algorithm_options"])
            for name, v in hp.items():
                if name in SWEEPABLE:
                    values[name] = v
                else:
                    values["algorithm_options"][name] = v
            return build_algorithm(AlgorithmOptions.of(values), task)

        return build

    def _row_datasets(self, train, seeds: list[int]) -> list:
        """The training set of each row (seed); device-resident (cohorts packed as
        indices into examples put on the device once, shared by the rows) when
        `examples_on_device` allows it."""
        on_device = self.examples_on_device
        if on_device is None:
            on_device = train.device_resident or (
                train.transform is None and _examples_bytes(train) <= train.max_cohort_bytes)
        if on_device and train.transform is not None:
            raise ConfigError(f"task {self.config.task!r} augments its examples every round, "
                              "so they cannot stay on the device; leave examples_on_device "
                              "unset")
        if not on_device:
            return [attrs.evolve(train, seed=s, device_resident=False) for s in seeds]
        first = attrs.evolve(train, device_resident=True)
        first.device_examples  # put on the device once; with_seed shares it with every row
        return [first.with_seed(s) for s in seeds]

    def summary(self, **fields: Any) -> dict[str, Any]:
        """What sweep.json holds: `fields`, the config, the members and `versions()`."""
        assert self.out_dir is not None
        return {**fields, "config": self.config.to_dict(), "versions": versions(), "members": [
            {"index": k, "label": m.label, **m.settings(),
             "dir": str(self._member_dir(k).relative_to(self.out_dir))}
            for k, m in enumerate(self.members)]}

    def _write_summary(self, result: SweepResult, swept: list[str]) -> None:
        assert self.out_dir is not None
        metric = default_metric(result.members[0].final)
        rank = {id(m): i + 1 for i, m in enumerate(result.ranked(metric))}
        doc = self.summary(status="complete", swept=swept, ranked_by=metric,
                           seeds=sorted({m.seed for m in self.members}),
                           wall_time_s=result.wall_time_s)
        members = doc["members"]
        for entry, m in zip(members, result.members):
            entry.update(rank=rank[id(m)], diverged_round=m.diverged_round, final={
                f"{split}/{n}": _json_float(v) for split, values in m.final.items()
                for n, v in values.items()})
        rundir.write_json_atomic(self.out_dir / SUMMARY_FILE, doc)
        names = sorted({n for m in members for n in m["final"]})
        settings = ["client_lr", "server_lr", *sorted(self.members[0].options), "seed"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["rank", "index", *settings, "diverged_round", *names])
        for m in sorted(members, key=lambda m: m["rank"]):
            writer.writerow([m["rank"], m["index"], *(m[s] for s in settings),
                             "" if m["diverged_round"] is None else m["diverged_round"],
                             *(m["final"].get(n, "") for n in names)])
        atomic.write_text(self.out_dir / TABLE_FILE, buf.getvalue())


def _examples_bytes(train) -> int:
    """Bytes of every training example, estimated from the largest client's first one."""
    sizes = np.asarray(train.data.client_sizes)
    if sizes.size == 0 or sizes.max() == 0:
        return 0
    first = train.data.get_client(int(np.argmax(sizes)))
    return int(sizes.sum()) * sum(np.asarray(a)[:1].nbytes for a in first.values())


def _plain(value):
    return float(value) if isinstance(value, (int, float)) else repr(value)


def _json_float(v):
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _task_and_plan(cfg: ExperimentConfig) -> tuple[Any, Plan]:
    """The task of `cfg` as `fedjax run` loads it, and its plan (chunk size, one device)."""
    exp = Experiment.from_config(attrs.evolve(cfg, out=None))
    return exp.task, exp.plan


class _SweepFile(Callback):
    """Writes sweep.json ("status": "running") once the first round has trained."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.written = sweep, False

    def on_metrics(self, loop: Loop, metrics: list[dict[str, float]]) -> None:
        if not self.written and self.sweep.out_dir is not None:
            rundir.check_writable_dir(self.sweep.out_dir)
            rundir.write_json_atomic(self.sweep.out_dir / SUMMARY_FILE,
                                     self.sweep.summary(status="running"))
            self.written = True


__all__ = ["Member", "MemberResult", "Sweep", "SweepResult", "SweepServer", "default_metric"]
