"""The mu-lasso of docs/method.md, section 2, solved with cvxpy on a working set of features.

For each class c, with G = X^T X (m x m) and b_c = X^T y_c:

    w_c = argmin_w  w^T G w - 2 b_c^T w     s.t.  ||w||_1 <= mu  (and w >= 0 by default),

which equals argmin ||X w - y_c||^2 under the same constraints (the dropped y^T y is constant).

Exact and fast: cvxpy (Clarabel by default) solves the problem restricted to a small working
set S (the restricted problems of many classes stacked into one separable cvxpy problem of
up to 2048 variables, so that cvxpy compiles a few times per round rather than once per
class), then the optimality (KKT)
conditions are checked on all m features. With gradient
g = 2 (G w - b) and lambda >= 0 the multiplier of the L1 bound, w is optimal iff

* non-negative: g_j = -lambda where w_j > 0 and g_j >= -lambda where w_j = 0;
* signed:       g_j = -lambda sign(w_j) where w_j != 0 and |g_j| <= lambda where w_j = 0.

Features outside S that violate these (beyond a small tolerance) join S (the worst
``initial_size`` of them; zero-weight features leave S), and the loop repeats until none does,
so the restricted optimum is the optimum of the full problem.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from vebi.errors import VebiError
from vebi.utils.log import get_logger

log = get_logger(__name__)

DEFAULT_SOLVERS: tuple[str, ...] = ("CLARABEL", "SCS")


class SolverFailedError(VebiError):
    """Every configured solver failed on a problem."""


@dataclass
class LassoSolution:
    """W (m x C) and how it was obtained."""

    weights: np.ndarray
    objective: np.ndarray  # w_c^T G w_c - 2 b_c^T w_c per class
    solver_used: list[str]
    iterations: list[int]
    working_set_sizes: list[int]
    max_kkt_violation: list[float]
    seconds: float
    failures: list[str] = field(default_factory=list)


def lasso_objective(gram: np.ndarray, cross: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-class w^T G w - 2 b^T w for W (m x C)."""
    weights = weights.reshape(len(gram), -1)
    cross = cross.reshape(len(gram), -1)
    return np.einsum("ic,ic->c", weights, gram @ weights) - 2.0 * np.einsum(
        "ic,ic->c", cross, weights
    )


#: Variables per cvxpy problem when the restricted problems of several classes are stacked.
STACK_VARIABLES = 2048


def _groups(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive classes whose working sets add up to at most :data:`STACK_VARIABLES`
    variables (one class alone may exceed it): few compilations, small problems."""
    groups: list[list[int]] = [[]]
    total = 0
    for j, size in enumerate(sizes):
        if groups[-1] and total + size > STACK_VARIABLES:
            groups.append([])
            total = 0
        groups[-1].append(j)
        total += size
    return groups


def _failed(failures: list[str], failure: str) -> None:
    """Record a solver failure; each distinct one is logged once per solve (a working-set
    loop can meet the same one in every round)."""
    if failure not in failures:
        log.warning("solver %s; trying the next one", failure)
    failures.append(failure)


def _restricted_solve(
    grams: Sequence[np.ndarray],
    crosses: Sequence[np.ndarray],
    mu: float,
    nonnegative: bool,
    solvers: Sequence[str],
    solver_options: Mapping[str, Mapping[str, Any]],
    failures: list[str],
) -> tuple[list[np.ndarray], str]:
    """The restricted problems of several classes as one cvxpy problem (they are separable:
    a block-diagonal quadratic and one L1 bound per class), so that cvxpy compiles once per
    round instead of once per class, which would cost more than the solves."""
    sizes = [len(c) for c in crosses]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    gram = sp.block_diag([sp.csr_matrix((g + g.T) / 2) for g in grams], format="csc")
    cross = np.concatenate(crosses)
    owner = sp.csr_matrix(
        (np.ones(edges[-1]), np.arange(edges[-1]), edges),
        shape=(len(sizes), edges[-1]),
    )
    w = cp.Variable(int(edges[-1]), nonneg=nonnegative)
    spent = owner @ w if nonnegative else owner @ cp.abs(w)
    objective = cp.Minimize(cp.quad_form(w, cp.psd_wrap(gram)) - 2 * cross @ w)
    problem = cp.Problem(objective, [spent <= mu])
    for solver in solvers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                problem.solve(solver=solver, **dict(solver_options.get(solver, {})))
        except (cp.error.SolverError, ValueError) as error:
            _failed(failures, f"{solver}: {error}")
            continue
        if problem.status == cp.OPTIMAL and w.value is not None:
            value = np.asarray(w.value, dtype=np.float64)
            return [value[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)], solver
        _failed(failures, f"{solver}: status {problem.status}")
    raise SolverFailedError(
        f"no solver solved the mu-lasso (tried {list(solvers)}): "
        + "; ".join(failures[-len(solvers) :])
    )


def _kkt_violations(
    gradient: np.ndarray, weights: np.ndarray, support: np.ndarray, nonnegative: bool
) -> tuple[np.ndarray, float]:
    """Violation of each feature outside the working set (> 0 means it should join)."""
    if nonnegative:
        multiplier = max(0.0, float(np.max(-gradient[support]))) if support.any() else 0.0
        violation = -gradient - multiplier
    else:
        multiplier = float(np.max(np.abs(gradient[support]))) if support.any() else 0.0
        violation = np.abs(gradient) - multiplier
    violation[support] = -np.inf
    return violation, multiplier


class GramOperator(Protocol):
    """What the working-set loop needs of G = X^T X (m x m), without ever forming it whole."""

    size: int
    #: passes over the data made so far, and the seconds spent in submatrices and products
    passes: int
    seconds: float

    def submatrices(self, index_sets: Sequence[np.ndarray]) -> list[np.ndarray]:
        """G[S, S] for each index set S."""

    def products(
        self, index_sets: Sequence[np.ndarray], weights: Sequence[np.ndarray]
    ) -> np.ndarray:
        """(m, len(index_sets)): column j = G[:, S_j] w_j."""


class DenseGram:
    """G held in memory (small m, or any m that fits the device): submatrices and products
    are slices of it, computed where G lives (a GPU's G never comes back to the CPU whole)."""

    def __init__(self, gram: np.ndarray | torch.Tensor) -> None:
        self.gram = torch.as_tensor(gram, dtype=torch.float64)
        self.size = len(gram)
        #: passes over the data: none (G is in memory)
        self.passes = 0
        self.seconds = 0.0

    def _columns(self, index_set: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(index_set, dtype=np.int64), device=self.gram.device)

    def submatrices(self, index_sets: Sequence[np.ndarray]) -> list[np.ndarray]:
        started = time.perf_counter()
        blocks = []
        for s in index_sets:
            columns = self._columns(s)
            blocks.append(self.gram[columns[:, None], columns].cpu().numpy())
        self.seconds += time.perf_counter() - started
        return blocks

    def products(
        self, index_sets: Sequence[np.ndarray], weights: Sequence[np.ndarray]
    ) -> np.ndarray:
        """G W for the k sparse columns w_j (on S_j) at once: G is symmetric, so G W =
        (W^T G)^T, one sparse-dense product reading the rows S_j of G (slicing G[:, S_j]
        per class would copy m |S_j| values each)."""
        started = time.perf_counter()
        device = self.gram.device
        owners = np.repeat(np.arange(len(index_sets)), [len(s) for s in index_sets])
        columns = np.concatenate([np.zeros(0, np.int64), *map(np.int64, index_sets)])
        values = np.concatenate([np.zeros(0), *(np.asarray(w, np.float64) for w in weights)])
        sparse = torch.sparse_coo_tensor(
            torch.as_tensor(np.stack([owners, columns]), dtype=torch.long),
            torch.as_tensor(values, dtype=torch.float64),
            (len(index_sets), self.size),
            check_invariants=False,
        ).to(device)
        result = torch.sparse.mm(sparse, self.gram).T.cpu().numpy()
        self.seconds += time.perf_counter() - started
        return np.ascontiguousarray(result)


class _Working:
    """One class's working-set state."""

    def __init__(self, cross: np.ndarray, nonnegative: bool, initial_size: int, tolerance: float):
        m = len(cross)
        score = cross if nonnegative else np.abs(cross)
        self.working = np.zeros(m, dtype=bool)
        first = min(m, initial_size)
        top = np.argpartition(-score, first - 1)[:first] if first < m else np.arange(m)
        self.working[top] = True
        self.cross = cross
        self.scale = tolerance * (1.0 + 2.0 * float(np.max(np.abs(cross))))
        self.weights = np.zeros(m)
        self.w_sub = np.zeros(0)
        self.solver = ""
        self.iterations = 0
        self.violation = 0.0
        self.objective = 0.0

    @property
    def indices(self) -> np.ndarray:
        return np.flatnonzero(self.working)


def _working_set_rounds(
    operator: GramOperator,
    cross: np.ndarray,
    classes: list[int],
    mu: float,
    nonnegative: bool,
    solvers: Sequence[str],
    solver_options: Mapping[str, Mapping[str, Any]],
    initial_size: int,
    tolerance: float,
    max_iterations: int,
    failures: list[str],
) -> dict[int, _Working]:
    """The working-set loop of the module doc for all ``classes`` at once: each round asks the
    operator once for the sub-Gram matrices and once for the gradients of the unfinished
    classes (two streamed passes when G is not in memory)."""
    states = {c: _Working(cross[:, c], nonnegative, initial_size, tolerance) for c in classes}
    active = list(classes)
    for _ in range(max_iterations):
        if not active:
            return states
        index_sets = [states[c].indices for c in active]
        grams = operator.submatrices(index_sets)
        for group in _groups([len(s) for s in index_sets]):
            solved, solver = _restricted_solve(
                [grams[j] for j in group],
                [states[active[j]].cross[index_sets[j]] for j in group],
                mu,
                nonnegative,
                solvers,
                solver_options,
                failures,
            )
            for j, w_sub in zip(group, solved, strict=True):
                state = states[active[j]]
                state.w_sub = np.maximum(w_sub, 0.0) if nonnegative else w_sub
                state.solver = solver
                state.iterations += 1
        products = operator.products(index_sets, [states[c].w_sub for c in active])
        still_active = []
        for j, c in enumerate(active):
            state = states[c]
            state.weights = np.zeros(len(state.cross))
            state.weights[index_sets[j]] = state.w_sub
            gradient = 2.0 * (products[:, j] - state.cross)
            # w^T G w - 2 b^T w, with G w from the same product
            state.objective = float(state.weights @ (products[:, j] - 2.0 * state.cross))
            violation, _ = _kkt_violations(gradient, state.weights, state.working, nonnegative)
            worst = float(violation.max()) if (~state.working).any() else 0.0
            state.violation = max(worst, 0.0)
            if worst <= state.scale:
                continue
            # next working set: the current support and the worst violators; zero-weight
            # features leave (they come back if they violate again), so the restricted
            # problems stay small; the support's optimum is feasible in the next problem and
            # a violator improves on it, so the objective falls every round (no cycling)
            violators = np.flatnonzero(violation > state.scale)
            worst_first = violators[np.argsort(-violation[violators])[:initial_size]]
            state.working[:] = False
            # (interior-point solvers leave ~1e-10 on features that are zero at the optimum)
            state.working[np.flatnonzero(np.abs(state.weights) > 1e-9 * mu)] = True
            state.working[worst_first] = True
            still_active.append(c)
        active = still_active
    if active:
        raise SolverFailedError(f"the working set did not converge in {max_iterations} rounds")
    return states


def mu_lasso(
    gram: np.ndarray | torch.Tensor | GramOperator,
    cross: np.ndarray,
    mu: float = 10.0,
    nonnegative: bool = True,
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    solver_options: Mapping[str, Mapping[str, Any]] | None = None,
    initial_size: int = 32,
    tolerance: float = 1e-7,
    max_iterations: int = 100,
) -> LassoSolution:
    """Solve the mu-lasso for every column of ``cross`` (module doc); returns W (m x C).

    Args:
        gram: G = X^T X, (m, m), symmetric positive semi-definite (numpy, or a torch tensor
            on any device: the products then run there); or a :class:`GramOperator` that
            computes its slices on demand (e.g. streamed from an activation cache).
        cross: B = X^T Y, (m, C) (or (m,) for one class).
        mu: the L1 bound, > 0.
        nonnegative: constrain w >= 0 (project default).
        solvers: cvxpy solvers tried in order when one fails (reported in ``failures``).
        solver_options: per-solver keyword arguments, e.g. ``{"CLARABEL": {"max_iter": 50}}``.
        initial_size: features in the first working set (those most correlated with y).
        tolerance: KKT violations below ``tolerance * (1 + max|2b|)`` count as satisfied.
    """
    cross = np.asarray(cross, dtype=np.float64)
    if cross.ndim == 1:
        cross = cross[:, None]
    if isinstance(gram, np.ndarray | torch.Tensor) or not hasattr(gram, "products"):
        matrix = torch.as_tensor(np.asarray(gram) if not torch.is_tensor(gram) else gram)
        m = len(matrix)
        if tuple(matrix.shape) != (m, m) or cross.shape[0] != m:
            raise VebiError(
                f"gram must be (m, m) and cross (m, C); got {tuple(matrix.shape)} and {cross.shape}"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise VebiError("the statistics G = X^T X or B = X^T Y contain NaN/Inf")
        operator: GramOperator = DenseGram(matrix)
    else:
        operator = gram
        m = operator.size
        if cross.shape[0] != m:
            raise VebiError(f"cross must be ({m}, C), got {cross.shape}")
    if not np.isfinite(mu) or mu <= 0:
        raise VebiError(f"mu must be a positive number, got {mu}")
    if not np.isfinite(cross).all():
        raise VebiError("the statistics G = X^T X or B = X^T Y contain NaN/Inf")
    if not solvers:
        raise VebiError("no solver given")
    started = time.perf_counter()
    failures: list[str] = []
    # no positive sample (or all-zero features): the optimum is w = 0
    classes = [c for c in range(cross.shape[1]) if np.any(cross[:, c])]
    states = _working_set_rounds(
        operator,
        cross,
        classes,
        mu,
        nonnegative,
        solvers,
        solver_options or {},
        initial_size,
        tolerance,
        max_iterations,
        failures,
    )
    solution = LassoSolution(
        weights=np.zeros((m, cross.shape[1])),
        objective=np.zeros(cross.shape[1]),
        solver_used=[],
        iterations=[],
        working_set_sizes=[],
        max_kkt_violation=[],
        seconds=0.0,
        failures=failures,
    )
    for c in range(cross.shape[1]):
        state = states.get(c)
        if state is None:
            solution.solver_used.append("none (b = 0)")
            solution.iterations.append(0)
            solution.working_set_sizes.append(0)
            solution.max_kkt_violation.append(0.0)
            continue
        solution.weights[:, c] = state.weights
        solution.objective[c] = state.objective
        solution.solver_used.append(state.solver)
        solution.iterations.append(state.iterations)
        solution.working_set_sizes.append(len(state.w_sub))
        solution.max_kkt_violation.append(state.violation)
    solution.seconds = time.perf_counter() - started
    return solution


def merge_solutions(
    parts: Sequence[tuple[np.ndarray, LassoSolution]], num_features: int, num_classes: int
) -> LassoSolution:
    """One solution of all classes from solutions of disjoint column sets of B (the classes
    are separate problems: each process of torch.distributed may solve a share of them)."""
    merged = LassoSolution(
        weights=np.zeros((num_features, num_classes)),
        objective=np.zeros(num_classes),
        solver_used=[""] * num_classes,
        iterations=[0] * num_classes,
        working_set_sizes=[0] * num_classes,
        max_kkt_violation=[0.0] * num_classes,
        seconds=max((part.seconds for _, part in parts), default=0.0),
    )
    for columns, part in parts:
        merged.weights[:, columns] = part.weights
        merged.objective[columns] = part.objective
        merged.failures += part.failures
        for j, c in enumerate(np.asarray(columns).tolist()):
            merged.solver_used[c] = part.solver_used[j]
            merged.iterations[c] = part.iterations[j]
            merged.working_set_sizes[c] = part.working_set_sizes[j]
            merged.max_kkt_violation[c] = part.max_kkt_violation[j]
    return merged
