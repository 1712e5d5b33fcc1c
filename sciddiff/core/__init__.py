"""The domain-free engine: states, constraints, processes, parameterizations and losses.

Imports only torch, numpy and scipy (a test keeps it so)."""

from ._constraints import Constraint, Euclidean, FlatTorus, Level, Masked, ZeroCoM
from ._losses import (
    ImportanceTime,
    LogNormalTime,
    LossOutput,
    TimeSample,
    UniformTime,
    denoising_loss,
    loss_weight,
    ot_coupling,
    wrapped_normal_score,
)
from ._params import (
    PARAMS,
    Denoiser,
    Model,
    Param,
    Prediction,
    eps_error_scale,
    from_prediction,
    to_prediction,
)
from ._precondition import EDMPrecond
from ._process import EDM, VE, VP, GaussianProcess, LinearInterpolant, PathSample, check_compatible
from ._state import State

__all__ = [
    "Constraint", "Euclidean", "FlatTorus", "Level", "Masked", "ZeroCoM",
    "ImportanceTime", "LogNormalTime", "LossOutput", "TimeSample", "UniformTime",
    "denoising_loss", "loss_weight", "ot_coupling", "wrapped_normal_score",
    "PARAMS", "Denoiser", "Model", "Param", "Prediction", "eps_error_scale",
    "from_prediction", "to_prediction", "EDMPrecond",
    "EDM", "VE", "VP", "GaussianProcess", "LinearInterpolant", "PathSample", "check_compatible",
    "State",
]
