"""FedJAX's SQLite format: the reference fixtures, round trips, byte equality, bad input."""

import hashlib
import json
import os
import sqlite3
import threading
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import FederatedData
from fedjax_core.data.sqlite import (
    CREATE_TABLE,
    SQLiteFederatedData,
    decode_client,
    encode_client,
    write_sqlite,
)
from tests.fixtures import FEDJAX_SQLITE

FIXTURES = FEDJAX_SQLITE
FIXTURE_FILES = ["emnist_like.sqlite", "shakespeare_like.sqlite", "stackoverflow_like.sqlite"]


@pytest.fixture
def fixtures() -> Path:
    assert (FIXTURES / "manifest.json").exists(), f"the FedJAX SQLite fixtures are not in {FIXTURES}"
    return FIXTURES


def digest(array: np.ndarray) -> str:
    if array.dtype == object:
        return hashlib.sha256(b"\x00".join(array.reshape(-1).tolist())).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes("C")).hexdigest()


def stored_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT client_id, data, num_examples FROM federated_data "
                         "ORDER BY rowid").fetchall()


def assert_one_line(error: pytest.ExceptionInfo, path, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------------------------------------
# The fixtures written by FedJAX 0.0.17.


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_fixture_matches_manifest(fixtures, name):
    expected = json.loads((fixtures / "manifest.json").read_text())["files"][name]
    data = SQLiteFederatedData(fixtures / name)
    assert isinstance(data, FederatedData)
    assert len(data) == expected["num_clients"] == len(expected["clients"])
    # FedJAX lists clients by rowid; ids are stored as bytes and exposed as str.
    assert data.client_ids == tuple(r[0].decode() for r in stored_rows(fixtures / name))
    assert set(data.client_ids) == set(expected["clients"])
    for i, cid in enumerate(data.client_ids):
        want = expected["clients"][cid]
        assert data.client_sizes[i] == want["num_examples"]
        arrays = data.get_client(i)
        assert set(arrays) == set(want["features"])
        for key, array in arrays.items():
            spec = want["features"][key]
            assert array.dtype.name == spec["dtype"], (cid, key)
            assert list(array.shape) == spec["shape"], (cid, key)
            assert digest(array) == spec["sha256"], (cid, key)
            assert array.shape[0] == want["num_examples"]
    assert data.client_sizes.dtype == np.int64


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_reencoded_blobs_equal_fedjax_blobs(fixtures, name):
    data = SQLiteFederatedData(fixtures / name)
    rows = stored_rows(fixtures / name)
    for i, (_, blob, _) in enumerate(rows):
        arrays = data.get_client(i)
        # Same zlib level (default, 6), same msgpack bytes, same feature order (not sorted).
        assert encode_client(arrays) == blob
        assert list(arrays) == list(msgpack.unpackb(zlib.decompress(blob)))


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_rewritten_file_equals_fedjax_file(fixtures, name, tmp_path):
    data = SQLiteFederatedData(fixtures / name)
    out = tmp_path / name
    assert write_sqlite(out, data.items()) == len(data)
    ours, theirs = out.read_bytes(), (fixtures / name).read_bytes()
    assert stored_rows(out) == stored_rows(fixtures / name)
    with sqlite3.connect(out) as a, sqlite3.connect(fixtures / name) as b:
        schema = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        assert a.execute(schema).fetchall() == b.execute(schema).fetchall()
    # Bytes 96..99 of the header hold the version of the SQLite library that wrote the file.
    if ours[96:100] != theirs[96:100]:
        pytest.skip("this SQLite library differs from the one that wrote the fixture; rows and "
                    "schema are equal, whole files are compared only between equal versions")
    assert ours == theirs


def test_fixture_lookup_by_id_cache_and_threads(fixtures):
    data = SQLiteFederatedData(fixtures / "emnist_like.sqlite", cache_size=2)
    by_id = data.get_client_by_id("f0002_14")
    np.testing.assert_array_equal(by_id["x"], data.get_client(2)["x"])
    assert data.get_client(2) is data.get_client(2)  # cached
    np.testing.assert_array_equal(data.get_client(-1)["label"], data.get_client(3)["label"])
    assert not by_id["x"].flags.writeable
    with pytest.raises(KeyError, match="no client 'nope'"):
        data.get_client_by_id("nope")
    with pytest.raises(IndexError):
        data.get_client(4)
    assert data.features == ("label", "x")
    assert "4 clients" in repr(data)

    fresh = SQLiteFederatedData(fixtures / "emnist_like.sqlite")
    expected = [digest(fresh.get_client(i)["x"]) for i in range(len(fresh))]
    results, errors = [], []

    def work(k):
        try:
            for j in range(20):
                i = (k + j) % len(fresh)
                results.append(digest(fresh.get_client(i)["x"]) == expected[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80 and all(results)
    fresh.close()
    with pytest.raises(ValueError, match="closed"):
        fresh.get_client(0)
    with SQLiteFederatedData(fixtures / "shakespeare_like.sqlite") as shakespeare:
        assert shakespeare.get_client(1)["snippets"].dtype == object


# ---------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_dtypes_order_and_ids(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    text = np.empty((2, 2), dtype=object)
    text[:] = [[b"a", b""], [b"\x00\xff", "é".encode()]]
    clients = [
        ("zeta", {"y": np.array([3, -1], np.int64), "x": rng.normal(size=(2, 3)).astype(np.float32),
                  "t": text, "m": np.array([True, False]),
                  "h": np.array([1.5, -2], np.float16), "c": np.array([1 + 2j, 3j], np.complex64),
                  "b": np.array([1.25, 2], ml_dtypes.bfloat16),
                  "u": np.array([[0, 255], [7, 8]], np.uint8)}),
        ("alpha é", {"y": np.zeros(0, np.int64), "x": np.zeros((0, 3), np.float32),
                     "t": np.empty((0, 2), object), "m": np.zeros(0, bool),
                     "h": np.zeros(0, np.float16), "c": np.zeros(0, np.complex64),
                     "b": np.zeros(0, ml_dtypes.bfloat16), "u": np.zeros((0, 2), np.uint8)}),
        (b"raw-bytes-id", {"y": np.arange(5, dtype=">i4"),  # big-endian: stored natively
                           "x": np.arange(30, dtype=np.float32).reshape(5, 6)[:, ::2],
                           "t": np.array([b"1", b"2", b"3", b"4", b"5"] * 2, object).reshape(5, 2),
                           "m": np.ones(5, bool), "h": np.ones(5, np.float16),
                           "c": np.ones(5, np.complex64), "b": np.ones(5, ml_dtypes.bfloat16),
                           "u": np.ones((5, 2), np.uint8)}),
    ]
    path = tmp_path / "rt.sqlite"
    assert write_sqlite(path, clients) == 3
    data = SQLiteFederatedData(path)
    assert data.client_ids == ("zeta", "alpha é", "raw-bytes-id")  # insertion order
    np.testing.assert_array_equal(data.client_sizes, [2, 0, 5])
    for i, (_, arrays) in enumerate(clients):
        got = data.get_client(i)
        assert list(got) == list(arrays)  # the writer's feature order is kept
        for key, want in arrays.items():
            assert got[key].shape == want.shape
            assert got[key].dtype == want.dtype.newbyteorder("=")
            np.testing.assert_array_equal(got[key], want)
    assert [type(r[0]) for r in stored_rows(path)] == [bytes, bytes, bytes]
    assert SQLiteFederatedData(path).get_client_by_id("alpha é")["x"].shape == (0, 3)


def test_text_ids_are_stored_as_text(tmp_path):
    path = tmp_path / "t.sqlite"
    write_sqlite(path, [("7", {"x": np.ones(1)}), (b"3", {"x": np.ones(2)})], text_ids=True)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT typeof(client_id) FROM federated_data").fetchall() == [
            ("text",), ("text",)]
    data = SQLiteFederatedData(path)
    assert data.client_ids == ("7", "3")
    assert data.get_client_by_id("3")["x"].shape == (2,)


def test_schema_is_fedjax_schema(tmp_path):
    path = tmp_path / "s.sqlite"
    write_sqlite(path, [("a", {"x": np.ones(1)})])
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT sql FROM sqlite_master WHERE name = 'federated_data'"
                         ).fetchone()[0] == CREATE_TABLE


def test_encode_decode_blob():
    arrays = {"x": np.arange(6, dtype=np.int32).reshape(3, 2), "s": np.array([b"a", b"b", b"c"],
                                                                           object)}
    blob = encode_client(arrays)
    raw = msgpack.unpackb(zlib.decompress(blob), raw=False)
    assert raw["x"].code == 1 and raw["s"].code == 4
    # Payloads as FedJAX packs them: (shape, dtype name, C-order bytes) and (shape, [bytes]).
    assert raw["x"].data == msgpack.packb(((3, 2), "int32", arrays["x"].tobytes()),
                                          use_bin_type=True)
    assert raw["s"].data == msgpack.packb(((3,), [b"a", b"b", b"c"]), use_bin_type=True)
    assert blob == zlib.compress(msgpack.packb(raw, use_bin_type=True), 6)
    back = decode_client(blob)
    np.testing.assert_array_equal(back["x"], arrays["x"])
    assert back["s"].tolist() == [b"a", b"b", b"c"]


# ---------------------------------------------------------------------------------------------
# Writing: refusals, and nothing left on disk when it fails.


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.array(["a", "b"], object)}, "holding str"),
    ({"x": np.array(["a", "b"])}, "dtype <U1"),
    ({"x": np.float32(1.0)}, "scalar"),
    ({"x": np.ones(3), "y": np.ones(2)}, "disagree"),
    ({}, "no features"),
    ({1: np.ones(2)}, "not a str"),
    ([np.ones(2)], "give a dict"),
])
def test_write_rejects_bad_arrays_and_leaves_nothing(tmp_path, arrays, match):
    def clients():
        yield "good", {"x": np.ones(2)}
        yield "bad", arrays

    with pytest.raises(ValueError, match=match) as error:
        write_sqlite(tmp_path / "out.sqlite", clients())
    assert "\n" not in str(error.value)
    assert listing(tmp_path) == []


def test_write_duplicate_id_and_failing_iterator_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="'a' appears twice"):
        write_sqlite(tmp_path / "d.sqlite", [("a", {"x": np.ones(1)}), (b"a", {"x": np.ones(1)})])

    def broken():
        yield "a", {"x": np.ones(1)}
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_sqlite(tmp_path / "b.sqlite", broken())
    with pytest.raises(ValueError, match="give str or bytes"):
        write_sqlite(tmp_path / "i.sqlite", [(3, {"x": np.ones(1)})])
    assert listing(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_sqlite(tmp_path / "no" / "dir.sqlite", [])


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_sqlite(path, [("a", {"x": np.ones(1)})])
    assert path.read_bytes() == b"precious"
    write_sqlite(path, [("a", {"x": np.ones(1)})], overwrite=True)
    assert SQLiteFederatedData(path).client_ids == ("a",)
    assert listing(tmp_path) == ["o.sqlite"]
    # A failed overwrite keeps the old file whole.
    with pytest.raises(ValueError):
        write_sqlite(path, [("b", {"x": np.ones(1), "y": np.ones(2)})], overwrite=True)
    assert SQLiteFederatedData(path).client_ids == ("a",)
    assert listing(tmp_path) == ["o.sqlite"]


def test_empty_dataset_round_trips(tmp_path):
    path = tmp_path / "e.sqlite"
    assert write_sqlite(path, []) == 0
    data = SQLiteFederatedData(path)
    assert len(data) == 0 and data.client_sizes.shape == (0,) and data.features == ()


# ---------------------------------------------------------------------------------------------
# Reading bad files: one line naming the file, the problem and the fix.


def make_db(path: Path, rows, schema: str = CREATE_TABLE) -> Path:
    with sqlite3.connect(path) as c:
        c.execute(schema)
        c.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows)
    return path


def ext_blob(value) -> bytes:
    return zlib.compress(msgpack.packb(value, use_bin_type=True))


def test_truncated_fixture_copy(fixtures, tmp_path):
    path = tmp_path / "cut.sqlite"
    full = (fixtures / "emnist_like.sqlite").read_bytes()
    path.write_bytes(full[:len(full) // 2 + 123])
    with pytest.raises(DataFormatError, match="truncated") as error:
        SQLiteFederatedData(path)
    assert_one_line(error, path, "fetch the file again")
    path.write_bytes(full[:60])
    with pytest.raises(DataFormatError, match="truncated") as error:
        SQLiteFederatedData(path)
    assert_one_line(error, path)


def test_corrupt_page(tmp_path):
    path = tmp_path / "c.sqlite"
    make_db(path, [(b"a", encode_client({"x": np.ones(2)}), 2)])
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[page:2 * page] = os.urandom(page)  # the table's root page
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="corrupt SQLite file") as error:
        SQLiteFederatedData(path)
    assert_one_line(error, path, "again")


@pytest.mark.parametrize("content, match", [
    (bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)), "not an SQLite"),
    (b"", "empty file"),
    (b"\xfd7zXZ\x00" + b"\x00" * 200, "xz -dk"),
    (b"\x5d\x00\x00\x80\x00" + b"\x00" * 200, "xz -dk"),
    (b"\x1f\x8b" + b"\x00" * 200, "gunzip"),
])
def test_not_sqlite(tmp_path, content, match):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match) as error:
        SQLiteFederatedData(path)
    assert_one_line(error, path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        SQLiteFederatedData(tmp_path / "absent.sqlite")
    with pytest.raises(DataFormatError, match="directory"):
        SQLiteFederatedData(tmp_path)


def test_wrong_schema(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE stuff (a INTEGER)")
    with pytest.raises(DataFormatError, match=r"no table federated_data \(tables: \['stuff'\]\)"
                       ) as error:
        SQLiteFederatedData(other)
    assert_one_line(error, other, "not a FedJAX SQLite file")

    columns = tmp_path / "columns.sqlite"
    with sqlite3.connect(columns) as c:
        c.execute("CREATE TABLE federated_data (client_id BLOB PRIMARY KEY, data BLOB)")
    with pytest.raises(DataFormatError, match=r"lacks \['num_examples'\]") as error:
        SQLiteFederatedData(columns)
    assert_one_line(error, columns)

    tff = tmp_path / "tff.sqlite"
    with sqlite3.connect(tff) as c:
        c.execute("CREATE TABLE examples (split_name TEXT, client_id TEXT, "
                  "serialized_example_proto BLOB)")
        c.execute("CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, "
                  "num_examples INTEGER)")
    with pytest.raises(DataFormatError, match="tff_to_sqlite") as error:
        SQLiteFederatedData(tff)
    assert_one_line(error, tff, "TensorFlow Federated")


ONE = np.ones(2, np.float32)


@pytest.mark.parametrize("blob, match", [
    (b"not zlib at all", "not zlib-compressed"),
    (zlib.compress(b"\xc1\xc1\xc1"), "not msgpack"),
    (ext_blob([1, 2]), "holds a list, not a dict"),
    (ext_blob({"x": msgpack.ExtType(7, b"\x00")}), "unknown msgpack ExtType 7"),
    (ext_blob({"x": msgpack.ExtType(3, b"\x00")}), "ExtType 3 .a numpy scalar"),
    (ext_blob({"x": 5}), "not an encoded array"),
    (ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[2], "float32", b"\x00" * 7]))}),
     "needs 8 bytes but 7"),
    (ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[2], "object", b"\x00" * 16]))}),
     "not numeric"),
    (ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[2], "nonsense", b""]))}),
     "unknown dtype name"),
    (ext_blob({"x": msgpack.ExtType(1, b"\xc1")}), "payload is not msgpack"),
    (ext_blob({"x": msgpack.ExtType(4, msgpack.packb([[3], [b"a"]]))}), "holds 1 elements"),
    (ext_blob({"x": msgpack.ExtType(4, msgpack.packb([[1], [7]]))}), "not bytes"),
    (ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[-1], "float32", b""]))}),
     "non-negative"),
    (encode_client({"x": np.ones(3, np.float32)}),
     "has 3 examples but num_examples says 2"),
    (ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[2], "float32", ONE.tobytes()])),
               "y": msgpack.ExtType(1, msgpack.packb([[3], "float32", b"\x00" * 12]))}),
     "disagree on the number of examples"),
    (ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[], "float32", b"\x00" * 4]))}),
     "scalar"),
])
def test_bad_blob(tmp_path, blob, match):
    path = make_db(tmp_path / "bad.sqlite", [(b"good", encode_client({"x": ONE}), 2),
                                            (b"bad", blob, 2)])
    data = SQLiteFederatedData(path)  # opening reads only ids and sizes
    np.testing.assert_array_equal(data.get_client(0)["x"], ONE)
    with pytest.raises(DataFormatError, match=match) as error:
        data.get_client_by_id("bad")
    assert_one_line(error, path, "'bad'")


def bomb_plain(declared: int) -> bytes:
    """A blob whose one feature declares `declared` zero bytes, packed and compressed whole."""
    payload = msgpack.packb(([declared], "uint8", bytes(declared)), use_bin_type=True)
    return zlib.compress(msgpack.packb({"x": msgpack.ExtType(1, payload)}, use_bin_type=True), 9)


def bomb(declared: int, chunk: int = 2**24) -> bytes:
    """`bomb_plain(declared)`'s bytes once decompressed, without packing or compressing
    them whole: 1 GiB of zeros in ~1 MB (zlib's ratio: ~1000:1) in well under a second.

    The msgpack header is written by hand (bin 32 and ext 32: `declared` > 65535); the
    zeros are compressed a `chunk` at a time at level 9 with a full flush after each (the
    compressor starts afresh, so every whole chunk compresses to the same bytes, compressed
    once); the Adler-32 of the zeros follows from the header's (A stays, B grows by n * A).
    """
    assert declared > 0xFFFF
    items = msgpack.packb(([declared], "uint8"), use_bin_type=True)[1:]  # without fixarray 2
    payload = b"\x93" + items + b"\xc6" + declared.to_bytes(4, "big")  # + the zeros
    head = (b"\x81" + msgpack.packb("x") + b"\xc9" + (len(payload) + declared).to_bytes(4, "big")
            + b"\x01" + payload)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = min(declared, chunk - len(head))
    parts = [b"\x78\xda", c.compress(head + bytes(first))]
    left = declared - first
    if left >= chunk:
        parts.append(c.flush(zlib.Z_FULL_FLUSH))
        whole = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
        parts.append(whole * (left // chunk))
        left %= chunk
    parts.append(c.compress(bytes(left)) + c.flush(zlib.Z_FINISH))
    adler = zlib.adler32(head)
    a, b = adler & 0xFFFF, ((adler >> 16) + declared * (adler & 0xFFFF)) % 65521
    return b"".join(parts) + ((b << 16) | a).to_bytes(4, "big")


def test_the_fast_bomb_decompresses_to_the_plain_one():
    for declared, chunk in [(70_000, 2**24), (200_000, 2**16), (3 * 2**16, 2**16)]:
        assert zlib.decompress(bomb(declared, chunk)) == zlib.decompress(bomb_plain(declared))


def test_decompression_bomb_is_refused_before_it_is_decompressed(tmp_path):
    import tracemalloc

    from fedjax_core.data import sqlite

    blob = bomb(2**30)  # 1 GiB of zeros in ~1 MB
    assert len(blob) < 1_100_000
    path = make_db(tmp_path / "bomb.sqlite", [(b"good", encode_client({"x": ONE}), 2),
                                             (b"bomb", blob, 2**30)])
    data = SQLiteFederatedData(path)
    tracemalloc.start()
    with pytest.raises(DataFormatError, match="declares 1073741851 bytes once decompressed, "
                                              "more than the 268435456 bytes") as error:
        data.get_client_by_id("bomb")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # the limit is checked before the bytes are decompressed
    assert_one_line(error, path, "'bomb'", "MAX_CLIENT_BYTES")
    assert sqlite.MAX_CLIENT_BYTES == 256 * 2**20


def test_client_bytes_limit_and_undeclared_bombs(monkeypatch):
    from fedjax_core.data import sqlite

    monkeypatch.setattr(sqlite, "MAX_CLIENT_BYTES", 4096)
    ok = encode_client({"x": np.zeros(1000, np.uint8)})  # 1000 bytes + headers: under the limit
    assert decode_client(ok)["x"].shape == (1000,)
    with pytest.raises(DataFormatError, match="declares 4.* bytes once decompressed"):
        decode_client(encode_client({"x": np.zeros(4096, np.uint8)}))
    # Not a map of encoded arrays: only a bounded part is decompressed, to name the problem.
    with pytest.raises(DataFormatError, match="not a msgpack map of feature name"):
        decode_client(zlib.compress(bytes(64 * 2**20), 9))
    with pytest.raises(DataFormatError, match="declares 100000 features; at most 1024"):
        decode_client(zlib.compress(b"\xdf" + (100000).to_bytes(4, "big")))
    # A blob cut short, or with bytes after the map, is still refused with one line.
    with pytest.raises(DataFormatError, match="incomplete or truncated stream"):
        decode_client(ok[:-4])
    extra = zlib.compress(zlib.decompress(ok) + b"\x00")
    with pytest.raises(DataFormatError, match="bytes after its map of features"):
        decode_client(extra)
    with pytest.raises(DataFormatError, match="maximum supported dimension|dimensions"):
        decode_client(ext_blob({"x": msgpack.ExtType(1, msgpack.packb([[1] * 65, "uint8", b"\x00"]))}))


def test_bad_num_examples_and_ids(tmp_path):
    path = make_db(tmp_path / "n.sqlite", [(b"a", encode_client({"x": ONE}), -2)])
    with pytest.raises(DataFormatError, match="num_examples=-2") as error:
        SQLiteFederatedData(path)
    assert_one_line(error, path)
    loose = "CREATE TABLE federated_data (client_id, data, num_examples)"
    path = make_db(tmp_path / "f.sqlite", [(b"a", encode_client({"x": ONE}), 2.5)], loose)
    with pytest.raises(DataFormatError, match="num_examples=2.5"):
        SQLiteFederatedData(path)
    path = make_db(tmp_path / "r.sqlite", [(1.5, encode_client({"x": ONE}), 2)], loose)
    with pytest.raises(DataFormatError, match="client_id 1.5 is a float"):
        SQLiteFederatedData(path)
    path = make_db(tmp_path / "t.sqlite", [(b"a", "text, not a blob", 2)], loose)
    with pytest.raises(DataFormatError, match="stored as str, not a BLOB"):
        SQLiteFederatedData(path).get_client(0)


def test_non_utf8_ids_are_escaped(tmp_path):
    path = make_db(tmp_path / "u.sqlite", [(b"\xff\x01", encode_client({"x": ONE}), 2)])
    data = SQLiteFederatedData(path)
    assert data.client_ids == ("\\xff\x01",)
    np.testing.assert_array_equal(data.get_client_by_id("\\xff\x01")["x"], ONE)
