"""FedJAX's EMNIST preprocessing: flipped pixels, int32 labels, writer domains, digits only."""

import numpy as np
import pytest

from fedjax_core.data import emnist


@pytest.mark.parametrize("writer", [b"f2100_xx", b"f2222_yy", b"f2599_zz"])
def test_domain_id_high_school(writer):
    assert emnist.domain_id(writer) == emnist.HIGH_SCHOOL == 0
    assert emnist.domain_id(b"A" * 16 + b":" + writer) == 0
    assert emnist.domain_id(writer.decode()) == 0


@pytest.mark.parametrize("writer", [b"f0000_xx", b"f2099_yy", b"f2600_zz", b"f9999_99"])
def test_domain_id_census(writer):
    assert emnist.domain_id(writer) == emnist.CENSUS == 1
    assert emnist.domain_id(b"0123456789abcdef:" + writer) == 1


@pytest.mark.parametrize("bad", [b"not_emnist", b"", b"fabcd_01"])
def test_domain_id_invalid(bad):
    with pytest.raises(ValueError, match="Invalid EMNIST client_id"):
        emnist.domain_id(bad)


def test_preprocess_client_flips_and_expands():
    pixels = np.zeros((3, 28, 28), np.float32)
    pixels[0, 0, 0] = 0.25   # -> 0.75
    pixels[1] = 1.0          # white page -> all zeros
    pixels[2, 5, 7] = 0.5    # -> 0.5
    label = np.array([3, 40, 61], np.int64)
    out = emnist.preprocess_client({"pixels": pixels, "label": label, "extra": label},
                                   client_id=b"0123456789abcdef:f2300_12")
    assert set(out) == {"x", "y", "domain_id"}
    assert out["x"].shape == (3, 28, 28, 1) and out["x"].dtype == np.float32
    assert out["x"][0, 0, 0, 0] == 0.75 and out["x"][0, 1, 1, 0] == 1.0
    assert np.all(out["x"][1] == 0.0)
    assert out["x"][2, 5, 7, 0] == 0.5
    np.testing.assert_array_equal(out["x"][..., 0], 1 - pixels)
    assert out["y"].dtype == np.int32 and out["y"].tolist() == [3, 40, 61]
    assert out["domain_id"].dtype == np.int32 and out["domain_id"].tolist() == [0, 0, 0]


def test_preprocess_client_without_client_id_has_no_domain():
    out = emnist.preprocess_client({"pixels": np.ones((1, 28, 28)), "label": [7]})
    assert set(out) == {"x", "y"}


def test_only_digits_keeps_labels_below_10():
    pixels = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 28, 28), np.float32) / 4
    label = np.array([9, 10, 0, 61])
    out = emnist.preprocess_client({"pixels": pixels, "label": label}, b"f0001_00",
                                   only_digits=True)
    assert out["y"].tolist() == [9, 0]
    np.testing.assert_array_equal(out["x"][:, 0, 0, 0], [1.0, 0.5])
    assert out["domain_id"].tolist() == [1, 1]


def test_file_names_and_classes():
    assert emnist.sqlite_file_name("train") == "federated_emnist_train.sqlite"
    assert emnist.sqlite_file_name("test", only_digits=True) == \
        "federated_emnist_digitsonly_test.sqlite"
    assert (emnist.num_classes(), emnist.num_classes(True)) == (62, 10)
    with pytest.raises(ValueError):
        emnist.sqlite_file_name("valid")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        emnist.preprocess_client({"pixels": np.ones((2, 28, 28)), "label": [1]})
