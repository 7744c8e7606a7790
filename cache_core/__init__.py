"""Speculative Cache engine: forecast diffusion-transformer features, verify, decide.

Pure torch. Nothing in this package imports ComfyUI: it sees named tensors
("features") at points of the sampler's time axis and never a model object.
"""

from .config import CacheConfig, METHODS, METRICS, ON_REJECT
from .forecasters import Forecaster, TaylorForecaster, make_forecaster
from .verifier import Verifier, relative_l1, relative_norm
from .policy import Decision, Policy, StepMode
from .state import StreamCache, tensor_signature
from .stats import RunStats
from .stack import StackPlan, Stage
from .run import SpeculativeRun

__all__ = [
    "CacheConfig", "METHODS", "METRICS", "ON_REJECT",
    "Forecaster", "TaylorForecaster", "make_forecaster",
    "Verifier", "relative_l1", "relative_norm",
    "Decision", "Policy", "StepMode",
    "StreamCache", "tensor_signature",
    "RunStats",
    "StackPlan", "Stage",
    "SpeculativeRun",
]
