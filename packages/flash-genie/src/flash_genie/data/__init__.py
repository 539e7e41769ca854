"""Real protein structures as Cα traces: readers, dataset build, the built-in set, batching.

::

    report = build_dataset("pdb_folder/", "my_set", min_length=50, max_length=512)
    ds = Dataset.open("my_set")            # or builtin_dataset()
    coords, name, sequence = ds[0]         # [L, 3] float32, Å
    sampler = LengthBucketSampler(ds.lengths, batch_size=8, seed=0)

The dataset's on-disk format is described in :mod:`flash_genie.data.dataset`.
"""

from flash_genie.data.batching import LengthBucketSampler, collate, padding_fraction, random_crop
from flash_genie.data.build import SOURCE_KINDS, build_dataset, detect_source
from flash_genie.data.chains import Chain, DatasetError, StructureError
from flash_genie.data.curriculum import LengthCurriculum
from flash_genie.data.dataset import Dataset, builtin_dataset
from flash_genie.data.filters import BuildReport, split_at_gaps
from flash_genie.data.readers import (
    genie_layout_files,
    read_genie_coords,
    read_genie_layout,
    read_npz_chains,
    read_structure,
)
from flash_genie.data.structure_db import read_structure_db
from flash_genie.data.writers import write_ca_pdb, write_genie_coords, write_structure

__all__ = [
    "SOURCE_KINDS",
    "BuildReport",
    "Chain",
    "Dataset",
    "DatasetError",
    "LengthBucketSampler",
    "LengthCurriculum",
    "StructureError",
    "build_dataset",
    "builtin_dataset",
    "collate",
    "detect_source",
    "genie_layout_files",
    "padding_fraction",
    "random_crop",
    "read_genie_coords",
    "read_genie_layout",
    "read_npz_chains",
    "read_structure",
    "read_structure_db",
    "split_at_gaps",
    "write_ca_pdb",
    "write_genie_coords",
    "write_structure",
]
