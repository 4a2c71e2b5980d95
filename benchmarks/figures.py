"""The figures at the top of docs/index.md, drawn from the benchmark results JSON.

- `docs/images/femnist_accuracy.png`: FedAvg test accuracy by round on the FEMNIST LEAF
  sample, fedjax-sim against FedJAX 0.0.17 (`benchmarks/femnist_accuracy.py`, from
  `benchmarks/results/femnist_accuracy.json`).
- `docs/images/bench_speed.png`: the side-by-side table of `fedjax bench`
  (`benchmarks/results/summary.json`) as bars: seconds per round of fedjax-sim, of the
  FedJAX-style sequential loop on the same model, and of FedJAX 0.0.17 itself where it was
  run, with the speed-ups.

`make figures` runs this; `make figures RERUN=1` reruns the experiments first.

Example:
  python -m benchmarks.figures
"""

import argparse
import json
from pathlib import Path

from benchmarks import femnist_accuracy

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "benchmarks" / "results" / "summary.json"
SPEED_FIGURE = ROOT / "docs" / "images" / "bench_speed.png"


def speed_rows(summary: dict) -> list[dict]:
    """`[{scenario, ours_s, baseline_s, fedjax_s, extrapolated}]` of the rows that ran."""
    rows = []
    for name in summary.get("scenarios_run", list(summary["rows"])):
        r = summary["rows"].get(name) or {}
        if r.get("error") or r.get("ours_s") is None:
            continue
        rows.append({"scenario": name, "ours_s": r["ours_s"], "baseline_s": r.get("baseline_s"),
                     "fedjax_s": r.get("fedjax_s"),
                     "extrapolated": bool(r.get("baseline_extrapolated"))})
    return rows


def plot_speed(summary: dict, path: Path = SPEED_FIGURE) -> None:
    """Horizontal bars of s/round per scenario (log scale), each labelled with its time and,
    for the two comparisons, `ratio x` = their time / fedjax-sim's (above 1: ours faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speed_rows(summary)
    sides = [("ours_s", "fedjax-sim", "tab:blue"),
             ("baseline_s", "FedJAX's loop, same model (benchmarks/baseline.py)", "tab:gray"),
             ("fedjax_s", "FedJAX 0.0.17 itself", "tab:orange")]
    height = 0.27
    fig, ax = plt.subplots(figsize=(7.2, 0.62 * len(rows) + 1.7), dpi=120)
    for j, (key, label, color) in enumerate(sides):
        ys, xs = [], []
        for i, r in enumerate(rows):
            if r[key] is not None:
                ys.append(i + (j - 1) * height)
                xs.append(r[key])
        ax.barh(ys, xs, height=height, color=color, label=label)
        for y, x, r in zip(ys, xs, [r for r in rows if r[key] is not None]):
            text = f"{x:.2f} s"
            if key != "ours_s":
                star = "*" if key == "baseline_s" and r["extrapolated"] else ""
                text += f"  ({x / r['ours_s']:.2f}x{star})"
            ax.text(x * 1.04, y, text, va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["scenario"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(max(r[k] for k, _, _ in sides if r[k] is not None)
                          for r in rows) * 6)
    ax.set_xlabel("seconds per round (evaluation: per full evaluation), median; log scale")
    m = summary.get("machine", {})
    ax.set_title(f"fedjax bench: {m.get('cpu_model', '?')}, {m.get('cpus_usable', '?')} cores, "
                 f"jax {m.get('jax', '?')}; (Nx) = time / fedjax-sim's", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--summary", default=str(SUMMARY))
    ap.add_argument("--accuracy", default=str(femnist_accuracy.RESULTS))
    args = ap.parse_args(argv)
    plot_speed(json.loads(Path(args.summary).read_text()))
    print(f"wrote {SPEED_FIGURE}")
    femnist_accuracy.plot(json.loads(Path(args.accuracy).read_text()))
    print(f"wrote {femnist_accuracy.FIGURE}")


if __name__ == "__main__":
    main()
