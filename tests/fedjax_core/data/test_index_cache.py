"""The index cache: a data file's ids and sizes built once, reused, rebuilt when the file or the
entry changes; preprocessed sizes cached the same way."""

import os
import sqlite3
import sys

import numpy as np
import pytest

from fedjax_core.data import index_cache
from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import PreprocessedFederatedData
from fedjax_core.data.sqlite import CREATE_TABLE, SQLiteFederatedData, encode_client, write_sqlite


def clients(n: int, width: int = 2, first: int = 1):
    """`n` clients `c000..`, client i with `first + i % 3` examples of `width` float32s."""
    return [(f"c{i:03d}", {"x": np.full((first + i % 3, width), i, np.float32)})
            for i in range(n)]


@pytest.fixture
def reads(monkeypatch):
    """Counts the times an open reads the index from the file itself (not from the cache)."""
    count = [0]
    real = SQLiteFederatedData._read_index

    def counted(self):
        count[0] += 1
        return real(self)

    monkeypatch.setattr(SQLiteFederatedData, "_read_index", counted)
    return count


def entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def same_index(a: SQLiteFederatedData, b: SQLiteFederatedData) -> None:
    assert a.client_ids == b.client_ids
    assert a._raw_ids == b._raw_ids
    assert [type(r) for r in a._raw_ids] == [type(r) for r in b._raw_ids]
    np.testing.assert_array_equal(a.client_sizes, b.client_sizes)
    assert a.client_sizes.dtype == np.int64 and not a.client_sizes.flags.writeable


def test_built_on_first_open_reused_on_second(tmp_path, reads):
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(7))
    first = SQLiteFederatedData(path, index_cache=folder)
    assert reads[0] == 1 and len(entries(folder)) == 1
    second = SQLiteFederatedData(path, index_cache=folder)
    assert reads[0] == 1  # from the cache
    plain = SQLiteFederatedData(path, index_cache=False)
    assert reads[0] == 2 and plain.index_source is None
    same_index(second, plain)
    same_index(first, plain)
    assert second.client_ids == tuple(f"c{i:03d}" for i in range(7))
    assert second.client_sizes.tolist() == [1, 2, 3, 1, 2, 3, 1]
    np.testing.assert_array_equal(second.get_client_by_id("c005")["x"], np.full((3, 2), 5))
    assert second.index_source == index_cache.IndexSource(folder, index_cache.file_key(path))


def test_text_odd_and_int_ids_round_trip(tmp_path, reads):
    folder = tmp_path / "cache"
    text = tmp_path / "t.sqlite"
    write_sqlite(text, [("é", {"x": np.ones(2)}), ("a\x00", {"x": np.ones(1)})], text_ids=True)
    blob = tmp_path / "b.sqlite"  # trailing NULs and bytes that are not UTF-8 stay exact
    write_sqlite(blob, [(b"z\x00\x00", {"x": np.ones(3)}), (b"\xff\x01", {"x": np.ones(1)}),
                        (b"", {"x": np.ones(2)})])
    mixed = tmp_path / "m.sqlite"
    with sqlite3.connect(mixed) as c:
        c.execute("CREATE TABLE federated_data (client_id, data, num_examples)")
        c.executemany("INSERT INTO federated_data VALUES (?, ?, ?)",
                      [(b, encode_client({"x": np.ones(n)}), n)
                       for b, n in ((7, 1), ("t", 2), (b"b", 3), (-4, 1))])
    c.close()
    for path in (text, blob, mixed):
        SQLiteFederatedData(path, index_cache=folder)
        cached = SQLiteFederatedData(path, index_cache=folder)
        same_index(cached, SQLiteFederatedData(path, index_cache=False))
        for i in range(len(cached)):
            cached.get_client(i)  # the raw id finds its row
    assert reads[0] == 6
    assert SQLiteFederatedData(mixed, index_cache=folder)._raw_ids == (7, "t", b"b", -4)
    assert SQLiteFederatedData(blob, index_cache=folder).client_ids == ("z\x00\x00", "\\xff\x01", "")


def test_empty_file_is_cached(tmp_path, reads):
    path, folder = tmp_path / "e.sqlite", tmp_path / "cache"
    write_sqlite(path, [])
    for _ in range(2):
        data = SQLiteFederatedData(path, index_cache=folder)
        assert data.client_ids == () and data.client_sizes.shape == (0,)
    assert reads[0] == 1


def test_changed_file_is_read_again(tmp_path, reads):
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(5))
    SQLiteFederatedData(path, index_cache=folder)
    write_sqlite(path, clients(6, first=2), overwrite=True)  # other size, new inode
    data = SQLiteFederatedData(path, index_cache=folder)
    assert reads[0] == 2 and len(data) == 6 and data.client_sizes[0] == 2
    assert len(entries(folder)) == 1  # one entry per path: the old one was replaced
    SQLiteFederatedData(path, index_cache=folder)
    assert reads[0] == 2


def test_same_size_same_mtime_other_content_is_read_again(tmp_path, reads):
    """An in-place write keeps the size, inode and (restored) mtime; the header hash differs
    (SQLite's change counter)."""
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(4))
    before = os.stat(path)
    assert SQLiteFederatedData(path, index_cache=folder).client_sizes[2] == 3
    with sqlite3.connect(path) as c:
        c.execute("UPDATE federated_data SET num_examples = 9 WHERE client_id = ?", (b"c002",))
    c.close()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)
    assert SQLiteFederatedData(path, index_cache=folder).client_sizes[2] == 9
    assert reads[0] == 2


def test_touched_file_is_read_again(tmp_path, reads):
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(3))
    SQLiteFederatedData(path, index_cache=folder)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    SQLiteFederatedData(path, index_cache=folder)
    assert reads[0] == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other_key", "link", "dir"])
def test_corrupt_entry_is_rebuilt_silently(tmp_path, reads, damage):
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(5))
    SQLiteFederatedData(path, index_cache=folder)
    [name] = entries(folder)
    entry = folder / name
    good = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"PK\x03\x04" + os.urandom(200))
    elif damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    elif damage == "other_key":  # a valid entry of another file copied over this one
        other = tmp_path / "o.sqlite"
        write_sqlite(other, clients(2))
        SQLiteFederatedData(other, index_cache=folder)
        entry.write_bytes(next(p for p in folder.iterdir() if p.name != name).read_bytes())
    elif damage == "link":  # a planted link: never read through, replaced by a file
        target = tmp_path / "target.npz"
        target.write_bytes(good)
        entry.unlink()
        entry.symlink_to(target)
    else:
        entry.unlink()
        entry.mkdir()
    data = SQLiteFederatedData(path, index_cache=folder)
    same_index(data, SQLiteFederatedData(path, index_cache=False))
    if damage == "dir":  # cannot be replaced: read from the file every time, never an error
        SQLiteFederatedData(path, index_cache=folder)
        assert reads[0] == 4
        return
    assert reads[0] == 3 + (damage == "other_key")  # rebuilt once (and the plain open)
    assert entry.is_file() and not entry.is_symlink()
    if damage == "link":
        assert (tmp_path / "target.npz").read_bytes() == good
    SQLiteFederatedData(path, index_cache=folder)
    assert reads[0] == 3 + (damage == "other_key")  # and reused


def test_entry_fields_are_checked(tmp_path):
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(3))
    key = index_cache.file_key(path)
    assert index_cache.store_index(folder, key, [b"a", b"bc", b"d"], np.array([1, 2, 3]))
    assert index_cache.load_index(folder, key)[0] == [b"a", b"bc", b"d"]
    [entry] = folder.iterdir()
    with np.load(entry, allow_pickle=False) as npz:
        arrays = dict(npz)
    arrays["id_lengths"] = np.array([1, 2, 2], np.uint8)  # lengths that overrun the bytes
    with open(entry, "wb") as f:
        np.savez(f, **arrays)
    assert index_cache.load_index(folder, key) is None
    stale = key._replace(mtime_ns=key.mtime_ns + 1)
    assert index_cache.store_index(folder, key, [b"a"], np.array([1]))
    assert index_cache.load_index(folder, stale) is None
    assert index_cache.load_index(None, key) is None
    assert not index_cache.store_index(folder, key, [1.5], np.array([1]))  # not an id type


def test_errors_are_todays_and_nothing_is_cached(tmp_path):
    folder = tmp_path / "cache"
    path = tmp_path / "n.sqlite"
    with sqlite3.connect(path) as c:
        c.execute(CREATE_TABLE)
        c.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                  (b"a", encode_client({"x": np.ones(2)}), -2))
    c.close()
    for _ in range(2):
        with pytest.raises(DataFormatError, match="num_examples=-2"):
            SQLiteFederatedData(path, index_cache=folder)
    assert entries(folder) == []


def test_unwritable_cache_and_wal_files_still_open(tmp_path, reads):
    path = tmp_path / "d.sqlite"
    write_sqlite(path, clients(3))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    data = SQLiteFederatedData(path, index_cache=not_a_folder)
    assert len(data) == 3
    folder = tmp_path / "cache"
    (tmp_path / "d.sqlite-journal").write_bytes(b"")  # a journal beside it: never cached
    SQLiteFederatedData(path, index_cache=folder)
    assert entries(folder) == [] and not index_cache.cacheable(path)
    assert SQLiteFederatedData(path, index_cache=folder).index_source is None


def test_environment_picks_the_folder_or_turns_it_off(tmp_path, monkeypatch, reads):
    path = tmp_path / "d.sqlite"
    write_sqlite(path, clients(3))
    monkeypatch.setenv("FEDJAX_INDEX_CACHE", "0")
    assert index_cache.default_dir() is None
    SQLiteFederatedData(path)
    monkeypatch.setenv("FEDJAX_INDEX_CACHE", str(tmp_path / "env"))
    SQLiteFederatedData(path)
    SQLiteFederatedData(path)
    assert reads[0] == 2 and len(entries(tmp_path / "env")) == 1
    monkeypatch.delenv("FEDJAX_INDEX_CACHE")
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "data"))
    assert index_cache.default_dir() == tmp_path / "data" / "index"
    SQLiteFederatedData(path)
    assert len(entries(tmp_path / "data" / "index")) == 1


def test_default_folder_refuses_a_planted_link(tmp_path, monkeypatch, reads):
    monkeypatch.delenv("FEDJAX_INDEX_CACHE")
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "data"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index").symlink_to(elsewhere)
    path = tmp_path / "d.sqlite"
    write_sqlite(path, clients(3))
    assert len(SQLiteFederatedData(path)) == 3
    assert list(elsewhere.iterdir()) == []  # not written through the link
    SQLiteFederatedData(path, index_cache=elsewhere)  # a valid entry there ...
    assert len(list(elsewhere.iterdir())) == 1 and reads[0] == 2
    SQLiteFederatedData(path)
    assert reads[0] == 3  # ... is not read through the link either


def test_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(index_cache, "MAX_ENTRIES", 2)
    folder = tmp_path / "cache"
    for i in range(4):
        path = tmp_path / f"d{i}.sqlite"
        write_sqlite(path, clients(2))
        SQLiteFederatedData(path, index_cache=folder)
        assert len(entries(folder)) == min(i + 1, 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/io")
def test_second_open_reads_under_5_percent_of_the_file(tmp_path):
    path, folder = tmp_path / "big.sqlite", tmp_path / "cache"
    rng = np.random.default_rng(0)  # incompressible bytes: the blobs are most of the file
    write_sqlite(path, ((f"client{i:05d}", {"b": rng.integers(0, 256, (700,), np.uint8)})
                        for i in range(3000)))
    size = os.path.getsize(path)
    assert size > 2_000_000

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    def bytes_to_open() -> int:
        before = rchar()
        SQLiteFederatedData(path, index_cache=folder).close()
        return rchar() - before

    first, second = bytes_to_open(), bytes_to_open()
    assert first > 0.9 * size, (first, size)  # the query walks every overflow page
    assert second < 0.05 * size, (second, size)


def test_preprocessed_sizes_are_cached(tmp_path):
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(5))
    calls = [0]

    def doubled(cid, arrays):  # changes the number of examples
        calls[0] += 1
        return {"x": np.concatenate([arrays["x"], arrays["x"]])}

    def sizes(version, cache=folder):
        base = SQLiteFederatedData(path, index_cache=cache)
        return PreprocessedFederatedData(base, doubled, False, sizes_version=version).client_sizes

    expected = [2, 4, 6, 2, 4]
    assert sizes("double-v1").tolist() == expected and calls[0] == 5
    got = sizes("double-v1")
    assert got.tolist() == expected and got.dtype == np.int64 and calls[0] == 5  # cached
    assert sizes("double-v2").tolist() == expected and calls[0] == 10  # another version
    assert sizes(None).tolist() == expected and calls[0] == 15  # no version: never cached
    assert sizes("double-v1", cache=False).tolist() == expected and calls[0] == 20
    assert len(entries(folder)) == 3  # the index and two versions of sizes
    write_sqlite(path, clients(4), overwrite=True)
    assert sizes("double-v1").tolist() == expected[:4] and calls[0] == 24  # file changed


def test_ids_from_a_cached_index_are_checked_on_lookup(tmp_path):
    """A cached index skips the duplicate check at open; a lookup by id still makes it."""
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(2))
    key = index_cache.file_key(path)
    assert index_cache.store_index(folder, key, [b"\xff", "\\xff"], np.array([1, 2]))
    data = SQLiteFederatedData(path, index_cache=folder)
    assert data.client_ids == ("\\xff", "\\xff")
    with pytest.raises(DataFormatError, match="appears twice"):
        data.get_client_by_id("\\xff")


def test_a_file_replaced_while_opening_is_read_not_cached(tmp_path, monkeypatch, reads):
    """The key is taken before connecting and again after: a file replaced in between is
    read through the connection (what it sees), and no entry is read or stored for it."""
    path, folder = tmp_path / "d.sqlite", tmp_path / "cache"
    write_sqlite(path, clients(3))
    SQLiteFederatedData(path, index_cache=folder)  # an entry for the first version
    real_connect = sqlite3.connect

    def connect_then_replace(*args, **kwargs):
        monkeypatch.setattr(sqlite3, "connect", real_connect)  # once
        connection = real_connect(*args, **kwargs)
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()  # holds the file
        write_sqlite(path, clients(5), overwrite=True)
        return connection

    monkeypatch.setattr(sqlite3, "connect", connect_then_replace)
    data = SQLiteFederatedData(path, index_cache=folder)
    assert len(data) == 3 and reads[0] == 2  # the old file, read, not from its entry
    assert data.index_source is None
    assert len(SQLiteFederatedData(path, index_cache=folder)) == 5 and reads[0] == 3
