"""Labels checked against the model's classes, so that a label of -1 (or 99 for 62 classes)
is one line naming the client and the value, not a run that trains on garbage or ends in NaN.

What is checked when (`tasks.get` sets it up):
- data held in memory (`InMemoryFederatedData`): every client, when the task is built
  (one vectorised comparison per client over arrays already in memory);
- data read lazily (SQLite and other files): each cohort's labels, when it is packed for
  training (one vectorised comparison over the packed arrays; the clients are read then
  anyway), and every label at once when the population is put on the device
  (`device_data`). A lazily read test set is not checked (evaluation reads it later).

Only integer labels under the key "y" are checked; the classes are the last axis of the
model's output (`num_classes`).
"""

import jax
import numpy as np

from fedjax_api.errors import ConfigError
from fedjax_core.data import Cohort, FederatedData
from fedjax_core.models.base import Model

LABEL = "y"
"""The feature holding the labels."""


def num_classes(model: Model, data: FederatedData) -> int | None:
    """The size of the last axis of `model`'s output for one example of `data` (found with
    `jax.eval_shape`: nothing is computed), or None when `data` has no integer labels.

    Example:
      >>> num_classes(emnist_cnn(num_classes=62), train)
      62
    """
    sizes = np.asarray(data.client_sizes)
    if sizes.size == 0 or sizes.max() == 0:
        return None
    example = {k: np.asarray(v)[:1] for k, v in data.get_client(int(np.argmax(sizes))).items()}
    y = example.get(LABEL)
    if y is None or not np.issubdtype(y.dtype, np.integer):
        return None
    try:
        params = jax.eval_shape(model.init, jax.random.key(0))
        out = jax.eval_shape(lambda p: model.apply(p, example), params)
    except Exception:  # noqa: BLE001 - a model that needs more than one example: unchecked
        return None
    shape = getattr(out, "shape", ())
    return int(shape[-1]) if len(shape) >= 1 and shape[-1] > 1 else None


def _first_bad(y: np.ndarray, classes: int, mask: np.ndarray | None = None):
    bad = (y < 0) | (y >= classes)
    if mask is not None:
        bad &= mask.reshape(mask.shape + (1,) * (y.ndim - mask.ndim))
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return where, int(y[where])


def _error(client_id, value: int, classes: int, split: str) -> ConfigError:
    return ConfigError(f"{split} client {client_id!r} has label {value}, outside the model's "
                       f"{classes} classes (0 .. {classes - 1}); fix or drop that client's "
                       "data, or use a model with more classes")


def check_clients(data: FederatedData, classes: int, split: str = "training") -> None:
    """Raises a `ConfigError` naming the first client of `data` with a label outside
    `0 .. classes - 1` (reads every client: for data held in memory)."""
    for i, cid in enumerate(data.client_ids):
        y = data.get_client(i).get(LABEL)
        if y is not None:
            bad = _first_bad(np.asarray(y), classes)
            if bad is not None:
                raise _error(cid, bad[1], classes, split)


def check_cohort(cohort: Cohort, data: FederatedData, classes: int) -> None:
    """Raises a `ConfigError` naming the first client of a packed `cohort` (dense batches)
    with a real example whose label is outside `0 .. classes - 1`."""
    if not isinstance(cohort.batches, dict) or LABEL not in cohort.batches:
        return
    bad = _first_bad(np.asarray(cohort.batches[LABEL]), classes, np.asarray(cohort.mask))
    if bad is not None:
        index = int(np.asarray(cohort.client_index)[bad[0][0]])
        raise _error(data.client_ids[index], bad[1], classes, "training")


def check_rows(y, offsets: np.ndarray, data: FederatedData, classes: int) -> None:
    """Raises a `ConfigError` for a label outside `0 .. classes - 1` among the rows `y` of
    every example concatenated (`fedjax_core.data.device.DeviceExamples`: row 0 is the zero
    row, client i starts at `offsets[i]`); the test runs where `y` lives."""
    import jax.numpy as jnp

    rows = y[1:]
    if not bool(jnp.any((rows < 0) | (rows >= classes))):
        return
    bad = _first_bad(np.asarray(y), classes)
    assert bad is not None
    row = bad[0][0]
    client = int(np.searchsorted(np.asarray(offsets), row, side="right")) - 1
    raise _error(data.client_ids[client], bad[1], classes, "training")
