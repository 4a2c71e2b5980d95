"""Checkpoints: bit-identical round trips, keep-K pruning, fallback past damaged
checkpoints, atomic writes, and a property test that damage never yields a wrong state."""

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjax_api import checkpoint
from fedjax_api.checkpoint import CheckpointError, CheckpointWarning
from fedjax_api.errors import ConfigError
from fedjax_core import client_state


class Dense(NamedTuple):
    w: jax.Array
    b: jax.Array


class Flags(NamedTuple):
    mask: jax.Array
    counts: jax.Array
    step: jax.Array


class AlgoState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    controls: client_state.ClientStore
    flags: Flags
    extra: dict
    key: jax.Array


def make_state(seed: int, capacity: int = 16, rows_written: int = 11) -> AlgoState:
    """A SCAFFOLD-like state: params, Adam state, a grown ClientStore, odd dtypes, keys."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"dense": Dense(jax.random.normal(k[0], (3, 4)), jax.random.normal(k[1], (4,))),
              "emb": jax.random.normal(k[2], (5, 2))}
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p + seed, params)
    for _ in range(3):
        _, opt_state = opt.update(grads, opt_state, params)
    store = client_state.empty_store(jax.tree.map(jnp.zeros_like, params))
    store = client_state.grow(store, capacity)
    if rows_written:
        rows = jnp.arange(rows_written)
        store = client_state.ClientStore(jax.tree.map(
            lambda t: t.at[rows].set(jax.random.normal(k[3], (rows_written,) + t.shape[1:])),
            store.rows))
    flags = Flags(mask=jnp.array([True, False, True, True]),
                  counts=jnp.array([0, 1, 2**32 - 1], jnp.uint32),
                  step=jnp.asarray(seed + 7, jnp.int32))
    extra = {"scale": jnp.asarray(0.25 * (seed + 1), jnp.float32),    # 0-d float32
             "nothing": None,
             "empty": optax.EmptyState(),
             "cohort_keys": jax.random.split(jax.random.key(seed + 100), 3),
             "rbg_key": jax.random.key(seed, impl="rbg"),
             "half": jnp.linspace(0, 1, 5, dtype=jnp.bfloat16)}
    return AlgoState(params, opt_state, store, flags, extra, jax.random.key(seed))


def template_state() -> AlgoState:
    """What a fresh run builds before resuming: same tree, an 8-row store."""
    return make_state(0, capacity=8, rows_written=0)


def assert_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert str(jax.random.key_impl(g)) == str(jax.random.key_impl(w))
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert isinstance(g, jax.Array)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


META = {"config": {"task": "tiny-test", "rounds": 30, "client_lr": 0.1},
        "versions": {"jax": jax.__version__},
        "metrics": [{"round": 1, "train/loss": 1.25}, {"round": 2, "train/loss": "nan"}],
        "sampler": {"round": 2},
        "client_index": {"positions": [17, 4, 9]}}


def files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ------------------------------------------------------------------------ round trip

def test_round_trip_is_bit_identical(tmp_path):
    state = make_state(1)
    path = checkpoint.save(tmp_path, 20, state, META)
    assert path == tmp_path / "checkpoints" / "ckpt-00000020.json"
    assert files(tmp_path) == ["ckpt-00000020.json", "ckpt-00000020.npz"]

    round_num, got, meta = checkpoint.load(tmp_path, template_state())
    assert round_num == 20
    assert_identical(got, state)
    assert got.controls.rows["emb"].shape == (16, 5, 2)      # template had 8 rows
    assert meta == {**META, "skipped": []}


def test_manifest_records_leaves_and_npz_digest(tmp_path):
    import hashlib
    state = make_state(2)
    path = checkpoint.save(tmp_path, 3, state, META)
    manifest = json.loads(path.read_text())
    leaves = jax.tree.leaves(state)
    assert manifest["version"] == checkpoint.FORMAT_VERSION and manifest["round"] == 3
    assert [e["name"] for e in manifest["leaves"]] == [f"leaf_{i:05d}" for i in range(len(leaves))]
    by_dtype = {e["dtype"]: e for e in manifest["leaves"]}
    assert by_dtype["key<fry>"]["key"] == "threefry2x32"
    assert by_dtype["key<rbg>"]["key"] == "rbg"
    assert by_dtype["bfloat16"]["stored_dtype"] == "<u2"
    assert {"float32", "int32", "bool", "uint32"} <= set(by_dtype)
    data = path.with_suffix(".npz").read_bytes()
    assert manifest["npz"] == {"file": "ckpt-00000003.npz", "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
        assert len(z.files) == len(leaves)


def test_load_one_manifest_or_its_npz(tmp_path):
    a, b = make_state(1), make_state(2)
    p1 = checkpoint.save(tmp_path, 1, a, {"n": 1})
    checkpoint.save(tmp_path, 2, b, {"n": 2})
    for given_path in (p1, p1.with_suffix(".npz")):
        round_num, got, meta = checkpoint.load(given_path, template_state())
        assert round_num == 1 and meta == {"n": 1, "skipped": []}
        assert_identical(got, a)
    round_num, got, _ = checkpoint.load(tmp_path / "checkpoints", template_state())
    assert round_num == 2


def test_weak_types_64_bit_leaves_and_meta_conversions(tmp_path):
    state = {"weak": jnp.asarray(1.5) * 2, "strong": jnp.ones(2),
             "i64": np.arange(3, dtype=np.int64), "f64": np.array([1 / 3])}
    assert state["weak"].weak_type
    meta = {"index": {"positions": np.array([5, 1], np.int64)}, "lr": np.float32(0.5),
            "out": tmp_path / "x", "ints": {3: "three"}}
    checkpoint.save(tmp_path, 0, state, meta)
    _, got, got_meta = checkpoint.load(tmp_path, state)
    assert got["weak"].weak_type and not got["strong"].weak_type
    # JAX runs without x64 in the tests: 64-bit leaves come back as numpy, bits intact.
    assert got["i64"].dtype == np.int64 and np.array_equal(got["i64"], state["i64"])
    assert got["f64"].tobytes() == state["f64"].tobytes()
    assert got_meta == {"index": {"positions": [5, 1]}, "lr": 0.5, "out": str(tmp_path / "x"),
                        "ints": {"3": "three"}, "skipped": []}


def test_template_may_be_abstract(tmp_path):
    state = make_state(3)
    checkpoint.save(tmp_path, 4, state, {})
    abstract = jax.eval_shape(lambda: template_state())
    _, got, _ = checkpoint.load(tmp_path, abstract)
    assert_identical(got, state)


def test_save_rejects_bad_input_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="leaf_00001 has dtype object"):
        checkpoint.save(tmp_path, 1, [jnp.ones(2), np.array([object()])], {})
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save(tmp_path, 1, [jnp.ones(2)], {"skipped": []})
    with pytest.raises(TypeError, match="not JSON"):
        checkpoint.save(tmp_path, 1, [jnp.ones(2)], {"f": lambda: 0})
    with pytest.raises(ValueError, match="keep"):
        checkpoint.save(tmp_path, 1, [jnp.ones(2)], {}, keep=0)
    assert not (tmp_path / "checkpoints").exists() or files(tmp_path) == []


# ------------------------------------------------------------------------- pruning

def test_keep_k_newest(tmp_path):
    state = make_state(0, capacity=8, rows_written=2)
    for r in range(1, 7):
        checkpoint.save(tmp_path, r, state, {"r": r}, keep=3)
    assert [r for r, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 5, 6]
    assert files(tmp_path) == [f"ckpt-{r:08d}.{ext}" for r in (4, 5, 6) for ext in ("json", "npz")]
    checkpoint.save(tmp_path, 7, state, {}, keep=1)
    assert files(tmp_path) == ["ckpt-00000007.json", "ckpt-00000007.npz"]


def test_prune_removes_stale_temps_orphans_and_rewound_rounds(tmp_path):
    state = make_state(0, capacity=8, rows_written=2)
    checkpoint.save(tmp_path, 10, state, {})
    checkpoint.save(tmp_path, 30, state, {})
    ckpt = tmp_path / "checkpoints"
    (ckpt / ".ckpt-00000020.npz.tmp-123-abcd").write_bytes(b"half")
    (ckpt / ".ckpt-00000020.json.tmp-123-abcd").write_text("{")
    (ckpt / "ckpt-00000025.npz").write_bytes(b"orphan: no manifest")
    (ckpt / "notes.txt").write_text("not ours")
    checkpoint.save(tmp_path, 20, state, {})          # resumed from 10: 30 is abandoned
    assert files(tmp_path) == ["ckpt-00000010.json", "ckpt-00000010.npz",
                               "ckpt-00000020.json", "ckpt-00000020.npz", "notes.txt"]
    assert checkpoint.load(tmp_path, state)[0] == 20


def test_list_checkpoints(tmp_path):
    assert checkpoint.list_checkpoints(tmp_path) == []
    state = [jnp.ones(2)]
    for r in (3, 7, 12):
        checkpoint.save(tmp_path, r, state, {}, keep=5)
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.list_checkpoints(tmp_path) == [
        (3, ckpt / "ckpt-00000003.json"), (7, ckpt / "ckpt-00000007.json"),
        (12, ckpt / "ckpt-00000012.json")]


# ------------------------------------------------------------------ damaged newest

def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-100])


def _flip_middle(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def _edit_manifest(edit):
    def apply(p: Path):
        m = json.loads(p.read_text())
        edit(m)
        p.write_text(json.dumps(m))
    return apply


def _rewrite_with_own_digest(edit):
    """A manifest edited and re-signed: as if written by another writer or version."""
    def apply(p: Path):
        m = json.loads(p.read_text())
        m.pop("manifest_sha256")
        edit(m)
        m["manifest_sha256"] = checkpoint._manifest_digest(m)
        p.write_text(json.dumps(m))
    return apply


DAMAGE = {
    "truncated npz": ("npz", _truncate, "ckpt-00000002.npz has"),
    "missing npz": ("npz", Path.unlink, "missing ckpt-00000002.npz"),
    "npz checksum mismatch": ("npz", _flip_middle, "checksum mismatch"),
    "npz with garbage appended": ("npz", lambda p: p.write_bytes(p.read_bytes() + b"x"),
                                  "(truncated or overwritten)"),
    "corrupt manifest JSON": ("json", lambda p: p.write_text(p.read_text()[:-40]),
                              "manifest is not valid JSON"),
    "empty manifest": ("json", lambda p: p.write_bytes(b""), "manifest is not valid JSON"),
    "manifest not utf-8": ("json", lambda p: p.write_bytes(b"\xff\xfe{"),
                           "manifest is not valid JSON"),
    "manifest edited": ("json", _edit_manifest(lambda m: m["meta"].update(n=99)),
                        "manifest checksum mismatch"),
    "unknown version": ("json", _edit_manifest(lambda m: m.update(version=99)),
                        "unknown format version 99"),
    "manifest says another round": ("json", _rewrite_with_own_digest(
        lambda m: m.update(round=3)), "manifest says round 3"),
    "manifest missing a field": ("json", _rewrite_with_own_digest(
        lambda m: m.pop("leaves")), "manifest malformed"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_newest_falls_back_to_previous(tmp_path, name):
    which, damage, reason = DAMAGE[name]
    a, b = make_state(1), make_state(2)
    checkpoint.save(tmp_path, 1, a, {"n": 1})
    newest = checkpoint.save(tmp_path, 2, b, {"n": 2})
    damage(newest.with_suffix("." + which))
    with pytest.warns(CheckpointWarning, match="ckpt-00000002"):
        round_num, got, meta = checkpoint.load(tmp_path, template_state())
    assert round_num == 1
    assert_identical(got, a)
    assert meta["n"] == 1
    [skipped] = meta["skipped"]
    assert skipped.startswith("ckpt-00000002: ") and reason in skipped, skipped


def test_newest_not_matching_template_falls_back(tmp_path):
    a = make_state(1)
    checkpoint.save(tmp_path, 1, a, {})
    checkpoint.save(tmp_path, 2, a._replace(key=None), {})                  # one leaf fewer
    checkpoint.save(tmp_path, 3, a._replace(
        extra={**a.extra, "scale": jnp.asarray(1, jnp.int32)}), {})        # int32, not float32
    with pytest.warns(CheckpointWarning):
        round_num, got, meta = checkpoint.load(tmp_path, template_state())
    assert round_num == 1
    assert_identical(got, a)
    n = len(jax.tree.leaves(a))
    assert meta["skipped"][0].startswith("ckpt-00000003: leaf_")
    assert meta["skipped"][0].endswith("is int32, the template's is float32")
    assert meta["skipped"][1] == f"ckpt-00000002: {n - 1} leaves, the template has {n}"


def test_reformatted_manifest_still_loads(tmp_path):
    state = make_state(1)
    path = checkpoint.save(tmp_path, 1, state, META)
    path.write_text(json.dumps(json.loads(path.read_text())))       # other whitespace
    round_num, got, meta = checkpoint.load(tmp_path, template_state())
    assert round_num == 1 and meta == {**META, "skipped": []}
    assert_identical(got, state)


def test_all_bad_is_one_line_checkpoint_error(tmp_path):
    checkpoint.save(tmp_path, 1, make_state(1), {})
    newest = checkpoint.save(tmp_path, 2, make_state(2), {})
    _flip_middle(newest.with_suffix(".npz"))
    (tmp_path / "checkpoints" / "ckpt-00000001.npz").unlink()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path, template_state())
    assert isinstance(e.value, ConfigError)
    assert str(e.value) == (f"no valid checkpoint in {tmp_path} (ckpt-00000002: checksum "
                            "mismatch; ckpt-00000001: missing ckpt-00000001.npz)")
    with pytest.raises(CheckpointError, match=r"^invalid checkpoint .*ckpt-00000002.json "
                                              r"\(checksum mismatch\)$"):
        checkpoint.load(newest, template_state())


def test_nothing_to_load_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .* holds no ckpt"):
        checkpoint.load(tmp_path, template_state())
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(tmp_path / "missing-run", template_state())
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a checkpoint manifest"):
        checkpoint.load(tmp_path / "notes.json", template_state())


# ------------------------------------------------------------- failure mid-write

@pytest.mark.parametrize("failing_call", [1, 2])
def test_failed_rename_leaves_no_temp_or_uncommitted_files(tmp_path, monkeypatch, failing_call):
    a = make_state(1)
    checkpoint.save(tmp_path, 1, a, {"n": 1})
    before = files(tmp_path)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:       # 1: the .npz rename; 2: the manifest's
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 2, make_state(2), {"n": 2})
    monkeypatch.undo()
    assert files(tmp_path) == before
    round_num, got, meta = checkpoint.load(tmp_path, template_state())
    assert round_num == 1 and meta == {"n": 1, "skipped": []}
    assert_identical(got, a)


def test_failure_while_writing_npz_leaves_nothing(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, make_state(1), {})

    def broken_savez(f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 2, make_state(2), {})
    assert files(tmp_path) == ["ckpt-00000001.json", "ckpt-00000001.npz"]


def test_failed_resave_of_same_round_uncommits_it(tmp_path, monkeypatch):
    a = make_state(1)
    checkpoint.save(tmp_path, 1, a, {})
    checkpoint.save(tmp_path, 2, make_state(2), {})
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 2, make_state(3), {})
    monkeypatch.undo()
    # The old round-2 checkpoint was uncommitted before its .npz could be replaced.
    assert files(tmp_path) == ["ckpt-00000001.json", "ckpt-00000001.npz"]
    assert_identical(checkpoint.load(tmp_path, template_state())[1], a)


# ------------------------------------------------------------------ property test

FILES = ("ckpt-00000001.npz", "ckpt-00000001.json", "ckpt-00000002.npz", "ckpt-00000002.json")
CASES = {"examples": 0, "newest": 0, "newest_despite_change": 0, "fallback": 0, "error": 0,
         "explicit_error": 0}


class Pristine(NamedTuple):
    run: Path
    a: AlgoState
    b: AlgoState
    template: AlgoState
    contents: dict

    def __repr__(self):
        return f"Pristine({self.run})"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two good checkpoints, rounds 1 (state a) and 2 (state b), and their bytes."""
    run = tmp_path_factory.mktemp("pristine")
    a, b = make_state(1), make_state(2)
    checkpoint.save(run, 1, a, {"n": 1})
    checkpoint.save(run, 2, b, {"n": 2})
    contents = {name: (run / "checkpoints" / name).read_bytes() for name in FILES}
    yield Pristine(run, a, b, template_state(), contents)
    print(f"\nhypothesis checkpoint-damage cases: {CASES}")


def _damage_op():
    which = st.sampled_from((2, 3, 0, 1, 2, 3))         # the newest, twice as often
    return st.one_of(
        st.tuples(st.just("flip"), which, st.integers(0, 2**31), st.integers(1, 255)),
        st.tuples(st.just("truncate"), which, st.integers(0, 2**31)),
        st.tuples(st.just("append"), which, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), which),
        st.tuples(st.just("reformat"), which, st.sampled_from([None, 0, 4])))


def _apply(ckpt_dir: Path, op):
    path = ckpt_dir / FILES[op[1]]
    if not path.exists():
        return
    data = bytearray(path.read_bytes())
    if op[0] == "flip" and data:
        data[op[2] % len(data)] ^= op[3]
    elif op[0] == "truncate":
        data = data[:op[2] % (len(data) + 1)]
    elif op[0] == "append":
        data += op[2]
    elif op[0] == "delete":
        path.unlink()
        return
    elif op[0] == "reformat":               # same JSON, other bytes: harmless
        try:
            data = json.dumps(json.loads(data.decode()), indent=op[2]).encode()
        except ValueError:
            return
    path.write_bytes(bytes(data))


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_damage_op(), min_size=1, max_size=4))
def test_damage_gives_the_identical_state_or_checkpoint_error(pristine, ops):
    run, a, b, template, contents = pristine
    CASES["examples"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy)
        for op in ops:
            _apply(copy / "checkpoints", op)
        def changed(r):
            return any(not (copy / "checkpoints" / n).exists()
                       or (copy / "checkpoints" / n).read_bytes() != contents[n]
                       for n in FILES if n.startswith(f"ckpt-{r:08d}"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            try:
                round_num, got, meta = checkpoint.load(copy, template)
            except CheckpointError as e:
                assert changed(1) and changed(2)
                assert "\n" not in str(e)
                assert str(e).startswith(("no valid checkpoint in ", "no checkpoint in "))
                CASES["error"] += 1
            else:
                if round_num == 2:
                    assert_identical(got, b)
                    assert meta == {"n": 2, "skipped": []}
                    CASES["newest"] += 1
                    CASES["newest_despite_change"] += changed(2)   # e.g. JSON whitespace
                else:
                    assert round_num == 1 and changed(2)
                    assert_identical(got, a)
                    assert meta["n"] == 1
                    if (copy / "checkpoints" / FILES[3]).exists():
                        [reason] = meta["skipped"]
                        assert reason.startswith("ckpt-00000002: ")
                    else:                   # no manifest: round 2 was never committed
                        assert meta["skipped"] == []
                    CASES["fallback"] += 1
            try:
                round_num, got, meta = checkpoint.load(
                    copy / "checkpoints" / "ckpt-00000002.json", template)
            except CheckpointError as e:
                assert changed(2) and "\n" not in str(e)
                CASES["explicit_error"] += 1
            else:
                assert round_num == 2 and meta == {"n": 2, "skipped": []}
                assert_identical(got, b)
