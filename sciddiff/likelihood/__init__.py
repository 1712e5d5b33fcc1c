"""Log-likelihoods of data under a model, through the probability-flow ODE (Song et al. 2021,
Sec. 4.3; FFJORD, Grathwohl et al. 2019)."""

from ._pfode import Divergence, LikelihoodResult, Noise, gaussian_prior_log_prob, log_likelihood

__all__ = ["Divergence", "LikelihoodResult", "Noise", "gaussian_prior_log_prob", "log_likelihood"]
