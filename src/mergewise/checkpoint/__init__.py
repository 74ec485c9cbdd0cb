"""All file I/O of mergewise: lazy model reader, streaming sharded writer, staged output folder."""

from mergewise.checkpoint.journal import JOURNAL_FILE, Journal
from mergewise.checkpoint.output import (
    RECORD_FILE,
    TOKENIZER_FILES,
    check_output_location,
    copy_tokenizer,
    staged_folder,
    write_model_config,
)
from mergewise.checkpoint.reader import ModelFolder, TensorInfo
from mergewise.checkpoint.writer import PlannedTensor, StreamingShardWriter, parse_size

__all__ = [
    "JOURNAL_FILE",
    "RECORD_FILE",
    "TOKENIZER_FILES",
    "Journal",
    "ModelFolder",
    "PlannedTensor",
    "StreamingShardWriter",
    "TensorInfo",
    "check_output_location",
    "copy_tokenizer",
    "parse_size",
    "staged_folder",
    "write_model_config",
]
