"""Stack-Overflow-like federated files at population scale, in FedJAX's SQLite format.

Writes, into one folder, FedJAX's Stack Overflow file names

    stackoverflow_train.sqlite   stackoverflow_test.sqlite   stackoverflow.word_count

so that `fedjax run stackoverflow --data DIR` reads them exactly as it reads the published
files (and FedJAX's own `SQLiteFederatedData.new` would: same table, same blob encoding).

Population (what the real dataset has, from TFF's `tff.simulation.datasets.stackoverflow.load_data`
documentation, which FedJAX's files are converted from; FedML's data README gives the same):

    train  342,477 clients  135,818,730 examples   mean 396.6 posts per client
    test   204,088 clients   16,586,035 examples   mean  81.3 posts per client

An example is one sentence of a post (TFF: "the bodies were parsed into sentences"). Neither
TFF nor FedJAX publishes the spread of client sizes, so it is chosen here: client sizes are
log-normal, `n = max(1, round(exp(N(mu, sigma))))` with `sigma = 1.0` and `mu = ln(mean) -
sigma^2 / 2` (so the mean is the real one; median = 0.61 x mean: 240 train, 49 test posts; the
largest of 342k train clients about 27,000; heavy-tailed like the real users' activity). A
population of `C` train clients has `round(C x 204,088 / 342,477)` test clients, the real ratio.
The 1M-client population is for a small model: few posts per client (mean 16 train, 4 test,
`sigma = 0.75`).

Content, chosen for realistic sizes rather than realistic language (`SENTENCE_MEAN` words,
log-normal, Zipf(1.07) over `NUM_WORDS` made-up words; the word-count file lists them, most
frequent first, so the default vocabulary of 10,000 words leaves a few % of tokens OOV). Every
post has FedJAX's six features, in TFF's lexicographic order: `creation_date` (bytes, e.g.
`b'2015-03-04 05:06:07.89 UTC'`), `score` (int64), `tags` (bytes, `|`-separated), `title`
(bytes), `tokens` (bytes, space-separated words), `type` (`b'question'` or `b'answer'`, 35%
questions); answers carry an empty title and tags. A train file comes to about 46 bytes per
example (the published `stackoverflow_train.sqlite` is reported at 5,506,732,032 bytes: 40.5).

Speed (2 cores): a client is not encoded one by one. Sizes are rounded to a grid (exact up to
64 posts, then steps of 2%), and for each size on the grid `VARIANTS` blobs are encoded once
(slices of a pool of posts) and reused by every client of that size; rows go into SQLite
straight from those blobs, in one transaction, as FedJAX's builder writes them. So encoding
costs about `VARIANTS x sum(grid sizes)` posts whatever the population, and writing is
bound by the disk. Files are built under a temporary name and renamed when complete.

Example:
  $ python -m benchmarks.stackoverflow_like --clients 10k --out /tmp/so-10k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from fedjax_core import atomic
from fedjax_core.data import stackoverflow as so
from fedjax_core.data.sqlite import CREATE_TABLE, encode_client

REAL_TRAIN_CLIENTS = 342_477
REAL_TRAIN_EXAMPLES = 135_818_730
REAL_TEST_CLIENTS = 204_088
REAL_TEST_EXAMPLES = 16_586_035
"""TFF's `stackoverflow.load_data` documentation (FedJAX's files are converted from TFF's)."""
TRAIN_MEAN = REAL_TRAIN_EXAMPLES / REAL_TRAIN_CLIENTS  # 396.58
TEST_MEAN = REAL_TEST_EXAMPLES / REAL_TEST_CLIENTS  # 81.27
SIGMA = 1.0
"""Log-normal spread of client sizes (an assumption: no published figure)."""
NUM_WORDS = 30_000
ZIPF = 1.07
SENTENCE_MEAN = 15.0
"""Mean words per example (FedJAX's task: 13.3 tokens per sequence after cutting to 20)."""
EXACT_UP_TO = 64
GRID_STEP = 1.02
VARIANTS = 4
POOL_POSTS = 1 << 18
FILES = (so.sqlite_file_name("train"), so.sqlite_file_name("test"), so.WORD_COUNT_FILE)
"""What a folder for `fedjax run stackoverflow --data DIR` holds."""


class Profile(NamedTuple):
    """A population: clients and their mean size, per split."""

    train_clients: int
    test_clients: int
    train_mean: float = TRAIN_MEAN
    test_mean: float = TEST_MEAN
    sigma: float = SIGMA


def profile(clients: int, small: bool | None = None) -> Profile:
    """The population of `clients` train clients: real means and test ratio, or (small, the
    default from 1M clients on) 16 train / 4 test posts per client.

    Example:
      >>> profile(10_000).test_clients
      5959
    """
    test = round(clients * REAL_TEST_CLIENTS / REAL_TRAIN_CLIENTS)
    if small is None:
        small = clients >= 1_000_000
    if small:
        return Profile(clients, test, 16.0, 4.0, 0.75)
    return Profile(clients, test)


def parse_count(text: str) -> int:
    """`'10k'` -> 10000, `'342k'` -> 342477 (the real population), `'1m'` -> 1000000.

    Example:
      >>> parse_count("100k"), parse_count("342k"), parse_count("2500")
      (100000, 342477, 2500)
    """
    t = text.strip().lower().replace("_", "").replace(",", "")
    if t in ("342k", "342477"):
        return REAL_TRAIN_CLIENTS
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"client count {text!r}: give a number like 10k, 342k or 1m") from None
    if value < 1 or value != int(value):
        raise ValueError(f"client count {text!r} must be a positive whole number")
    return int(value)


def size_grid(limit: int) -> np.ndarray:
    """Sizes a client may have: `1 .. EXACT_UP_TO`, then `EXACT_UP_TO x GRID_STEP^k` rounded,
    up to at least `limit` (int64, increasing)."""
    grid = list(range(1, EXACT_UP_TO + 1))
    k = 1
    while grid[-1] < limit:
        v = int(round(EXACT_UP_TO * GRID_STEP ** k))
        if v > grid[-1]:
            grid.append(v)
        k += 1
    return np.array(grid, np.int64)


def client_sizes(num_clients: int, mean: float, sigma: float = SIGMA, seed: int = 0
                 ) -> np.ndarray:
    """Log-normal client sizes of mean `mean`, rounded to `size_grid`, at least 1.

    `n_i = grid value nearest (in log) to exp(N(mu, sigma))`, `mu = ln(mean) - sigma^2 / 2`.

    Args:
      num_clients: `C`.
      mean: the log-normal's mean (posts per client).
      sigma: its log-space standard deviation.
      seed: numpy `default_rng` seed.

    Returns:
      `Int[ndarray, "C"]`.

    Example:
      >>> client_sizes(100_000, 396.6).mean()   # about 397
    """
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma ** 2 / 2
    raw = np.maximum(rng.lognormal(mu, sigma, num_clients), 1.0)
    grid = size_grid(int(raw.max()) + 1)
    log_grid = np.log(grid)
    j = np.clip(np.searchsorted(log_grid, np.log(raw)), 1, len(grid) - 1)
    lower = np.log(raw) - log_grid[j - 1] < log_grid[j] - np.log(raw)
    return grid[np.where(lower, j - 1, j)]


def _syllable_words(n: int) -> list[str]:
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 90
    words = []
    for i in range(n):
        parts, j = [], i
        while True:
            parts.append(syllables[j % len(syllables)])
            j //= len(syllables)
            if not j:
                break
        words.append("".join(parts))
    return words


def vocabulary(num_words: int = NUM_WORDS, zipf: float = ZIPF
               ) -> tuple[list[str], np.ndarray]:
    """`(words, p)`: made-up words, most frequent first, and their Zipf probabilities."""
    words = _syllable_words(num_words)
    p = 1.0 / np.arange(1, num_words + 1) ** zipf
    return words, p / p.sum()


def write_word_counts(path: str | os.PathLike, words: list[str], p: np.ndarray,
                      total: int = 1_000_000_000) -> None:
    """FedJAX's word-count file: `word count` lines, most frequent first."""
    counts = np.maximum(np.rint(p * total).astype(np.int64), 1)
    atomic.write_text(path, "".join(f"{w} {c}\n" for w, c in zip(words, counts)))


class PostPool(NamedTuple):
    """`POOL_POSTS` posts, feature by feature (object arrays of bytes; `score` int64)."""

    creation_date: np.ndarray
    score: np.ndarray
    tags: np.ndarray
    title: np.ndarray
    tokens: np.ndarray
    type: np.ndarray


def post_pool(words: list[str], p: np.ndarray, size: int = POOL_POSTS, seed: int = 1
              ) -> PostPool:
    """Posts drawn once, sliced into every client's blob."""
    rng = np.random.default_rng(seed)
    bwords = np.array([w.encode() for w in words], dtype=object)
    sigma = 0.6
    lengths = np.clip(np.rint(rng.lognormal(math.log(SENTENCE_MEAN) - sigma ** 2 / 2, sigma,
                                            size)), 1, 200).astype(np.int64)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
    flat = bwords[ids]
    cuts = np.cumsum(lengths)[:-1]
    tokens = np.array([b" ".join(s) for s in np.split(flat, cuts)], dtype=object)
    title_len = rng.integers(3, 11, size)
    title_ids = rng.choice(len(words), size=int(title_len.sum()), p=p)
    titles = np.array([b" ".join(s) for s in np.split(bwords[title_ids],
                                                      np.cumsum(title_len)[:-1])], dtype=object)
    tag_names = np.array([f"tag{i}".encode() for i in range(500)], dtype=object)
    tag_len = rng.integers(1, 5, size)
    tag_ids = rng.zipf(1.5, int(tag_len.sum())) % 500
    tags = np.array([b"|".join(s) for s in np.split(tag_names[tag_ids],
                                                    np.cumsum(tag_len)[:-1])], dtype=object)
    seconds = rng.integers(1_217_548_800, 1_514_764_800, size)  # 2008-08 .. 2017-12 (train)
    dates = np.array([time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(s))).encode()
                      + b".%02d UTC" % int(c) for s, c in zip(seconds, rng.integers(0, 100, size))],
                     dtype=object)
    score = rng.geometric(0.3, size).astype(np.int64) - 1
    question = rng.random(size) < 0.35
    kinds = np.array([b"answer", b"question"], dtype=object)[question * 1]
    titles[~question] = b""
    tags[~question] = b""
    return PostPool(dates, score, tags, titles, tokens, kinds)


def _blob(pool: PostPool, start: int, n: int) -> bytes:
    idx = (start + np.arange(n)) % len(pool.tokens)
    return encode_client({name: getattr(pool, name)[idx] for name in PostPool._fields})


def _rows(sizes: np.ndarray, pool: PostPool, seed: int, variants: int, id_offset: int
          ) -> Iterator[tuple[bytes, bytes, int]]:
    rng = np.random.default_rng(seed)
    values, inverse, counts = np.unique(sizes, return_inverse=True, return_counts=True)
    blobs = [[_blob(pool, int(rng.integers(len(pool.tokens))), int(v))
              for _ in range(min(variants, int(c)))] for v, c in zip(values, counts)]
    pick = rng.integers(0, 1 << 30, len(sizes))
    for i, (j, r) in enumerate(zip(inverse, pick)):
        choices = blobs[j]
        yield b"%08d" % (id_offset + i), choices[r % len(choices)], int(values[j])


def write_split(path: str | os.PathLike, sizes: np.ndarray, pool: PostPool, *, seed: int = 2,
                variants: int = VARIANTS, id_offset: int = 0) -> int:
    """Writes one split: client `i` has id `b'%08d' % (id_offset + i)` and `sizes[i]` posts.

    Rows go in one transaction (FedJAX's builder's SQL and table), under a temporary name
    renamed over `path` when complete.

    Returns:
      The file's size in bytes.
    """
    path = os.fspath(path)
    tmp = os.fspath(atomic.temp_path(path))
    try:
        atomic.create(tmp).close()
        connection = sqlite3.connect(tmp)
        try:
            connection.execute(CREATE_TABLE + ";")
            connection.commit()
            connection.executemany("INSERT INTO federated_data VALUES (?, ?, ?);",
                                   _rows(sizes, pool, seed, variants, id_offset))
            connection.commit()
        finally:
            connection.close()
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp + "-journal"):
            if os.path.exists(p):
                os.unlink(p)
        raise
    return os.path.getsize(path)


def generate(out_dir: str | os.PathLike, population: Profile, *, seed: int = 0,
             variants: int = VARIANTS, pool_posts: int = POOL_POSTS, log=None) -> dict:
    """Writes the three files of `population` into `out_dir` (created), and `manifest.json`.

    Returns:
      The manifest: the profile, seconds per step, clients, examples and bytes of each file.

    Example:
      >>> generate("/tmp/so-10k", profile(10_000))["train"]["examples"]   # about 3.97M
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda message: None)
    info: dict = {"profile": population._asdict(), "seed": seed, "variants": variants,
                  "pool_posts": pool_posts, "seconds": {}}
    t = time.perf_counter()
    words, p = vocabulary()
    write_word_counts(out / so.WORD_COUNT_FILE, words, p)
    pool = post_pool(words, p, pool_posts, seed=seed + 1)
    info["seconds"]["pool"] = time.perf_counter() - t
    say(f"pool of {pool_posts} posts: {info['seconds']['pool']:.1f} s")
    for split, clients, mean, offset in (
            ("train", population.train_clients, population.train_mean, 0),
            ("test", population.test_clients, population.test_mean, 50_000_000)):
        t = time.perf_counter()
        sizes = client_sizes(clients, mean, population.sigma, seed=seed + (0 if split == "train"
                                                                            else 100))
        path = out / so.sqlite_file_name(split)
        size = write_split(path, sizes, pool, seed=seed + 2, variants=variants, id_offset=offset)
        seconds = time.perf_counter() - t
        info[split] = {"file": path.name, "clients": int(clients), "examples": int(sizes.sum()),
                       "mean": float(sizes.mean()), "max": int(sizes.max()),
                       "distinct_sizes": int(len(np.unique(sizes))), "bytes": size,
                       "bytes_per_example": size / max(1, int(sizes.sum()))}
        info["seconds"][split] = seconds
        say(f"{split}: {clients} clients, {int(sizes.sum())} examples, {size / 2**20:.0f} MiB "
            f"in {seconds:.1f} s")
    atomic.write_text(out / "manifest.json", json.dumps(info, indent=1) + "\n")
    return info


def is_complete(out_dir: str | os.PathLike, population: Profile) -> bool:
    """Whether `out_dir` holds the three files generated for `population` (its manifest)."""
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.is_file() or not all((Path(out_dir) / f).is_file() for f in FILES):
        return False
    try:
        return json.loads(manifest.read_text())["profile"] == population._asdict()
    except (ValueError, KeyError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", default="10k", help="train clients: 10k, 100k, 342k, 1m")
    parser.add_argument("--out", required=True, help="folder to write the three files into")
    parser.add_argument("--small", action="store_true", help="few posts per client (default "
                        "from 1m on)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clients = parse_count(args.clients)
    population = profile(clients, True if args.small else None)
    info = generate(args.out, population, seed=args.seed, log=lambda m: print(m, flush=True))
    print(json.dumps({k: info[k] for k in ("train", "test", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
