"""The working-set cvxpy mu-lasso against an independent solver (the exact LARS homotopy)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.mining_models import mnist_subset, seeded_lenet
from vebi.errors import VebiError
from vebi.mining import FeatureExtractor, mu_lasso
from vebi.mining.solver import SolverFailedError, lasso_objective
from vebi.testing import lasso_homotopy_reference


@pytest.fixture(scope="module")
def mnist_responses(mnist_root) -> tuple[np.ndarray, np.ndarray]:
    """X (float32) of LeNet responses (all default layers, m = 1140) on 3,000 real digits, Y."""
    data = mnist_subset(mnist_root, 3000)
    images, labels = data.tensors
    model = seeded_lenet()
    with FeatureExtractor(model, ["conv1", "pool1", "conv2", "pool2", "conv3", "relu3"]) as ex:
        x = torch.cat([ex(images[i : i + 500])[0] for i in range(0, 3000, 500)]).numpy()
    return x, np.eye(10)[labels.numpy()]


@pytest.fixture(scope="module")
def mnist_statistics(mnist_responses) -> tuple[np.ndarray, np.ndarray, int]:
    """G and B of the responses, and N."""
    x, y = mnist_responses
    x = x.astype(np.float64)
    return x.T @ x, x.T @ y, len(x)


def _assert_agrees(gram, cross, weights, reference, mu, nonnegative) -> None:
    ours = lasso_objective(gram, cross, weights)
    theirs = lasso_objective(gram, cross, reference)
    # our objective is never worse than the reference's by more than 1e-6 relative, and both
    # reach the same optimum
    np.testing.assert_array_less(ours - theirs, 1e-6 * np.abs(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert np.all(np.abs(weights).sum(axis=0) <= mu * (1 + 1e-7))
    if nonnegative:
        assert weights.min() >= 0.0


@pytest.mark.parametrize("mu", [0.5, 10.0, 40.0])
def test_nonnegative_matches_homotopy(mnist_statistics, mu: float) -> None:
    gram, cross, n = mnist_statistics
    solution = mu_lasso(gram, cross, mu)
    reference = lasso_homotopy_reference(gram, cross, mu, n)
    _assert_agrees(gram, cross, solution.weights, reference, mu, nonnegative=True)
    assert solution.solver_used == ["CLARABEL"] * 10 and not solution.failures
    # the bound is active: sum w = mu
    np.testing.assert_allclose(solution.weights.sum(axis=0), mu, rtol=1e-6)


def test_signed_matches_homotopy(mnist_statistics) -> None:
    gram, cross, n = mnist_statistics
    solution = mu_lasso(gram, cross[:, :3], 2.0, nonnegative=False)
    reference = lasso_homotopy_reference(gram, cross[:, :3], 2.0, n, nonnegative=False)
    _assert_agrees(gram, cross[:, :3], solution.weights, reference, 2.0, nonnegative=False)
    assert (solution.weights < -1e-6).any()  # the signed problem does use negative weights


def test_working_set_grows_to_the_optimum(mnist_statistics) -> None:
    gram, cross, n = mnist_statistics
    solution = mu_lasso(gram, cross[:, :2], 10.0, initial_size=1)
    assert min(solution.iterations) > 1  # one feature was not enough: violators were added
    reference = lasso_homotopy_reference(gram, cross[:, :2], 10.0, n)
    _assert_agrees(gram, cross[:, :2], solution.weights, reference, 10.0, nonnegative=True)
    assert max(solution.max_kkt_violation) < 1e-5


def test_bad_mu_is_refused(mnist_statistics) -> None:
    gram, cross, _ = mnist_statistics
    for mu in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(VebiError, match="mu must be a positive number"):
            mu_lasso(gram, cross, mu)


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(VebiError, match="gram must be"):
        mu_lasso(np.eye(3), np.ones((4, 2)), 1.0)
    gram = np.eye(3)
    gram[0, 0] = np.nan
    with pytest.raises(VebiError, match="NaN/Inf"):
        mu_lasso(gram, np.ones((3, 2)), 1.0)


def test_class_without_samples_gets_no_features(mnist_statistics) -> None:
    gram, cross, _ = mnist_statistics
    cross = cross.copy()
    cross[:, 4] = 0.0
    solution = mu_lasso(gram, cross, 10.0)
    assert not solution.weights[:, 4].any()
    assert solution.solver_used[4] == "none (b = 0)"


def test_solver_failure_falls_back_and_is_reported(mnist_statistics) -> None:
    gram, cross, _ = mnist_statistics
    solution = mu_lasso(
        gram,
        cross[:, :1],
        10.0,
        solvers=("CLARABEL", "SCS"),
        solver_options={"CLARABEL": {"max_iter": 1}, "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9}},
    )
    assert solution.solver_used == ["SCS"]
    assert solution.failures and solution.failures[0].startswith("CLARABEL")
    assert solution.weights.sum() == pytest.approx(10.0, rel=1e-3)


def test_all_solvers_failing_is_an_error(mnist_statistics) -> None:
    gram, cross, _ = mnist_statistics
    with pytest.raises(SolverFailedError, match="no solver solved"):
        mu_lasso(
            gram,
            cross[:, :1],
            10.0,
            solvers=("CLARABEL",),
            solver_options={"CLARABEL": {"max_iter": 1}},
        )


def test_gram_statistics_equal_the_products() -> None:
    from vebi.mining import GramStatistics

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(700, 37, generator=generator)
    labels = torch.randint(0, 4, (700,), generator=generator)
    stats = GramStatistics(37, 4, row_blocks=3)
    for start in range(0, 700, 128):  # batches of any size
        stats.update(x[start : start + 128], labels[start : start + 128])
    result = stats.compute()
    x64 = x.double()
    gram = stats.gram_matrix()
    torch.testing.assert_close(gram, x64.T @ x64, rtol=1e-12, atol=1e-12)
    assert stats.gram_matrix().data_ptr() == gram.data_ptr()  # the sums themselves, no copy
    assert "gram" not in stats._defaults  # no second m x m tensor kept for reset()
    torch.testing.assert_close(
        result["cross"], x64.T @ torch.nn.functional.one_hot(labels).double()
    )
    assert result["class_counts"].tolist() == torch.bincount(labels).tolist()
    assert result["num_samples"].item() == 700
    with pytest.raises(ValueError, match="labels outside"):
        stats.update(x[:2], torch.tensor([0, 4]))


@pytest.mark.parametrize("union_gram_max", [4096, 0])  # one X_U^T X_U, or one per class
def test_streamed_gram_reaches_the_same_optimum(
    mnist_responses, mnist_statistics, monkeypatch, union_gram_max: int
) -> None:
    """G streamed from row blocks of X (never formed) gives the dense solve's W and objective;
    a small first working set makes it take several rounds, each two passes over X."""
    from vebi.mining import statistics

    monkeypatch.setattr(statistics, "UNION_GRAM_MAX", union_gram_max)
    x, _ = mnist_responses
    gram, cross, n = mnist_statistics
    streamed = statistics.StreamedGram(
        lambda: (x[i : i + 700] for i in range(0, len(x), 700)), 1140
    )
    solution = mu_lasso(streamed, cross[:, :4], 10.0, initial_size=2)
    dense = mu_lasso(gram, cross[:, :4], 10.0, initial_size=2)
    assert max(solution.iterations) > 1
    assert streamed.passes == 2 * max(solution.iterations)
    np.testing.assert_allclose(solution.weights, dense.weights, atol=1e-7, rtol=0)
    np.testing.assert_allclose(solution.objective, dense.objective, rtol=1e-9)
    np.testing.assert_allclose(
        solution.objective, lasso_objective(gram, cross[:, :4], dense.weights), rtol=1e-9
    )
    reference = lasso_homotopy_reference(gram, cross[:, :4], 10.0, n)
    _assert_agrees(gram, cross[:, :4], solution.weights, reference, 10.0, nonnegative=True)


def test_streamed_gram_refuses_blocks_of_the_wrong_width() -> None:
    from vebi.mining.statistics import StreamedGram

    streamed = StreamedGram(lambda: iter([np.ones((3, 5), np.float32)]), 4)
    with pytest.raises(ValueError, match=r"blocks must be \(n, 4\)"):
        streamed.products([np.array([0])], [np.array([1.0])])


def test_streamed_passes_read_ahead_in_a_thread_and_take_any_float_blocks(
    mnist_responses, mnist_statistics
) -> None:
    """The blocks are read by the reader thread (while the products of the previous one
    run); float16 and tensor blocks give the optimum of their own values, the homotopy
    reference's."""
    from vebi.mining import statistics

    x, _ = mnist_responses
    readers = set()

    def blocks():
        for start in range(0, len(x), 500):
            readers.add(threading.current_thread().name)
            yield torch.from_numpy(x[start : start + 500].astype(np.float16))

    streamed = statistics.StreamedGram(blocks, x.shape[1], torch.device("cpu"))
    rounded = x.astype(np.float16).astype(np.float64)
    gram = rounded.T @ rounded
    _, cross, n = mnist_statistics
    cross = cross[:, :3]
    solution = mu_lasso(streamed, cross, 10.0, initial_size=4)
    assert readers and all(name.startswith("vebi-cache-reader") for name in readers)
    assert streamed.passes == 2 * max(solution.iterations) and streamed.seconds > 0
    dense = mu_lasso(gram, cross, 10.0, initial_size=4)
    np.testing.assert_allclose(solution.weights, dense.weights, atol=1e-7)
    reference = lasso_homotopy_reference(gram, cross, 10.0, n)
    _assert_agrees(gram, cross, solution.weights, reference, 10.0, nonnegative=True)
