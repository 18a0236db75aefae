"""bastion.verify: network extraction, bounds, SMT encoding, DLV search, specs."""

from .bounds import Bounds, compute_bounds
from .decide import decide_file, onnx_replay
from .dlv import verify_dlv
from .extract import UnsupportedLayerError, check_network, extract, load_network
from .instances import Instance, read_instances
from .network import Network
from .onnx_graph import read_onnx
from .outcome import Answer, Outcome, Status
from .region import verify_region
from .spec import Halfspaces, Property, robustness_property
from .verdict import SAFE, UNKNOWN, UNSAFE, Verdict
from .verifier import verify
from .vnnlib import (
    VnnlibError,
    parse_vnnlib,
    read_vnnlib,
    write_counterexample,
    write_vnnlib,
)

__all__ = [
    "Answer",
    "Outcome",
    "Status",
    "SAFE",
    "UNKNOWN",
    "UNSAFE",
    "Bounds",
    "Halfspaces",
    "Network",
    "Property",
    "Verdict",
    "compute_bounds",
    "decide_file",
    "onnx_replay",
    "robustness_property",
    "verify",
    "verify_region",
    "verify_dlv",
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
