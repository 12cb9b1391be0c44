"""Training data: records on disk, token sequences, the kind mixture, packing (docs/data.md)."""

from .codes import CodeCache, encode_images, image_key, make_image_codes_fn, tokenize_images, write_code_cache
from .mixture import Mixture
from .packing import Batch, Packer, PackedStream, collate
from .records import KINDS, DataWarning, Manifest, Record, read_records
from .sequences import Sample, SampleBuilder, build_sample

__all__ = [
    "KINDS",
    "Batch",
    "CodeCache",
    "DataWarning",
    "Manifest",
    "Mixture",
    "PackedStream",
    "Packer",
    "Record",
    "Sample",
    "SampleBuilder",
    "build_sample",
    "collate",
    "encode_images",
    "image_key",
    "make_image_codes_fn",
    "read_records",
    "tokenize_images",
    "write_code_cache",
]
