"""STEER's calibration of step confidences: a two-component Gaussian mixture fitted by EM (scikit-learn).

Fitted once on unlabeled SLM step confidences of a calibration split; a confidence x maps to
P(confident component | x) = w_h N(x; mu_h, s_h) / sum_k w_k N(x; mu_k, s_k), the confident component h being the
one with the higher mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class StepMixture:
    weights: tuple[float, float]
    means: tuple[float, float]
    variances: tuple[float, float]

    @classmethod
    def fit(cls, confidences: Sequence[float], seed: int = 0) -> "StepMixture":
        from sklearn.mixture import GaussianMixture

        x = np.asarray(confidences, dtype=float).reshape(-1, 1)
        if len(x) < 2 or not np.isfinite(x).all():
            raise ValueError("the mixture needs at least two finite step confidences")
        gmm = GaussianMixture(n_components=2, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(x)
        return cls(tuple(float(w) for w in gmm.weights_), tuple(float(m) for m in gmm.means_[:, 0]),
                   tuple(float(v) for v in gmm.covariances_[:, 0, 0]))

    @property
    def confident(self) -> int:
        return int(np.argmax(self.means))

    def posterior(self, confidence) -> np.ndarray | float:
        """P(confident component | confidence), elementwise (a scalar in, a float out)."""
        x = np.asarray(confidence, dtype=float)
        w, m, v = (np.asarray(a) for a in (self.weights, self.means, self.variances))
        log = np.log(w) - 0.5 * np.log(2 * np.pi * v) - 0.5 * (x[..., None] - m) ** 2 / v
        log -= log.max(axis=-1, keepdims=True)
        post = np.exp(log[..., self.confident]) / np.exp(log).sum(axis=-1)
        return float(post) if post.ndim == 0 else post

    def to_json(self) -> str:
        return json.dumps({"weights": self.weights, "means": self.means, "variances": self.variances})

    @classmethod
    def from_json(cls, text: str) -> "StepMixture":
        d = json.loads(text)
        return cls(tuple(d["weights"]), tuple(d["means"]), tuple(d["variances"]))
