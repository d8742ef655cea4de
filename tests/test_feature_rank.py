"""The worst-feature lists against a plain-Python brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_sae_transfer.metrics.feature_rank import RANKINGS, rank_features, regular_mask

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def brute_force(dens_b, dens_f, act, n):
    """Each list straight from the definitions, one feature at a time."""
    def logd(d):
        return math.log10(d + 1e-10)

    def regular(i):
        return all(-5 <= logd(d) <= -1 for d in (dens_b[i], dens_f[i]))

    D = len(dens_b)
    known = [i for i in range(D) if math.isfinite(dens_b[i]) and math.isfinite(dens_f[i])]
    sim = [i for i in known if regular(i) and math.isfinite(act[i])]
    dead = [i for i in known if dens_b[i] > 0 and dens_f[i] == 0]
    alive = [i for i in known if dens_b[i] == 0 and dens_f[i] > 0]
    both = [i for i in known if dens_b[i] > 0 and dens_f[i] > 0]
    return {
        "lowest_activation_similarity": (sorted(sim, key=lambda i: (act[i], i))[:n], len(sim)),
        "turned_dead": (sorted(dead, key=lambda i: (-dens_b[i], i))[:n], len(dead)),
        "turned_alive": (sorted(alive, key=lambda i: (-dens_f[i], i))[:n], len(alive)),
        "largest_density_change": (
            sorted(both, key=lambda i: (-abs(logd(dens_f[i]) - logd(dens_b[i])), i))[:n], len(both)),
    }


densities = st.one_of(
    st.sampled_from([0.0, 0.0, 1e-6, 1e-5, 1e-3, 1e-3, 0.1, 0.5, float("nan")]),
    st.floats(0.0, 1.0),
)
similarities = st.one_of(st.sampled_from([float("nan"), -1.0, 0.0, 0.5, 0.5, 1.0]), st.floats(-1.0, 1.0))


@PROPS
@given(st.integers(1, 30).flatmap(lambda d: st.tuples(
    st.lists(densities, min_size=d, max_size=d),
    st.lists(densities, min_size=d, max_size=d),
    st.lists(similarities, min_size=d, max_size=d),
    st.integers(0, 8),
)))
def test_lists_match_brute_force(data):
    dens_b, dens_f, act, n = data
    got = rank_features({"density_base": np.array(dens_b), "density_finetune": np.array(dens_f),
                         "activation_similarity": np.array(act)}, n=n)
    want = brute_force(dens_b, dens_f, act, n)
    assert list(got) == list(RANKINGS)
    for name in RANKINGS:
        assert (got[name]["ids"], got[name]["n_candidates"]) == want[name], name
        assert all(type(i) is int for i in got[name]["ids"])
    n_unknown = sum(not (math.isfinite(a) and math.isfinite(b)) for a, b in zip(dens_b, dens_f))
    assert all(got[name]["n_unknown"] == n_unknown for name in RANKINGS)
    reg = regular_mask(np.array(dens_b), np.array(dens_f))
    assert got["lowest_activation_similarity"]["n_undefined"] == int((reg & ~np.isfinite(np.array(act))).sum())


def test_a_small_hand_made_case():
    vectors = {
        # id:               0     1     2     3     4      5
        "density_base": [1e-3, 1e-3, 1e-2, 0.0, 1e-3, 1e-3],
        "density_finetune": [1e-3, 1e-4, 0.0, 1e-2, 1e-3, 1e-1],
        "activation_similarity": [np.nan, 0.2, np.nan, np.nan, 0.2, np.nan],
    }  # 0 is regular without a similarity; 5's finetune density 0.1 is just outside the regular band
    got = rank_features(vectors, n=2)
    assert got["lowest_activation_similarity"] == {"ids": [1, 4], "n_candidates": 2, "n_unknown": 0, "n_undefined": 1}
    assert got["turned_dead"]["ids"] == [2]
    assert got["turned_alive"]["ids"] == [3]
    assert got["largest_density_change"]["ids"] == [5, 1]  # 5 moved two decades, 1 one decade; 0 and 4 none


def test_bad_vectors():
    with pytest.raises(ValueError, match="one length"):
        rank_features({"density_base": [0.1], "density_finetune": [0.1, 0.2], "activation_similarity": [0.1]})
    with pytest.raises(ValueError, match="n must be"):
        rank_features({"density_base": [0.1], "density_finetune": [0.1], "activation_similarity": [0.1]}, n=-1)
