"""What opening a FedJAX SQLite file costs: wall time and bytes read, first open (the index
cache is built) against later opens (read from it), on files of 100,000 and 1,000,000 small
clients; and the Shakespeare task's preprocessed sizes, counted against cached.

The files have FedJAX's schema (`fedjax_core.data.sqlite.CREATE_TABLE`), one row per client in
id order, written in one transaction as `write_sqlite` does. Each client holds `x`, a
`[n, 16]` uint8 array of random bytes, and `y`, `[n]` int32 labels, with `n` in 8..23; to write a
million rows quickly the blobs come from a pool of 4096 clients encoded once
(`encode_client`), reused in turn. A blob is about 250-500 bytes, so the data dominates the file
as in FedJAX's published files.

Every open runs in its own Python process, and is measured around `SQLiteFederatedData(path)`
alone: wall time (`time.perf_counter`) and the bytes the process read (Linux `/proc/self/io`
`rchar`: every `read`/`pread`, SQLite's included, whether or not the page cache served them).
The files were just written, so they are in the page cache: wall times are those of a warm
page cache; a cold disk adds the bytes read divided by its bandwidth.

    python -m benchmarks.open_cost                       # writes benchmarks/results/open_cost.json
    python -m benchmarks.open_cost --clients 20000       # quick

Never part of the tests. Needs Linux (`/proc/self/io`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
POOL = 4096


def write_file(path: Path, num_clients: int, seed: int = 0) -> int:
    """Writes `num_clients` small clients in FedJAX's format; returns the file's size."""
    from fedjax_core.data.sqlite import CREATE_TABLE, encode_client

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        n = int(rng.integers(8, 24))
        arrays = {"x": rng.integers(0, 256, (n, 16), np.uint8),
                  "y": rng.integers(0, 10, n).astype(np.int32)}
        pool.append((encode_client(arrays), n))
    if path.exists():
        path.unlink()
    connection = sqlite3.connect(path)
    try:
        connection.execute(CREATE_TABLE + ";")
        connection.commit()
        connection.executemany("INSERT INTO federated_data VALUES (?, ?, ?);", (
            (f"{i:08d}".encode(), *pool[i % POOL]) for i in range(num_clients)))
        connection.commit()
    finally:
        connection.close()
    return path.stat().st_size


_CHILD = """
import json, sys, time
from fedjax_core.data.sqlite import SQLiteFederatedData
def rchar():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("rchar:"))
r0, t0 = rchar(), time.perf_counter()
data = SQLiteFederatedData(sys.argv[1])
t1, r1 = time.perf_counter(), rchar()
print(json.dumps({"seconds": t1 - t0, "bytes_read": r1 - r0, "clients": len(data),
                  "examples": int(data.client_sizes.sum())}))
"""


def open_once(path: Path, cache: str) -> dict:
    """One open in a fresh process, with `FEDJAX_INDEX_CACHE=cache` (`0`: no cache)."""
    env = dict(os.environ, FEDJAX_INDEX_CACHE=cache, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_open(num_clients: int, folder: Path, repeats: int) -> dict:
    """The file's size; the open without a cache, the first open and `repeats` later ones."""
    path = folder / f"open_cost_{num_clients}.sqlite"
    cache = folder / "index"
    t0 = time.perf_counter()
    size = write_file(path, num_clients)
    write_seconds = time.perf_counter() - t0
    uncached = open_once(path, "0")
    first = open_once(path, str(cache))
    later = [open_once(path, str(cache)) for _ in range(repeats)]
    entry = sum(p.stat().st_size for p in cache.iterdir())
    path.unlink()
    for p in cache.iterdir():
        p.unlink()
    best = min(later, key=lambda r: r["seconds"])
    row = {
        "clients": num_clients, "file_bytes": size, "write_seconds": round(write_seconds, 2),
        "cache_entry_bytes": entry,
        "no_cache": uncached, "first_open": first, "second_open": later[0],
        "later_open_best_seconds": best["seconds"],
        "first_read_fraction": first["bytes_read"] / size,
        "second_read_fraction": later[0]["bytes_read"] / size,
        "no_cache_read_fraction": uncached["bytes_read"] / size,
    }
    print(f"{num_clients:>9,} clients, {size / 1e6:7.1f} MB: no cache "
          f"{uncached['seconds']:.2f} s / {row['no_cache_read_fraction']:.1%} read; first "
          f"{first['seconds']:.2f} s / {row['first_read_fraction']:.1%}; second "
          f"{later[0]['seconds']:.2f} s / {row['second_read_fraction']:.2%} "
          f"(entry {entry / 1e6:.1f} MB)", flush=True)
    return row


def measure_shakespeare(folder: Path, num_clients: int = 715, seed: int = 0) -> dict:
    """Counting the Shakespeare task's preprocessed sizes (every client preprocessed) against
    reading them from the cache, on a Shakespeare-like file: `num_clients` roles (as FedJAX's
    file has), each 1-29 snippets of 20-399 random in-vocabulary bytes."""
    from fedjax_core.data import shakespeare
    from fedjax_core.data.federated_data import PreprocessedFederatedData
    from fedjax_core.data.sqlite import SQLiteFederatedData, write_sqlite

    rng = np.random.default_rng(seed)
    letters = np.frombuffer(shakespeare.VOCAB, np.uint8)
    path = folder / "open_cost_shakespeare.sqlite"
    cache = folder / "index"

    def role(i):
        snippets = [letters[rng.integers(0, letters.size, int(rng.integers(20, 400)))].tobytes()
                    for _ in range(int(rng.integers(1, 30)))]
        arrays = {"snippets": np.empty(len(snippets), object)}
        arrays["snippets"][:] = snippets
        return f"role{i:04d}", arrays

    write_sqlite(path, (role(i) for i in range(num_clients)), overwrite=True)
    version = f"shakespeare-v1/seq{shakespeare.DEFAULT_SEQUENCE_LENGTH}"

    def prep(cid, examples):
        return shakespeare.preprocess_client(examples["snippets"])

    times = []
    for _ in range(2):
        base = SQLiteFederatedData(path, index_cache=cache)
        t0 = time.perf_counter()
        sizes = PreprocessedFederatedData(base, prep, False, sizes_version=version).client_sizes
        times.append(time.perf_counter() - t0)
        base.close()
    path.unlink()
    for p in cache.iterdir():
        p.unlink()
    print(f"shakespeare-like, {num_clients} clients: sizes counted {times[0]:.3f} s, "
          f"cached {times[1] * 1e3:.2f} ms", flush=True)
    return {"clients": num_clients, "examples": int(sizes.sum()), "version": version,
            "count_seconds": times[0], "cached_seconds": times[1]}


def main(argv: list[str] | None = None) -> None:
    """Runs the measurements and writes `benchmarks/results/open_cost.json`."""
    parser = argparse.ArgumentParser(
        description="What opening a FedJAX SQLite file costs, with and without the index cache.")
    parser.add_argument("--clients", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="later opens per file")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the files (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "open_cost.json")
    args = parser.parse_args(argv)
    if not Path("/proc/self/io").exists():
        raise SystemExit("open_cost needs Linux (/proc/self/io)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        rows = [measure_open(n, folder, args.repeats) for n in args.clients]
        shakes = measure_shakespeare(folder)
    result = {
        "benchmark": "open_cost", "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "machine": platform.machine(),
        "cpus": os.cpu_count(), "opens": rows, "shakespeare_sizes": shakes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
