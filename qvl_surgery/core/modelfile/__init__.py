"""Model files whose weights stay on disk.

A :class:`Model` is the weightless graph plus a source for every external weight (``model``);
:func:`load_model` opens one without reading its weights (``load``). Weight bytes are only touched
while writing, streamed tensor by tensor (``streaming``) into ``name.onnx.data`` (``external``) or
one self-contained ``name.onnx`` (``single_file``); :func:`save_model` checks and publishes the
result atomically (``save``); integrity hashes come from ``hashing``. Peak memory is about the
largest tensor.

Rules (DESIGN.md, principles 1-4): never serialize a > 2 GB proto; write into a temporary sibling
folder, check with ``onnx.checker`` by path, rename into place, never overwrite an input; treat
external-data locations as untrusted. All code that moves weight bytes lives in this package.
"""
import os  # tests patch os.copy_file_range as modelfile.os

from qvl_surgery.core.modelfile.external import _DataLayout, write_model_files, write_parts, write_shared
from qvl_surgery.core.modelfile.hashing import HASH, HASH_ALGORITHMS, StreamDigest, hash_file, sha256_file
from qvl_surgery.core.modelfile.load import load_model
from qvl_surgery.core.modelfile.model import (FOUR_BIT, PROTOBUF_LIMIT, Computed, FileRange, Model, TensorSource,
                                              dtype_of, pack_nibbles, read_initializer, tensor_nbytes,
                                              unpack_nibbles)
from qvl_surgery.core.modelfile.save import check_model_path, save_model, sibling_model
from qvl_surgery.core.modelfile.single_file import single_file_size, write_single_file
from qvl_surgery.core.modelfile.streaming import _tensor_bytes

__all__ = [
    "Model", "FileRange", "Computed", "TensorSource", "PROTOBUF_LIMIT", "FOUR_BIT", "dtype_of", "tensor_nbytes",
    "pack_nibbles", "unpack_nibbles", "read_initializer", "load_model", "save_model", "check_model_path",
    "sibling_model", "write_model_files", "write_parts", "write_shared", "write_single_file", "single_file_size", "HASH",
    "HASH_ALGORITHMS", "StreamDigest", "hash_file", "sha256_file",
    "_DataLayout", "_tensor_bytes",   # tests reach these
    "os",
]
