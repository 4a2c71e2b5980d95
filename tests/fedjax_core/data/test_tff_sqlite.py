"""TFF SQLite files and the tf.train.Example decoder, against protobuf bytes built by hand."""

import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.tff_sqlite import (
    CIFAR100_SPEC,
    Feature,
    _packed_varints,
    parse_example,
    read_tff_sqlite,
)

# ---------------------------------------------------------------------------------------------
# A tiny protobuf encoder (wire format by hand; no tensorflow or protobuf package).


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(payload)) + payload


def bytes_feature(values) -> bytes:
    return ld(1, b"".join(ld(1, v) for v in values))


def float_feature(values, packed=True) -> bytes:
    if packed:
        body = ld(1, struct.pack(f"<{len(values)}f", *values))
    else:
        body = b"".join(tag(1, 5) + struct.pack("<f", v) for v in values)
    return ld(2, body)


def int64_feature(values, packed=True) -> bytes:
    if packed:
        body = ld(1, b"".join(varint(v) for v in values))
    else:
        body = b"".join(tag(1, 0) + varint(v) for v in values)
    return ld(3, body)


def example(features: dict) -> bytes:
    """`features`: name -> encoded Feature bytes; map entries in the given order."""
    entries = b"".join(ld(1, ld(1, k.encode()) + ld(2, v)) for k, v in features.items())
    return ld(1, entries)


def cifar_example(image: np.ndarray, label: int, coarse: int) -> bytes:
    return example({"image": int64_feature(image.reshape(-1).tolist()),
                    "label": int64_feature([label]), "coarse_label": int64_feature([coarse])})


def make_tff_db(path: Path, rows, metadata=None, indexes=True) -> Path:
    """rows: (split, client id, serialized example), stored in this order."""
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                  "serialized_example_proto BLOB NOT NULL)")
        c.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL,"
                  " num_examples INTEGER NOT NULL)")
        if indexes:
            c.execute("CREATE INDEX idx_examples_client_id ON examples (client_id)")
            c.execute("CREATE INDEX idx_examples_client_id_split "
                      "ON examples (split_name, client_id)")
            c.execute("CREATE INDEX idx_metadata_client_id ON client_metadata (client_id)")
        c.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
        if metadata is None:
            counts = {}
            for split, cid, _ in rows:
                counts[(cid, split)] = counts.get((cid, split), 0) + 1
            metadata = [(cid, split, n) for (cid, split), n in counts.items()]
        c.executemany("INSERT INTO client_metadata VALUES (?, ?, ?)", metadata)
    return path


def tiny_cifar(seed=0):
    """Examples interleaved across clients and splits; ids whose sorted order is not numeric."""
    rng = np.random.default_rng(seed)
    rows, want = [], {}
    plan = [("train", "2"), ("train", "10"), ("test", "0"), ("train", "2"), ("train", "1"),
            ("train", "10"), ("train", "2")]
    for split, cid in plan:
        image = rng.integers(0, 256, (32, 32, 3))
        label, coarse = int(rng.integers(100)), int(rng.integers(20))
        rows.append((split, cid, cifar_example(image, label, coarse)))
        w = want.setdefault((split, cid), {"image": [], "label": [], "coarse_label": []})
        w["image"].append(image)
        w["label"].append(label)
        w["coarse_label"].append(coarse)
    return rows, want


# ---------------------------------------------------------------------------------------------
# The decoder.


def test_parse_every_list_kind_packed_and_unpacked():
    big = [0, 1, 127, 128, 300, -1, -2, 2**63 - 1, -2**63, 2**40]
    data = example({
        "b": bytes_feature([b"", b"abc", bytes(range(256))]),
        "fp": float_feature([1.5, -2.25, 3e38]),
        "fu": float_feature([0.5, -1.0], packed=False),
        "ip": int64_feature(big),
        "iu": int64_feature(big, packed=False),
        "empty": b"",
    })
    got = parse_example(data)
    assert got["b"] == Feature("bytes", [b"", b"abc", bytes(range(256))])
    assert got["fp"].kind == "float" and got["fp"].values.dtype == np.float32
    np.testing.assert_array_equal(got["fp"].values, np.array([1.5, -2.25, 3e38], np.float32))
    np.testing.assert_array_equal(got["fu"].values, [0.5, -1.0])
    for key in ("ip", "iu"):
        assert got[key].kind == "int64" and got[key].values.dtype == np.int64
        assert got[key].values.tolist() == big
    assert got["empty"].kind is None and got["empty"].values.size == 0
    assert list(got) == ["b", "fp", "fu", "ip", "iu", "empty"]


def test_docstring_bytes_are_right():
    data = example({"y": int64_feature([1, 2, 3])})
    assert data == b"\n\x0e\n\x0c\n\x01y\x12\x07\x1a\x05\n\x03\x01\x02\x03"
    assert parse_example(data)["y"].values.tolist() == [1, 2, 3]


def test_protobuf_merge_rules_and_unknown_fields():
    unknown = tag(9, 0) + varint(5) + tag(10, 5) + b"\x00" * 4 + tag(11, 1) + b"\x00" * 8 \
        + ld(12, b"zz")
    # A Feature whose int64_list appears twice (merged), then switches kind (oneof).
    merged = int64_feature([1, 2]) + unknown + int64_feature([3], packed=False)
    switched = int64_feature([1]) + float_feature([2.0])
    data = example({"m": merged, "s": switched, "k": int64_feature([1])}) + unknown
    data += example({"k": int64_feature([2])})  # Example.features twice: maps merge, last wins
    got = parse_example(data)
    assert got["m"].values.tolist() == [1, 2, 3]
    assert got["s"].kind == "float" and got["s"].values.tolist() == [2.0]
    assert got["k"].values.tolist() == [2]


@pytest.mark.parametrize("data, match", [
    (b"\x0a\x05\x0a", "runs past the end"),
    (b"\x0a", "truncated varint"),
    (b"\x0a\x80", "truncated varint"),
    (example({"x": ld(3, ld(1, b"\x80"))}), "ends inside a varint"),
    (example({"x": ld(2, ld(1, b"\x00" * 5))}), "not a multiple of 4"),
    (tag(1, 3), "wire type 3"),
    (b"\x00", "field number 0"),
    (example({"x": ld(3, ld(1, b"\xff" * 11 + b"\x01"))}), "longer than 10 bytes"),
    (example({"x": ld(1, tag(1, 0) + varint(3))}), "bytes_list value is not bytes"),
    (ld(1, ld(1, ld(1, b"\xff\xfe"))), "not UTF-8"),
])
def test_parse_errors(data, match):
    with pytest.raises(DataFormatError, match=match):
        parse_example(data)


def test_vectorized_varints_match_reference():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 256, 500), rng.integers(-2**63, 2**63 - 1, 500,
                                                                     dtype=np.int64),
                             [0, -1, 2**63 - 1, -2**63, 127, 128, 16383, 16384]]).astype(np.int64)
    encoded = b"".join(varint(int(v)) for v in values)
    np.testing.assert_array_equal(_packed_varints(encoded), values)
    assert _packed_varints(b"").shape == (0,)
    np.testing.assert_array_equal(_packed_varints(bytes([5, 0, 127])), [5, 0, 127])


# ---------------------------------------------------------------------------------------------
# Whole files.


def test_read_cifar_like_file(tmp_path):
    rows, want = tiny_cifar()
    path = make_tff_db(tmp_path / "cifar100.sqlite", rows)
    got = list(read_tff_sqlite(path, "train", spec=CIFAR100_SPEC))
    assert [cid for cid, _ in got] == ["1", "10", "2"]  # sorted as strings, as TFF sorts
    for cid, arrays in got:
        w = want[("train", cid)]
        assert list(arrays) == ["coarse_label", "image", "label"]
        assert arrays["image"].dtype == np.uint8 and arrays["image"].shape[1:] == (32, 32, 3)
        assert arrays["label"].dtype == np.int64 and arrays["coarse_label"].dtype == np.int64
        np.testing.assert_array_equal(arrays["image"], np.stack(w["image"]))  # rowid order
        np.testing.assert_array_equal(arrays["label"], w["label"])
        np.testing.assert_array_equal(arrays["coarse_label"], w["coarse_label"])
    test = list(read_tff_sqlite(path, "test", spec=CIFAR100_SPEC))
    assert [cid for cid, _ in test] == ["0"] and test[0][1]["image"].shape == (1, 32, 32, 3)


def test_inferred_shapes_and_raw_image_bytes(tmp_path):
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    rows = [("train", "a", example({"image": bytes_feature([image.tobytes()]),
                                    "label": int64_feature([7]), "coarse_label": int64_feature([1]),
                                    "w": float_feature([0.5, 1.5]), "t": bytes_feature([b"hi"])}))
            for _ in range(2)]
    path = make_tff_db(tmp_path / "f.sqlite", rows, indexes=False)
    (cid, arrays), = read_tff_sqlite(path, "train", spec=CIFAR100_SPEC)
    assert set(arrays) == set(CIFAR100_SPEC)  # features outside the spec are dropped
    np.testing.assert_array_equal(arrays["image"], np.stack([image, image]))
    (cid, inferred), = read_tff_sqlite(path, "train")
    assert list(inferred) == ["coarse_label", "image", "label", "t", "w"]
    assert inferred["label"].shape == (2,) and inferred["label"].dtype == np.int64
    assert inferred["w"].shape == (2, 2) and inferred["w"].dtype == np.float32
    assert inferred["t"].dtype == object and inferred["t"].tolist() == [b"hi", b"hi"]
    assert inferred["image"].shape == (2,) and inferred["image"][0] == image.tobytes()


def test_file_errors(tmp_path):
    rows, _ = tiny_cifar()
    path = make_tff_db(tmp_path / "c.sqlite", rows)
    with pytest.raises(DataFormatError, match=r"no clients in split 'val'.*\['test', 'train'\]"):
        list(read_tff_sqlite(path, "val"))

    bad_count = make_tff_db(tmp_path / "n.sqlite", rows[:1], metadata=[("2", "train", 5)])
    with pytest.raises(DataFormatError, match="has 1 examples but client_metadata says 5") as e:
        list(read_tff_sqlite(bad_count, "train"))
    assert "\n" not in str(e.value) and str(bad_count) in str(e.value)

    big = make_tff_db(tmp_path / "v.sqlite", [("train", "a", example({
        "image": int64_feature([300] * 3072), "label": int64_feature([1]),
        "coarse_label": int64_feature([1])}))])
    with pytest.raises(DataFormatError, match=r"client 'a': feature 'image' has values in \[300"):
        list(read_tff_sqlite(big, "train", spec=CIFAR100_SPEC))

    short = make_tff_db(tmp_path / "s.sqlite", [("train", "a", example({
        "image": int64_feature([1] * 10), "label": int64_feature([1]),
        "coarse_label": int64_feature([1])}))])
    with pytest.raises(DataFormatError, match="has 10 values, expected 3072"):
        list(read_tff_sqlite(short, "train", spec=CIFAR100_SPEC))

    kind = make_tff_db(tmp_path / "k.sqlite", [("train", "a", example({
        "image": int64_feature([1] * 3072), "label": float_feature([1.0]),
        "coarse_label": int64_feature([1])}))])
    with pytest.raises(DataFormatError, match="'label' is a float list, expected a int64 list"):
        list(read_tff_sqlite(kind, "train", spec=CIFAR100_SPEC))

    missing = make_tff_db(tmp_path / "m.sqlite", [("train", "a", example({
        "image": int64_feature([1] * 3072), "label": int64_feature([1])}))])
    with pytest.raises(DataFormatError, match="lacks feature 'coarse_label'"):
        list(read_tff_sqlite(missing, "train", spec=CIFAR100_SPEC))

    ragged = make_tff_db(tmp_path / "r.sqlite", [
        ("train", "a", example({"x": int64_feature([1])})),
        ("train", "a", example({"x": int64_feature([1, 2])}))])
    with pytest.raises(DataFormatError, match="lengths \\[1, 2\\]; pass a spec"):
        list(read_tff_sqlite(ragged, "train"))

    garbage = make_tff_db(tmp_path / "g.sqlite", [("train", "a", b"\x0a\x05\x0a")])
    with pytest.raises(DataFormatError, match="client 'a': tf.train.Example: .* past the end"):
        list(read_tff_sqlite(garbage, "train"))


def test_not_a_tff_file(tmp_path):
    fedjax = tmp_path / "fedjax.sqlite"
    with sqlite3.connect(fedjax) as c:
        c.execute("CREATE TABLE federated_data (client_id BLOB, data BLOB, num_examples INTEGER)")
    with pytest.raises(DataFormatError, match="already in FedJAX's format"):
        list(read_tff_sqlite(fedjax, "train"))
    cols = tmp_path / "cols.sqlite"
    with sqlite3.connect(cols) as c:
        c.execute("CREATE TABLE examples (client_id TEXT, serialized_example_proto BLOB)")
        c.execute("CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, "
                  "num_examples INTEGER)")
    with pytest.raises(DataFormatError, match=r"lacks \['split_name'\]"):
        list(read_tff_sqlite(cols, "train"))
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x5d\x00\x00\x80\x00" + b"\x01" * 300)
    with pytest.raises(DataFormatError, match="xz -dk"):
        list(read_tff_sqlite(junk, "train"))
    with pytest.raises(FileNotFoundError):
        list(read_tff_sqlite(tmp_path / "absent.sqlite", "train"))


def test_file_and_split_are_checked_at_the_call(tmp_path):
    rows, _ = tiny_cifar()
    path = make_tff_db(tmp_path / "c.sqlite", rows)
    with pytest.raises(DataFormatError, match="no clients in split 'val'"):
        read_tff_sqlite(path, "val")  # no iteration needed
    clients = read_tff_sqlite(path, "train", spec=CIFAR100_SPEC)
    assert next(clients)[0] == "1"
    clients.close()  # stopping early closes the connection
