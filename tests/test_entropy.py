import numpy as np
import pytest

from raycat import entropy


def test_full_entropy_of_uniform_and_delta():
    assert entropy.entropy_full(np.log(np.full(8, 1 / 8))) == pytest.approx(np.log(8), abs=1e-12)
    lp = np.array([0.0, -np.inf, -np.inf])
    assert entropy.entropy_full(lp) == 0.0


def test_options_entropy_renormalises_and_sums_spellings():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.0])
    lp = entropy.log_softmax(logits)
    groups = [[0, 4], [1], [2, 5]]  # option A has two spellings ("A", " A")
    glp = entropy.group_logprobs(dict(enumerate(lp)), groups)
    p = np.exp(lp)
    expect = np.array([p[0] + p[4], p[1], p[2] + p[5]])
    probs, mass = entropy.options_distribution(glp)
    assert mass == pytest.approx(expect.sum(), abs=1e-12)
    q = expect / expect.sum()
    np.testing.assert_allclose(probs, q, atol=1e-12)
    assert entropy.entropy_options(glp) == pytest.approx(-(q * np.log(q)).sum(), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_bound_holds_for_random_distributions(seed, k):
    rng = np.random.default_rng(seed)
    v = 300
    lp = entropy.log_softmax(rng.normal(scale=rng.uniform(0.5, 6), size=v))
    full = entropy.entropy_full(lp)
    est, bound = entropy.entropy_topk(np.sort(lp)[-k:], v)
    assert abs(est - full) <= bound + 1e-9
    assert bound >= 0


def test_topk_is_exact_when_tail_is_empty():
    lp = np.log(np.array([0.5, 0.25, 0.25]))
    est, bound = entropy.entropy_topk(lp, 3)
    assert bound == 0.0
    assert est == pytest.approx(entropy.entropy_full(lp))


def test_roc_auc_convention_low_entropy_predicts_correct():
    from raycat.score.metrics import roc_auc

    correct = np.array([1, 1, 0, 0], dtype=bool)
    assert roc_auc(correct, np.array([0.1, 0.2, 0.9, 1.0])) == 1.0
    assert roc_auc(correct, np.array([0.9, 1.0, 0.1, 0.2])) == 0.0
    assert roc_auc(np.ones(3, dtype=bool), np.zeros(3)) is None


def test_an_option_with_no_mass_adds_nothing_not_nan():
    h = entropy.entropy_options(np.array([np.log(0.5), np.log(0.5), -np.inf]))
    assert h == pytest.approx(np.log(2))
