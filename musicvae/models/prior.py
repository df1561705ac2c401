"""Learned priors over a VAE's codes, fitted after training on the training windows' posterior means.

The VAE samples codes from N(0, I), but the aggregate posterior (where the codes of music actually
lie) is neither centred, white nor unimodal, so decoded N(0, I) draws land where no music was
encoded ("holes"; Hoffman & Johnson 2016, "ELBO surgery"; Dai & Wipf 2019, two-stage VAE). Fitting a
density to the posterior means and sampling from it is the cheap fix (Ghosh et al. 2020, "From
variational to deterministic autoencoders", ex-post density estimation with a Gaussian mixture).

- :class:`StandardPrior`: N(0, I), the VAE's own prior, under the same interface.
- :class:`GaussianPrior`: one full-covariance Gaussian (closed form).
- :class:`MixturePrior`: K components, full or diagonal covariances, fitted by EM (k-means++ start).
- :func:`fit_prior`: fits each candidate on training codes and keeps the one of highest mean
  log-likelihood per validation code ("best on validation").
- :func:`nearest_neighbour_check`: are samples closer to training codes than held-out codes are?

Parameters are buffers (plain tensors in ``state_dict``), so a checkpoint holding one loads with
``torch.load(weights_only=True)``; the shapes follow from ``(dim, components)``, which belong in the
hyper-parameters. **Temperature** T scales each sample's deviation from its component's mean: the
covariance is scaled by T^2, the component weights are not changed (T = 0 gives component means, T = 1
the fitted density). **Seeding**: every random choice (EM's start, the component, the draw) takes a
``torch.Generator``; the same generator state gives the same samples (a one-component prior draws no
component, so StandardPrior's samples are those of ``torch.randn``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

#: Added to every covariance's diagonal, relative to the codes' mean variance: keeps a component that
#: collapses on a few codes positive definite (sklearn's GaussianMixture uses an absolute 1e-6).
REG_COVAR = 1e-4
#: Component counts fit_prior tries by default.
DEFAULT_COMPONENTS = (1, 2, 4, 8, 16, 32)
COVARIANCES = ("full", "diag")
_LOG_2PI = math.log(2 * math.pi)


def _log_gaussians(z: Tensor, means: Tensor, scale_tril: Tensor) -> Tensor:
    """``(N, K)`` log-densities of ``z (N, D)`` under each ``N(means[k], L_k L_k^T)``, float64.
    One component at a time: memory stays at N x D whatever K is."""
    columns = []
    for mean, tril in zip(means, scale_tril):
        solved = torch.linalg.solve_triangular(tril, (z - mean).T, upper=False)  # (D, N)
        half_log_det = torch.diagonal(tril).log().sum()
        columns.append(-0.5 * (solved.pow(2).sum(dim=0) + z.shape[1] * _LOG_2PI) - half_log_det)
    return torch.stack(columns, dim=1)


def _m_step(z: Tensor, resp: Tensor, covariance: str, reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights ``(K,)``, means ``(K, D)`` and regularised covariances ``(K, D, D)`` from responsibilities."""
    counts = resp.sum(dim=0) + 1e-12  # (K,)
    means = (resp.T @ z) / counts[:, None]  # (K, D)
    covs = []
    for k in range(resp.shape[1]):
        diff = z - means[k]  # (N, D)
        weighted = diff * resp[:, k:k + 1]
        if covariance == "full":
            cov = weighted.T @ diff / counts[k]
            covs.append(cov + reg * torch.eye(z.shape[1], dtype=z.dtype))
        else:
            covs.append(torch.diag((weighted * diff).sum(dim=0) / counts[k] + reg))
    return counts / counts.sum(), means, torch.stack(covs)


class MixturePrior(nn.Module):
    """A mixture of `components` Gaussians over `dim`-dimensional codes.

    Buffers: ``weights (K,)``, ``means (K, D)``, ``scale_tril (K, D, D)`` (Cholesky factors; diagonal
    matrices when ``covariance="diag"``). An unfitted prior is N(0, I) in every component.

    Args:
        dim: code size D.
        components: K.
        covariance: "full" or "diag".
    """

    def __init__(self, dim: int, components: int = 1, covariance: str = "full") -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance {covariance!r}: one of {', '.join(COVARIANCES)}")
        if dim < 1 or components < 1:
            raise ValueError(f"dim {dim} and components {components} must be positive")
        self.dim, self.components, self.covariance = int(dim), int(components), covariance
        self.register_buffer("weights", torch.full((components,), 1.0 / components))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("scale_tril", torch.eye(dim).repeat(components, 1, 1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}, covariance={self.covariance!r}"

    def _set(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        self.weights.copy_(weights)
        self.means.copy_(means)
        self.scale_tril.copy_(torch.linalg.cholesky(covs))

    def fit(self, codes: Tensor, generator: Optional[torch.Generator] = None, max_iter: int = 200,
            tol: float = 1e-5) -> "MixturePrior":
        """EM (Dempster et al. 1977) from a k-means++ start (Arthur & Vassilvitskii 2007), in float64.

        Args:
            codes: ``(N, D)`` posterior means of the training windows.
            generator: seeds the k-means++ start (default: seed 0).
            max_iter: EM iterations at most.
            tol: stop when the mean log-likelihood per code improves by less.

        Returns:
            self, fitted.
        """
        z = _check_codes(codes, self.dim, need=self.components)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        reg = REG_COVAR * float(z.var(dim=0).mean())
        resp = kmeans_pp_responsibilities(z, self.components, generator)  # (N, K) one-hot
        previous = -math.inf
        for _ in range(max_iter):
            weights, means, covs = _m_step(z, resp, self.covariance, reg)
            log_joint = _log_gaussians(z, means, torch.linalg.cholesky(covs)) + weights.log()  # (N, K)
            total = torch.logsumexp(log_joint, dim=1)  # (N,)
            resp = (log_joint - total[:, None]).exp()
            current = float(total.mean())
            if current - previous < tol:
                break
            previous = current
        self._set(weights.float(), means.float(), covs.float())
        return self

    def log_prob(self, z: Tensor) -> Tensor:
        """``(N,)`` log-density of codes ``z (N, D)`` (nats, float64)."""
        z = _check_codes(z, self.dim)
        log_joint = _log_gaussians(z, self.means.double(), self.scale_tril.double()) + self.weights.double().log()
        return torch.logsumexp(log_joint, dim=1)

    def sample(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(n, D)`` codes: a component drawn by weight, then its mean plus `temperature` times a draw of
        its covariance (covariance scaled by temperature^2). Float32, on the buffers' device."""
        if temperature < 0:
            raise ValueError(f"temperature {temperature}: must be >= 0")
        device = self.means.device
        # One component: nothing to choose, so the generator gives only the deviations, and N(0, I)'s draws
        # are exactly ``temperature * torch.randn(n, D)``, the VAE's own (MusicVAEModule.sample).
        picks = torch.zeros(n, dtype=torch.long) if self.components == 1 else \
            torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.dim, generator=generator)  # (n, D)
        draws = self.means.cpu()[picks]  # (n, D)
        for k, tril in enumerate(self.scale_tril.cpu()):
            mine = picks == k
            draws[mine] += temperature * eps[mine] @ tril.T
        return draws.to(device)

    def parameter_count(self) -> int:
        """Free parameters: K-1 weights, K*D means, and K*D(D+1)/2 (full) or K*D (diag) covariances."""
        per_cov = self.dim * (self.dim + 1) // 2 if self.covariance == "full" else self.dim
        return self.components - 1 + self.components * (self.dim + per_cov)


class GaussianPrior(MixturePrior):
    """One full-covariance Gaussian fitted in closed form (mean and covariance of the codes)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1, "full")

    def fit(self, codes: Tensor, generator: Optional[torch.Generator] = None, max_iter: int = 1,
            tol: float = 0.0) -> "GaussianPrior":
        z = _check_codes(codes, self.dim, need=2)
        cov = torch.cov(z.T, correction=0) + REG_COVAR * float(z.var(dim=0).mean()) * torch.eye(self.dim,
                                                                                              dtype=torch.float64)
        self._set(torch.ones(1), z.mean(dim=0, keepdim=True).float(), cov.unsqueeze(0).float())
        return self


class StandardPrior(MixturePrior):
    """N(0, I): the VAE's training prior, under the same interface (nothing to fit)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1, "diag")

    def fit(self, codes: Tensor, generator: Optional[torch.Generator] = None, max_iter: int = 0,
            tol: float = 0.0) -> "StandardPrior":
        return self


def _check_codes(codes: Tensor, dim: int, need: int = 0) -> Tensor:
    z = torch.as_tensor(codes).double()
    if z.dim() != 2 or z.shape[1] != dim:
        raise ValueError(f"codes of shape {tuple(z.shape)}; expected (N, {dim})")
    if len(z) < need:
        raise ValueError(f"{len(z)} codes to fit {need} components: need at least as many codes")
    if not torch.isfinite(z).all():
        raise ValueError("codes hold NaN or infinite values")
    return z


def kmeans_pp_responsibilities(z: Tensor, k: int, generator: torch.Generator, rounds: int = 10) -> Tensor:
    """One-hot ``(N, K)`` assignments after k-means++ seeding and `rounds` Lloyd steps."""
    centres = [z[int(torch.randint(len(z), (1,), generator=generator))]]
    closest = (z - centres[0]).pow(2).sum(dim=1)
    for _ in range(1, k):
        pick = int(torch.multinomial((closest + 1e-30).float(), 1, generator=generator))
        centres.append(z[pick])
        closest = torch.minimum(closest, (z - z[pick]).pow(2).sum(dim=1))
    c = torch.stack(centres)  # (K, D)
    for _ in range(rounds):
        assign = torch.cdist(z, c).argmin(dim=1)  # (N,)
        for j in range(k):
            members = z[assign == j]
            if len(members):
                c[j] = members.mean(dim=0)
    assign = torch.cdist(z, c).argmin(dim=1)
    return nn.functional.one_hot(assign, k).double()


def make_prior(kind: str, dim: int, components: int = 1, covariance: str = "full") -> MixturePrior:
    """An unfitted prior by name: "standard", "gaussian" or "mixture" (with `components`, `covariance`)."""
    if kind == "standard":
        return StandardPrior(dim)
    if kind == "gaussian":
        return GaussianPrior(dim)
    if kind == "mixture":
        return MixturePrior(dim, components, covariance)
    raise ValueError(f"prior kind {kind!r}: one of standard, gaussian, mixture")


def fit_prior(train_codes: Tensor, val_codes: Tensor, kinds: Sequence[str] = ("gaussian", "mixture"),
              components: Sequence[int] = DEFAULT_COMPONENTS, covariances: Sequence[str] = COVARIANCES,
              seed: int = 0) -> tuple[MixturePrior, list[dict[str, Any]]]:
    """Fit every candidate on `train_codes`; keep the one of highest mean log-likelihood per
    validation code.

    "Best on validation": the largest ``val_log_likelihood`` (mean nats per code of `val_codes`, codes of
    recordings the prior never saw); a tie goes to the candidate listed first (fewer parameters). A
    mixture needs at least 2 training codes per component; larger counts are skipped. The standard
    N(0, I) is always scored as the baseline row, and is picked only if it beats every fitted prior.

    Args:
        train_codes: ``(N, D)`` posterior means of the training windows.
        val_codes: ``(M, D)`` posterior means of the validation windows.
        kinds: "gaussian" (one full-covariance Gaussian), "mixture" (every count in `components`, each
            covariance in `covariances`; K = 1 "full" is the Gaussian again, so it is skipped there).
        seed: EM's k-means++ start.

    Returns:
        ``(best, table)``: the fitted best prior, and one row per candidate: ``kind``, ``components``,
        ``covariance``, ``parameters``, ``train_log_likelihood``, ``val_log_likelihood``.
    """
    dim = train_codes.shape[1]
    candidates: list[tuple[str, int, str]] = [("standard", 1, "diag")]
    if "gaussian" in kinds:
        candidates.append(("gaussian", 1, "full"))
    if "mixture" in kinds:
        for cov in covariances:
            for k in components:
                if (k, cov) != (1, "full") and 2 * k <= len(train_codes):
                    candidates.append(("mixture", int(k), cov))
    table, best, best_ll = [], None, -math.inf
    for kind, k, cov in candidates:
        prior = make_prior(kind, dim, k, cov).fit(train_codes, torch.Generator().manual_seed(seed))
        row = {"kind": kind, "components": k, "covariance": cov, "parameters": 0 if kind == "standard" else
               prior.parameter_count(), "train_log_likelihood": float(prior.log_prob(train_codes).mean()),
               "val_log_likelihood": float(prior.log_prob(val_codes).mean())}
        table.append(row)
        if row["val_log_likelihood"] > best_ll:
            best, best_ll = prior, row["val_log_likelihood"]
    assert best is not None  # the standard prior always scores a finite likelihood
    return best, table


@torch.no_grad()
def nearest_neighbour_check(samples: Tensor, train_codes: Tensor, heldout_codes: Tensor,
                            quantiles: Sequence[float] = (0.01, 0.1, 0.5)) -> dict[str, Any]:
    """Are sampled codes copies of training codes? Each sample's Euclidean distance to its nearest
    training code, against each held-out code's distance to its nearest training code.

    A prior that copies training codes (e.g. a mixture with a component per code) puts its samples
    much nearer the training codes than unseen music lies; a prior that generalises puts them about
    as near, or farther.

    Returns:
        ``samples`` and ``heldout``: the distances' quantiles ({"q0.01": ..., ...}); ``median_ratio``
        (samples' median over held-out's); ``frac_below_heldout_min``: share of samples nearer a training
        code than any held-out code is; ``frac_below_heldout_q0.01``: nearer than 99 % of held-out codes.
    """
    def nearest(z: Tensor) -> Tensor:
        train = train_codes.double()
        return torch.cat([torch.cdist(chunk.double(), train).amin(dim=1) for chunk in z.split(1024)])

    d_sample, d_held = nearest(samples), nearest(heldout_codes)
    q = torch.tensor(list(quantiles), dtype=torch.float64)
    held_q, sample_q = torch.quantile(d_held, q), torch.quantile(d_sample, q)
    return {"samples": {f"q{v:g}": float(s) for v, s in zip(quantiles, sample_q)},
            "heldout": {f"q{v:g}": float(h) for v, h in zip(quantiles, held_q)},
            "median_ratio": float(d_sample.median() / d_held.median()),
            "frac_below_heldout_min": float((d_sample < d_held.min()).double().mean()),
            "frac_below_heldout_q0.01": float((d_sample < torch.quantile(d_held, 0.01)).double().mean()),
            "n_samples": len(samples), "n_heldout": len(heldout_codes), "n_train": len(train_codes)}
