"""The autotuner: a joint Optuna search over per-layer methods and ranks that writes policy files.

    result = panther_fx.tune(model, evaluate, example_inputs=(x,), min_quality=0.9)
    result.write("panther.toml")
"""

from .measure import Costs, FactoredLinear, latency_ms, peak_memory_bytes
from .search import OBJECTIVES, TrialRow, TuneError, TuneResult, sensitivity_path, tune
from .space import Choice, SearchSpace, SpaceError, Unit, auto_ranks

__all__ = [
    "Choice", "Costs", "FactoredLinear", "OBJECTIVES", "SearchSpace", "SpaceError", "TrialRow", "TuneError",
    "TuneResult", "Unit", "auto_ranks", "latency_ms", "peak_memory_bytes", "sensitivity_path", "tune",
]
