"""The shakespeare task's preprocessed client sizes come from the index cache on a second load."""

import numpy as np

from fedjax_api import tasks
from fedjax_api.datasets import catalog
from fedjax_core.data import shakespeare
from fedjax_core.data.sqlite import write_sqlite


def test_second_load_of_shakespeare_does_not_preprocess_for_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path))
    monkeypatch.delenv("FEDJAX_INDEX_CACHE", raising=False)  # the default folder, in tmp_path
    for split in ("train", "test"):
        path = catalog.local_paths("shakespeare")[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_sqlite(path, [
            ("A", {"snippets": np.array([b"x" * 100, b"y" * 70], object)}),  # 174 labels: 3 rows
            ("B", {"snippets": np.array([b"To be"], object)})])               # 7 labels: 1 row
    calls = [0]
    real = shakespeare.preprocess_client

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(shakespeare, "preprocess_client", counted)
    def load() -> int:
        """Loads the task and reads both splits' sizes; returns the preprocess calls made."""
        before = calls[0]
        task = tasks.get("shakespeare")
        assert task.train.data.client_sizes.tolist() == [3, 1]
        assert task.test.data.client_sizes.tolist() == [3, 1]
        return calls[0] - before

    first = load()
    assert first >= 4  # every client of both splits preprocessed to count
    assert load() == first - 4  # the sizes read from the cache
    assert len(list((tmp_path / "index").iterdir())) == 4  # two indexes, two size entries
