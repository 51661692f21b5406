"""Shared fixtures: small models whose Hessians are known or cheap to form densely."""

import os

# Compile for speed: the suite compiles many small programs and runs each a few times, so
# XLA's backend optimisation passes cost more than they save (demo --quick, 1 seed, 3 methods:
# 24 → 13 CPU-seconds on the 2-core test machine). Set before JAX starts its backend;
# subprocesses (CLI, notebooks, multi-device checks) inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
    ).strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phipsimu
from benchmarks._common import init_mlp  # the suite's MLP (tests import it from here)


def unregister_duration_listener(listener) -> None:
    """``jax.monitoring.unregister_event_duration_listener`` (public from JAX 0.8.1; JAX
    0.8.0, the floor, has only the private one)."""
    public = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if public is not None:
        public(listener)
    else:  # JAX 0.8.0
        from jax._src import monitoring

        monitoring._unregister_event_duration_listener_by_callback(listener)


def random_spd(seed: int, d: int, low: float = 0.5, high: float = 3.0) -> np.ndarray:
    """A random symmetric positive-definite matrix with eigenvalues in [low, high]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * rng.uniform(low, high, size=d)) @ q.T


def quadratic_loss(a: np.ndarray):
    """L(x) = ½ xᵀAx over a pytree {"u": first half, "w": rest}; its Hessian is A."""
    a = jnp.asarray(a)
    k = a.shape[0] // 2

    def loss(params):
        x = jnp.concatenate([params["u"].ravel(), params["w"].ravel()])
        return 0.5 * x @ a @ x

    params = {"u": jnp.ones(k, a.dtype), "w": jnp.ones(a.shape[0] - k, a.dtype)}
    return loss, params


def mlp_apply(params, x):
    """A tanh MLP's outputs."""
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def mse(out, y):
    """Mean squared error of outputs (the output loss of ``mlp_loss``)."""
    return jnp.mean((out - y) ** 2)


def mlp_loss(params, x, y):
    return mse(mlp_apply(params, x), y)


def split_batches(x, y, sizes):
    """``(x, y)`` cut into consecutive batches of the given sizes, as a list of tuples."""
    cuts = np.cumsum(sizes)[:-1]
    return list(zip(np.split(np.asarray(x), cuts), np.split(np.asarray(y), cuts)))


def flat_rows(v):
    """A pytree with a leading sample axis as a float64 ``(num, d)`` matrix (ravel order)."""
    return np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(v), np.float64)


@pytest.fixture
def small_mlp():
    """A 3-5-2 tanh MLP (d = 32) with a batch of 8, and a dense reference Hessian."""
    key = jax.random.key(0)
    params = init_mlp(key, [3, 5, 2])
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jax.random.normal(jax.random.key(2), (8, 2))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hess = jax.hessian(lambda z: mlp_loss(unravel(z), x, y))(flat)
    return params, x, y, np.asarray(hess, dtype=np.float64)


def example1(x):
    """The paper's Example 1: L = x₁²x₂² − 2x₁x₂ + 1."""
    return x[0] ** 2 * x[1] ** 2 - 2 * x[0] * x[1] + 1


def matfree_quadratic():
    """An SPD quadratic (d = 60) and its Hessian's matvec from ``phipsimu.hvp``, for
    comparisons with matfree on the same probes."""
    a = random_spd(5, 60, 0.5, 4.0)
    loss, params = quadratic_loss(a)
    hvp = phipsimu.hvp(loss)
    return a, loss, params, lambda v: hvp(params, v)


# Compile-heavy unit tests (about 10 worker-seconds or more each on the 2-core machine in
# `pytest -n 2 --durations=0`): the first case of each stays in the fast suite, so every
# guarantee is exercised there once, and the other cases run with `pytest -m slow`. A test
# that is not parametrized is all slow. End-to-end checks carry `pytest.mark.slow` in their
# own modules.
HEAVY = {
    "tests/test_baselines.py::test_frobenius_sam_is_the_gradient_of_the_scaled_unbiased_variance",
    "tests/test_baselines.py::test_nan_loss_with_the_determinant_is_skipped_or_nan",
    "tests/test_baselines.py::test_random_sam_is_the_mean_gradient_at_sphere_perturbations",
    "tests/test_cli.py::test_demo_rejects_bad_options",
    "tests/test_convention.py::test_every_estimator_takes_an_operator_and_batches",
    "tests/test_curvature.py::test_gauss_newton_matches_dense_jt_h_j",
    "tests/test_curvature.py::test_gauss_newton_through_the_estimators",
    "tests/test_curvature.py::test_hvp_matches_dense_hessian",
    "tests/test_curvature.py::test_quadratic_forms_match_dense",
    "tests/test_diagnostics.py::test_invariant_gaussian_flags_a_divergent_integral_on_a_relu_net",
    "tests/test_estimate.py::test_determinant_ess_small_when_proposal_poorly_scaled",
    "tests/test_estimate.py::test_determinant_mc_matches_slogdet",
    "tests/test_estimate.py::test_nan_loss_gives_nan_estimate",
    "tests/test_estimate.py::test_sharpness_with_batches_applies_psi_to_full_data_forms",
    "tests/test_invariance.py::TestBiasFreeSquareMLP::test_measures",
    "tests/test_invariance.py::test_property_layer_rescaling_of_random_square_nets",
    "tests/test_mu.py::test_sphere_property_any_pytree",
    "tests/test_mu_product.py::test_property_equivariance_under_random_groupwise_det_one_rescalings",
    "tests/test_objective.py::test_determinant_objective_on_example1_manifold",
    "tests/test_objective.py::test_leading_term_converges_to_sharpness_at_a_minimum",
    "tests/test_objective.py::test_leading_term_on_example1_manifold",
    "tests/test_objective_gradients.py::test_gradient_through_log_weights_that_depend_on_x",
    "tests/test_objective_gradients.py::test_gradient_with_respect_to_the_batch_is_exact",
    "tests/test_objective_gradients.py::test_invariant_gaussian_leading_term_converges_to_sharpness_at_a_minimum",
    "tests/test_objective_gradients.py::test_nan_loss_gives_nan_objective",
    "tests/test_objective_gradients.py::test_one_pass_rule_equals_grad_of_the_rematerialised_objective",
    "tests/test_precision.py::test_rho_zero_is_not_counted_as_unresolved",
    "tests/test_retrace.py::test_second_eager_call_does_not_trace_again",
    "tests/test_spectral.py::test_damped_gauss_newton_with_a_large_norm_is_never_singular",
    "tests/test_spectral.py::test_dataset_accumulation_with_unequal_batches_equals_full_batch",
    "tests/test_spectral.py::test_dataset_path_does_not_retrace_on_a_second_call",
    "tests/test_spectral.py::test_per_block_analysis_matches_dense_diagonal_blocks",
    "tests/test_spectral.py::test_slq_log_determinant_agrees_with_matfree",
    "tests/test_spectral.py::test_top_eigenvalues_match_dense_eigh",
    "tests/test_trace.py::test_hutchinson_and_xtrace_agree_with_matfree",
    "tests/test_transforms.py::TestContract::test_float32_and_float64",
    "tests/test_transforms.py::TestContract::test_inject_hyperparams",
    "tests/test_transforms.py::TestContract::test_multi_steps",
    "tests/test_transforms.py::TestContract::test_state_survives_numpy_round_trip",
    "tests/test_transforms.py::test_nan_loss_gives_nan_updates_and_apply_if_finite_skips",
    "tests/test_transforms.py::test_zero_gradient_gives_finite_updates",
}


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        name = item.nodeid.split("[")[0]
        if name not in HEAVY:
            continue
        if name in seen or "[" not in item.nodeid:
            item.add_marker(pytest.mark.slow)
        seen.add(name)
