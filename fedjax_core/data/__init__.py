"""Host-side data: federated datasets, file formats, samplers and cohort packing (numpy).

Formats: `sqlite` (FedJAX's files, read and written), `leaf` (LEAF JSON), `tff_sqlite`
(TFF's files, read), `convert` (between them). Datasets' preprocessing: `emnist`,
`shakespeare`, `stackoverflow`, `cifar100`, `plays`; generated data: `synthetic`,
`partition`.
"""

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import (
    AlignedFederatedData,
    ClientArrays,
    FederatedData,
    InMemoryFederatedData,
    PreprocessedFederatedData,
)
from fedjax_core.data.pack import Cohort, pack_clients, pack_cohort, step_bucket
from fedjax_core.data.sampling import uniform_without_replacement
from fedjax_core.data.sqlite import SQLiteFederatedData, write_sqlite

__all__ = ["AlignedFederatedData", "ClientArrays", "Cohort", "DataFormatError", "FederatedData",
           "InMemoryFederatedData", "PreprocessedFederatedData", "SQLiteFederatedData",
           "pack_clients", "pack_cohort", "step_bucket", "uniform_without_replacement",
           "write_sqlite"]
