"""Cache simulator for expert offloading: one compiled replay engine for every policy, a time model
calibrated to the runtime, and the references (oracle schedule, lower bound) policies are judged by."""

from .accesses import Accesses, build_accesses
from .policy import POLICIES, Policy
from .result import SimResult
from .run import DEMAND_POLICIES, Predictions, lower_bound, pinning, simulate, slots_for
from .scorers import (
    ActivationMatrixScorer,
    CoOccurrenceScorer,
    GateAheadScorer,
    OracleScorer,
    PredictorScorer,
    top_budget,
)
from .timing import TimeModel, expert_bytes, time_model_from_config

__all__ = [
    "Accesses",
    "ActivationMatrixScorer",
    "CoOccurrenceScorer",
    "GateAheadScorer",
    "DEMAND_POLICIES",
    "OracleScorer",
    "POLICIES",
    "Policy",
    "PredictorScorer",
    "Predictions",
    "SimResult",
    "TimeModel",
    "build_accesses",
    "expert_bytes",
    "lower_bound",
    "pinning",
    "simulate",
    "slots_for",
    "time_model_from_config",
    "top_budget",
]
