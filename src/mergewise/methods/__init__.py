"""Merge methods: pure functions of tensor rows, registered by their mergekit names."""

from mergewise.methods.base import BasePolicy, ChunkedTensors, MergeMethod, Parameter, TensorRows
from mergewise.methods.one_tensor import merge_tensors
from mergewise.methods.registry import METHODS, get_method

__all__ = [
    "METHODS",
    "BasePolicy",
    "ChunkedTensors",
    "MergeMethod",
    "Parameter",
    "TensorRows",
    "get_method",
    "merge_tensors",
]
