"""Learned priors over codes: EM recovers a known mixture, selection by validation likelihood, sampling
(temperature, seeding), weights-only round trips, and the nearest-neighbour check against copying."""

from __future__ import annotations

import io

import pytest
import torch

from musicvae.models.prior import (GaussianPrior, MixturePrior, StandardPrior, fit_prior, make_prior,
                                   nearest_neighbour_check)

MEANS = torch.tensor([[4.0, 0.0, 1.0], [-4.0, 2.0, -1.0], [0.0, -5.0, 0.0]])


def mixture_draws(n: int, seed: int, weights=(0.3, 0.7), means: torch.Tensor = MEANS[:2]) -> torch.Tensor:
    """``(n, 3)`` codes from a known mixture: component k has std 0.5 (k = 0) or 1 (else)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(torch.tensor(weights), n, replacement=True, generator=g)
    scale = torch.where(k == 0, 0.5, 1.0)[:, None]
    return means[k] + scale * torch.randn(n, 3, generator=g)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_a_known_two_component_mixture(covariance):
    prior = MixturePrior(3, 2, covariance).fit(mixture_draws(3000, seed=0))
    order = prior.means[:, 0].argsort(descending=True)  # component 0 has the positive first coordinate
    assert torch.allclose(prior.weights[order], torch.tensor([0.3, 0.7]), atol=0.03)
    assert torch.allclose(prior.means[order], MEANS[:2], atol=0.1)
    stds = torch.diagonal(prior.scale_tril[order] @ prior.scale_tril[order].transpose(1, 2), dim1=1, dim2=2).sqrt()
    assert torch.allclose(stds, torch.tensor([[0.5] * 3, [1.0] * 3]), atol=0.06)


def test_selection_picks_the_component_count_by_validation_likelihood():
    train, val = (mixture_draws(n, seed, (0.2, 0.3, 0.5), MEANS) for n, seed in ((1500, 1), (1500, 2)))
    best, table = fit_prior(train, val, components=(1, 2, 3, 6), covariances=("full",))
    assert [(r["kind"], r["components"]) for r in table] == [("standard", 1), ("gaussian", 1), ("mixture", 2),
                                                             ("mixture", 3), ("mixture", 6)]
    chosen = max(table, key=lambda r: r["val_log_likelihood"])
    assert (chosen["kind"], chosen["components"]) == ("mixture", best.components) and best.components in (3, 6)
    ll = {r["components"]: r["val_log_likelihood"] for r in table if r["kind"] == "mixture"}
    assert ll[3] > ll[2] + 0.5 > table[1]["val_log_likelihood"] + 0.5  # three clusters beat two beat one
    # Few codes in 10 dimensions from one Gaussian: more components fit the training codes better and
    # generalise worse, and validation keeps the single Gaussian.
    g = torch.Generator().manual_seed(3)
    few, other = 3 + 2 * torch.randn(80, 10, generator=g), 3 + 2 * torch.randn(400, 10, generator=g)
    best, table = fit_prior(few, other, components=(2, 4, 8), covariances=("full",))
    assert table[-1]["train_log_likelihood"] > table[1]["train_log_likelihood"] > table[-1]["val_log_likelihood"]
    assert isinstance(best, GaussianPrior) and table[1]["val_log_likelihood"] == max(r["val_log_likelihood"] for r in table)


def test_sampling_temperature_and_seeding():
    prior = GaussianPrior(3).fit(mixture_draws(4000, seed=3, weights=(1.0, 0.0)))
    assert torch.allclose(prior.means[0], MEANS[0], atol=0.05)
    one = prior.sample(5, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(one, prior.sample(5, 1.0, torch.Generator().manual_seed(7)))
    assert not torch.equal(one, prior.sample(5, 1.0, torch.Generator().manual_seed(8)))
    assert torch.allclose(prior.sample(4, 0.0), prior.means.expand(4, 3))  # temperature 0: the mean
    for t in (0.5, 2.0):  # covariance scaled by t^2
        draws = prior.sample(20000, t, torch.Generator().manual_seed(0))
        assert torch.allclose(draws.std(dim=0), torch.full((3,), 0.5 * t), rtol=0.05)
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(1, -1.0)


@pytest.mark.parametrize("kind", ["standard", "gaussian", "mixture"])
def test_buffers_round_trip_through_a_weights_only_load(kind):
    prior = make_prior(kind, 3, 2, "full").fit(mixture_draws(500, seed=4))
    buffer = io.BytesIO()
    torch.save(prior.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"weights", "means", "scale_tril"} and not list(prior.parameters())
    again = make_prior(kind, 3, 2, "full")
    again.load_state_dict(state)
    z = mixture_draws(10, seed=5)
    assert torch.equal(again.log_prob(z), prior.log_prob(z))
    assert torch.equal(again.sample(4, 1.0, torch.Generator().manual_seed(1)),
                       prior.sample(4, 1.0, torch.Generator().manual_seed(1)))


def test_standard_prior_is_the_unit_gaussian():
    z = torch.randn(6, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z.double()).sum(dim=1)
    assert torch.allclose(StandardPrior(3).fit(z).log_prob(z), expected)
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        StandardPrior(3).log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="components"):
        MixturePrior(3, 8).fit(torch.zeros(4, 3))


def test_nearest_neighbour_check_tells_copies_from_fresh_draws():
    train, held = mixture_draws(400, seed=6), mixture_draws(200, seed=7)
    fresh = nearest_neighbour_check(mixture_draws(200, seed=8), train, held)
    assert 0.8 < fresh["median_ratio"] < 1.25 and fresh["frac_below_heldout_min"] < 0.05
    copies = nearest_neighbour_check(train[:200] + 1e-4, train, held)
    assert copies["median_ratio"] < 0.01 and copies["frac_below_heldout_min"] == 1.0


def test_a_one_component_prior_draws_no_component_so_n01_draws_are_torch_randn():
    # generate sample --prior standard and MusicVAEModule.sample give the same codes for one seed
    drawn = StandardPrior(6).sample(5, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randn(5, 6, generator=torch.Generator().manual_seed(3)) * 0.7)
