"""The label distribution of federated data, per client, as stacked bars (`fedjax data
plot-partition`), the figure flwr-datasets' `plot_label_distributions` draws for a partitioner,
here for any `FederatedData` (SQLite, LEAF, Hugging Face).

Needs matplotlib (the `plot` extra).
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_api.errors import ConfigError
from fedjax_core import atomic
from fedjax_core.data import FederatedData


class LabelCounts(NamedTuple):
    """Examples of each label on each client shown.

    Attributes:
      client_ids: the clients shown (the first `max_clients`, in the data's order).
      labels: the distinct labels, sorted.
      counts: `Int[ndarray, "clients labels"]`, examples of label `j` on client `i`.
    """

    client_ids: tuple[str, ...]
    labels: np.ndarray
    counts: np.ndarray


def _client_labels(data: FederatedData, index: int, label: str) -> np.ndarray:
    read = getattr(data, "get_client_feature", None)  # reads one column where it can
    try:
        values = read(index, label) if read is not None else data.get_client(index)[label]
    except KeyError:
        names = sorted(data.get_client(index))
        raise ConfigError(f"no feature {label!r} (the clients have {', '.join(names)}); give "
                          "the label feature with --label") from None
    values = np.asarray(values)
    if values.ndim != 1:
        raise ConfigError(f"feature {label!r} has shape {values.shape} per client, not one label "
                          "per example; give the label feature with --label")
    return values


def label_counts(data: FederatedData, label: str = "y", max_clients: int | None = 30) -> LabelCounts:
    """Counts each label on each of the first `max_clients` clients (None: all).

    Only those clients are read (and, for Hugging Face data, only their label column).

    Example:
      >>> label_counts(InMemoryFederatedData({"a": {"y": np.array([0, 1, 1])}})).counts
      array([[1, 2]])
    """
    n = len(data.client_ids)
    if max_clients is not None and max_clients < 1:
        raise ConfigError(f"--max-clients must be >= 1, got {max_clients}")
    shown = n if max_clients is None else min(n, max_clients)
    per_client = [_client_labels(data, i, label) for i in range(shown)]
    nonempty = [v for v in per_client if len(v)]
    if not nonempty:
        raise ConfigError("the clients shown hold no examples")
    labels = np.unique(np.concatenate(nonempty))
    counts = np.zeros((shown, len(labels)), np.int64)
    for i, values in enumerate(per_client):
        if len(values):
            counts[i] = np.bincount(np.searchsorted(labels, values), minlength=len(labels))
    return LabelCounts(tuple(str(c) for c in data.client_ids[:shown]), labels, counts)


def _label_text(value, names: list[str] | None) -> str:
    if names is not None and isinstance(value, (int, np.integer)) and 0 <= value < len(names):
        return names[int(value)]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def plot_label_distribution(data: FederatedData, out: str | Path, *, label: str = "y",
                            max_clients: int | None = 30, percent: bool = False,
                            title: str | None = None) -> LabelCounts:
    """Draws the label distribution per client as stacked bars and writes it to `out`.

    One bar per client (the first `max_clients`), one colour per label, its height the
    client's examples (or, with `percent`, shares summing to 100), as flwr-datasets'
    `plot_label_distributions(partitioner, label_name, plot_type="bar")` draws. The legend
    names the classes of a Hugging Face `ClassLabel` feature (`HFFederatedData.class_names`).

    Args:
      data: any `FederatedData` with a 1-D label feature.
      out: the image file (`.png`, `.pdf`, `.svg`), written atomically.
      label: the label feature.
      max_clients: clients shown (None: all).
      percent: bars of label shares instead of example counts.
      title: the figure's title (default: "Label distribution per client").

    Returns:
      The `LabelCounts` drawn.

    Example:
      >>> plot_label_distribution(SQLiteFederatedData("blobs.sqlite"), "labels.png")
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs the plot extra: pip install 'fedjax-sim[plot]'"
                          ) from None
    out = Path(out)
    counts = label_counts(data, label, max_clients)
    fig = Figure(figsize=(min(max(4.0, 0.22 * len(counts.client_ids) + 2.5), 16.0), 4.0),
                 dpi=150, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fmt = out.suffix[1:].lower()
    if fmt not in canvas.get_supported_filetypes():
        raise ConfigError(f"cannot tell the image format of {str(out)!r}: end the file name "
                          "in .png, .pdf or .svg")
    ax = fig.add_subplot()
    heights = counts.counts.astype(np.float64)
    if percent:
        heights = 100 * heights / np.maximum(heights.sum(axis=1, keepdims=True), 1)
    names = getattr(data, "class_names", None)  # Hugging Face ClassLabel names, if any
    names = names(label) if names is not None else None
    k = len(counts.labels)
    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "viridis"]
    colors = [cmap(j if k <= 20 else j / max(k - 1, 1)) for j in range(k)]
    x = np.arange(len(counts.client_ids))
    bottom = np.zeros(len(x))
    for j in range(k):
        ax.bar(x, heights[:, j], bottom=bottom, width=0.85, color=colors[j],
               label=_label_text(counts.labels[j], names))
        bottom += heights[:, j]
    step = max(1, len(x) // 30)
    ax.set_xticks(x[::step], [counts.client_ids[i] for i in x[::step]], rotation=90,
                  fontsize=7)
    ax.set_xlabel("client")
    ax.set_ylabel("share of examples (%)" if percent else "examples")
    ax.set_title(title or f"Label distribution per client ({label!r})")
    if k <= 20:
        ax.legend(title=label, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
                  title_fontsize=8, frameon=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replace(out) as f:
            fig.savefig(f, format=fmt)
    except OSError as e:
        raise ConfigError(f"cannot write {str(out)!r} ({e.strerror or e}); choose another "
                          "file") from None
    return counts
