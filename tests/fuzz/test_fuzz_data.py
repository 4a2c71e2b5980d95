"""Fuzz: damaged dataset files, blobs and checkpoint manifests end in a result or one line.

Inputs are valid files (the FedJAX-written fixtures, LEAF JSON, `.npz`, a checkpoint) after
random byte mutations (flips, bit flips, truncations, deletions, insertions) or JSON-level
ones (a value replaced by another JSON value, re-signed where the format has a checksum).
"""

import gzip
import json
import shutil
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.sqlite import decode_client, encode_client, write_sqlite
from tests.fixtures import FEDJAX_SQLITE, FEMNIST_LEAF_SAMPLE
from tests.fuzz import FUZZ, assert_clean, mutate, mutations, run_cli, scaled, snapshot

# ------------------------------------------------------------------------ JSON-level mutations

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=6)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):  # the first few items of long lists are enough
            yield from _paths(v, prefix + (i,))


def replace_at(doc, choice: int, value, drop: bool):
    """`doc` with the node number `choice` (pre-order) replaced by `value`, or removed."""
    paths = list(_paths(doc))
    path = paths[choice % len(paths)]
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


json_edit = st.tuples(st.integers(0, 10**6), json_value, st.booleans())


# ------------------------------------------------------------------------------- SQLite files

def small_sqlite(path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_sqlite(path, [(f"client{i}", {"x": rng.normal(size=(3 + i, 4)).astype(np.float32),
                                        "y": np.arange(3 + i, dtype=np.int32)})
                        for i in range(4)])
    return path


@pytest.fixture(scope="module")
def sqlite_sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    return {"small": small_sqlite(tmp / "small.sqlite").read_bytes(),
            "fedjax_shakespeare": (FEDJAX_SQLITE / "shakespeare_like.sqlite").read_bytes(),
            "fedjax_stackoverflow": (FEDJAX_SQLITE / "stackoverflow_like.sqlite").read_bytes()}


@FUZZ
@given(source=st.sampled_from(["small", "fedjax_shakespeare", "fedjax_stackoverflow"]),
       ops=mutations)
def test_damaged_sqlite_file_info_check(sqlite_sources, tmp_path_factory, source, ops):
    root = tmp_path_factory.mktemp("sq")
    path = root / "data.sqlite"
    path.write_bytes(mutate(sqlite_sources[source], ops))
    before = snapshot(root)
    res = run_cli("data", "info", str(path), "--check", cwd=root)
    assert_clean(res)
    assert snapshot(root) == before  # reading writes nothing (no journal, no WAL files)
    if res.code == 0:
        assert "clients OK" in res.out, res


@scaled(200)
@given(ops=mutations, features=st.integers(1, 3), n=st.integers(0, 5),
       layer=st.sampled_from(["compressed", "msgpack"]))
def test_damaged_blob_decodes_or_is_one_data_format_error(ops, features, n, layer):
    arrays = {f"f{i}": np.arange(n * (i + 1), dtype=np.float32).reshape(n, i + 1)
              for i in range(features)}
    arrays["text"] = np.array([b"ab"] * n, dtype=object)
    blob = encode_client(arrays)
    if layer == "msgpack":
        blob = zlib.compress(mutate(zlib.decompress(blob), ops))
    else:
        blob = mutate(blob, ops)
    try:
        out = decode_client(blob)
    except DataFormatError as e:
        assert "\n" not in str(e) and str(e).startswith("client blob: ")
        return
    assert isinstance(out, dict) and all(isinstance(v, np.ndarray) for v in out.values())


@scaled(100)
@given(edits=st.lists(json_edit, min_size=1, max_size=2))
def test_restructured_blob_decodes_or_is_one_data_format_error(edits):
    """Well-formed zlib and msgpack holding the wrong structure (shapes, dtypes, types)."""
    doc = {"x": [[2, 3], "float32", 6], "y": [[2], ["a", "b"]]}
    for choice, value, drop in edits:
        doc = replace_at(doc, choice, value, drop)

    def ext(v, code):
        if isinstance(v, list) and len(v) == 3 and isinstance(v[2], int) and 0 <= v[2] < 64:
            v = [v[0], v[1].encode() if isinstance(v[1], str) else v[1], bytes(4 * v[2])]
        elif isinstance(v, list) and len(v) == 2 and isinstance(v[1], list):
            v = [v[0], [s.encode() if isinstance(s, str) else s for s in v[1]]]
        return msgpack.ExtType(code, msgpack.packb(v, use_bin_type=True))

    try:
        value = ({k: ext(v, 1 if k == "x" else 4) for k, v in doc.items()}
                 if isinstance(doc, dict) else doc)
        blob = zlib.compress(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):  # msgpack cannot pack it: nothing to test
        return
    try:
        decode_client(blob)
    except DataFormatError as e:
        assert "\n" not in str(e)


# --------------------------------------------------------------------------------------- LEAF

LEAF_DOC = {"users": ["u1", "u2", "u3"], "num_samples": [2, 1, 0],
            "user_data": {"u1": {"x": [[0.0] * 784, [1.0] * 784], "y": [3, 61]},
                          "u2": {"x": [[0.5] * 784], "y": [7]},
                          "u3": {"x": [], "y": []}}}


def _leaf_round(root: Path, folder: Path) -> None:
    out = root / "out"
    out.mkdir()
    before = snapshot(root, skip=out)
    res = run_cli("data", "info", str(folder), "--check", cwd=root)
    assert_clean(res)
    res = run_cli("data", "convert", str(folder), str(out / "c.sqlite"), cwd=root)
    assert_clean(res)
    assert snapshot(root, skip=out) == before
    if res.code == 2:  # a failed conversion leaves nothing behind
        assert list(out.iterdir()) == []


@FUZZ
@given(ops=mutations, gz=st.booleans())
def test_damaged_leaf_bytes(tmp_path_factory, ops, gz):
    root = tmp_path_factory.mktemp("leaf")
    folder = root / "train"
    folder.mkdir()
    data = json.dumps(LEAF_DOC).encode()
    data = mutate(gzip.compress(data, mtime=0) if gz else data, ops)
    (folder / ("part.json.gz" if gz else "part.json")).write_bytes(data)
    _leaf_round(root, folder)


@FUZZ
@given(edits=st.lists(json_edit, min_size=1, max_size=3))
def test_restructured_leaf_json(tmp_path_factory, edits):
    root = tmp_path_factory.mktemp("leafj")
    folder = root / "train"
    folder.mkdir()
    doc = LEAF_DOC
    for choice, value, drop in edits:
        doc = replace_at(doc, choice, value, drop)
    (folder / "part.json").write_text(json.dumps(doc))
    _leaf_round(root, folder)


@scaled(5)
@given(ops=mutations)
def test_damaged_femnist_sample_shard(tmp_path_factory, ops):
    root = tmp_path_factory.mktemp("femnist")
    folder = root / "test"
    folder.mkdir()
    shard = FEMNIST_LEAF_SAMPLE / "test" / "all_data_7_niid_05_keep_0_test_9.json.gz"
    raw = gzip.decompress(shard.read_bytes())
    (folder / "shard.json").write_bytes(mutate(raw, ops))
    _leaf_round(root, folder)


# ---------------------------------------------------------------------------------------- npz

@FUZZ
@given(ops=mutations, compressed=st.booleans())
def test_damaged_npz_partition(tmp_path_factory, ops, compressed):
    root = tmp_path_factory.mktemp("npz")
    good = root / "good.npz"
    save = np.savez_compressed if compressed else np.savez
    save(good, x=np.arange(120, dtype=np.float32).reshape(40, 3),
         y=np.arange(40, dtype=np.int32) % 4)
    src = root / "in.npz"
    src.write_bytes(mutate(good.read_bytes(), ops))
    good.unlink()
    out = root / "out"
    out.mkdir()
    before = snapshot(root, skip=out)
    res = run_cli("data", "partition", str(src), str(out / "p.sqlite"), "--clients", "4",
                  "--method", "dirichlet", cwd=root)
    assert_clean(res)
    assert snapshot(root, skip=out) == before
    if res.code == 2:
        assert list(out.iterdir()) == []


# ------------------------------------------------------------------------ checkpoint manifests

@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    import jax
    import jax.numpy as jnp

    from fedjax_api import checkpoint

    run = tmp_path_factory.mktemp("ckpt_src")
    state = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "step": jnp.asarray(4),
             "key": jax.random.key(0), "half": jnp.ones(3, jnp.bfloat16)}
    checkpoint.save(run, 1, state, {"note": "first"})
    checkpoint.save(run, 2, jax.tree.map(lambda x: x, state), {"note": "second"})
    return run, state


def _load_as_cli(run: Path, template):
    """`checkpoint.load` behind the CLI's own error mapping (what `fedjax resume` does)."""
    import typer

    from cli.common import user_errors
    from fedjax_api import checkpoint

    try:
        return 0, user_errors(checkpoint.load)(run, template)
    except typer.Exit as e:
        return e.exit_code, None


@pytest.mark.filterwarnings("ignore::fedjax_api.checkpoint.CheckpointWarning")
@FUZZ
@given(edits=st.lists(json_edit, min_size=1, max_size=3), resign=st.booleans(),
       ops=st.one_of(st.none(), mutations), which=st.sampled_from([1, 2]))
def test_damaged_checkpoint_manifest(saved_checkpoint, tmp_path_factory, edits, resign, ops,
                                     which):
    import jax
    import numpy.testing as npt

    from fedjax_api import checkpoint

    src, state = saved_checkpoint
    run = tmp_path_factory.mktemp("ckpt")
    shutil.copytree(src, run, dirs_exist_ok=True)
    manifest = run / "checkpoints" / f"ckpt-{which:08d}.json"
    if ops is not None:
        manifest.write_bytes(mutate(manifest.read_bytes(), ops))
    else:
        doc = json.loads(manifest.read_text())
        doc.pop("manifest_sha256")
        for choice, value, drop in edits:
            doc = replace_at(doc, choice, value, drop)
        if resign and isinstance(doc, dict):
            doc["manifest_sha256"] = checkpoint._manifest_digest(doc)
        manifest.write_text(json.dumps(doc))
    before = snapshot(run)
    code, loaded = _load_as_cli(run, state)
    assert code in (0, 2)
    assert snapshot(run) == before  # loading never repairs, renames or deletes
    if code == 0:  # the damaged one was refused (then round 1) or its change was harmless
        round_num, got, meta = loaded
        assert round_num in (1, 2)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            npt.assert_array_equal(np.asarray(a), np.asarray(b))
