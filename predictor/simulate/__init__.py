"""Cache simulator for expert offloading: demand policies, prediction-driven prefetch, time model."""

from .accesses import Accesses, build_accesses
from .result import SimResult
from .run import DEMAND_POLICIES, run_demand, run_prefetch
from .scorers import ActivationMatrixScorer, CoOccurrence, Oracle, PredictorScorer, Scorer, top_budget
from .timing import TimeModel, expert_bytes, time_model_from_config

__all__ = [
    "Accesses",
    "ActivationMatrixScorer",
    "CoOccurrence",
    "DEMAND_POLICIES",
    "Oracle",
    "PredictorScorer",
    "Scorer",
    "SimResult",
    "TimeModel",
    "build_accesses",
    "expert_bytes",
    "run_demand",
    "run_prefetch",
    "time_model_from_config",
    "top_budget",
]
