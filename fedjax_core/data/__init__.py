"""Host-side data: federated datasets, samplers and cohort packing (numpy)."""

from fedjax_core.data.federated_data import (ClientArrays, FederatedData, InMemoryFederatedData,
                                             PreprocessedFederatedData)
from fedjax_core.data.pack import Cohort, pack_clients, pack_cohort, step_bucket
from fedjax_core.data.sampling import uniform_without_replacement

__all__ = ["ClientArrays", "Cohort", "FederatedData", "InMemoryFederatedData", "pack_clients",
           "pack_cohort", "PreprocessedFederatedData", "step_bucket",
           "uniform_without_replacement"]
