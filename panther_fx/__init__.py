"""panther_fx: randomized numerical linear algebra for PyTorch, delivered through ``torch.compile``.

    compiled = torch.compile(model, backend="panther", options={"policy": "panther.toml"})

Importing this package registers the ``torch.ops.panther`` ops; the backend itself is found through the
``torch_dynamo_backends`` entry point, so ``import panther_fx`` is not needed to compile.
"""

from . import linalg, ops
from .backend import compile, last_report, panther_backend
from .calibration import calibrate
from .convert import convert, load, save
from .distill import distill
from .ops import kernel_info
from .policy import Decision, Policy, PolicyError, load_policy
from .report import LayerReport, Report

__version__ = "0.1.0"

__all__ = [
    "Decision", "LayerReport", "Policy", "PolicyError", "Report", "calibrate", "compile", "kernel_info", "last_report",
    "linalg", "load_policy", "ops", "panther_backend",
    "convert", "distill", "load", "save",
    "tune",
]


def __getattr__(name: str):
    # the tuner imports optuna (seconds): load it on first use of panther_fx.tune
    if name == "tune":
        from .tuner import tune

        return tune
    raise AttributeError(f"module 'panther_fx' has no attribute {name!r}")
