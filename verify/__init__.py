"""bastion.verify: network extraction, bounds, SMT encoding, DLV search, specs."""

from .extract import UnsupportedLayerError, check_network, extract, load_network
from .instances import Instance, read_instances
from .onnx_graph import read_onnx
from .vnnlib import (
    VnnlibError,
    parse_vnnlib,
    read_vnnlib,
    write_counterexample,
    write_vnnlib,
)

__all__ = [
    "Instance",
    "UnsupportedLayerError",
    "VnnlibError",
    "check_network",
    "extract",
    "load_network",
    "parse_vnnlib",
    "read_instances",
    "read_onnx",
    "read_vnnlib",
    "write_counterexample",
    "write_vnnlib",
]
