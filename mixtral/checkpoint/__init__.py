"""Checkpoints on disk: find the files, read them strictly into a model, write them atomically.

What each layout means lives in `mixtral/formats.py` (layouts as data); this package deals with
files. Reading is strict: an unknown or missing tensor, a shape or dtype that contradicts the
config, a truncated or corrupt file or a missing shard raises `CheckpointError` naming the
file, the tensor and what was expected. Loading builds the model on the meta device and reads
every tensor straight into its final buffer, so the weights are never held twice. The files'
bytes are parsed and bounded in `checkfile.py`, the config checked against them in
`crosscheck.py` before any table sized by it is built, and the weights' size against the free
memory in `memory.py`.

  files.py    which files make a checkpoint (an index and its shards, or the weights found
              in a folder), and one tensor's bytes read out of them
  info.py     `inspect`: the config read and every tensor checked against it, a CheckpointInfo
  reading.py  tensors into models: `reader`, `read_state_dict`, `load` (float or quantized)
  writing.py  `save`, `quantize_checkpoint`, `write_checkpoint`, `convert`: every file atomic
"""

from mixtral.checkfile import CheckpointError
from mixtral.checkpoint.info import CheckpointInfo, inspect
from mixtral.checkpoint.reading import load, quantized_reader, read_state_dict, reader
from mixtral.checkpoint.writing import convert, quantize_checkpoint, save, write_checkpoint

__all__ = ["CheckpointError", "CheckpointInfo", "convert", "inspect", "load", "quantize_checkpoint",
           "quantized_reader", "read_state_dict", "reader", "save", "write_checkpoint"]
