"""The data layer: normalised examples, readers, filters, deterministic shuffle/shard."""

from .example import (
    DataFormatError,
    Example,
    normalize_numeric_answer,
    parse_calculator_steps,
    strip_calculator_annotations,
)
from .filters import FilterReport, apply_filters
from .readers import (
    FORMATS,
    ReadResult,
    read_gsm8k,
    read_gsm8k_aug,
    read_hf,
    read_prontoqa,
    read_prosqa,
    read_source,
)
from .sampling import epoch_shard, shard, shuffled_indices

__all__ = [
    "FORMATS",
    "DataFormatError",
    "Example",
    "FilterReport",
    "ReadResult",
    "apply_filters",
    "epoch_shard",
    "normalize_numeric_answer",
    "parse_calculator_steps",
    "read_gsm8k",
    "read_gsm8k_aug",
    "read_hf",
    "read_prontoqa",
    "read_prosqa",
    "read_source",
    "shard",
    "shuffled_indices",
    "strip_calculator_annotations",
]
