"""Landscapes: filter and layer normalisation against a hand computation, surfaces against
the closed form of a quadratic, chunking, batches, a mapped axis, and bad input."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phipsimu
from phipsimu import landscape

KEY = jax.random.key(1)
PARAMS = {
    "conv": jnp.arange(1.0, 25.0).reshape(2, 2, 2, 3) / 10,  # (h, w, in, out)
    "dense": jnp.array([[1.0, -2.0], [3.0, 0.0], [0.5, 1.0]]),  # (in, out)
    "bias": jnp.array([0.5, -2.0]),
    "step": jnp.array(3),  # an int leaf: never moved
}


def hand_normalised(r, axis=-1, layer=False):
    """A Gaussian direction ``r`` (one leaf) scaled by hand to the params leaf's filters."""
    out = {}
    for name in ("conv", "dense"):
        x, d = np.asarray(PARAMS[name], np.float64), np.asarray(r[name], np.float64)
        axes = None if layer else tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        scale = np.sqrt(
            np.sum(x**2, axis=axes, keepdims=True) / np.sum(d**2, axis=axes, keepdims=True)
        )
        out[name] = d * scale
    return out


def test_filter_normalisation_by_hand():
    """Each filter of a direction has the norm of the same filter of params (one compile; the
    slow test below checks the directions against the raw Gaussian draw)."""
    filt = landscape.random_directions(KEY, PARAMS, 2)
    assert filt["step"].shape == (2,) and not jnp.any(filt["step"])
    conv, dense = np.asarray(PARAMS["conv"]), np.asarray(PARAMS["dense"])
    for i in range(2):
        # a kernel's filters: the slices along its last (output) axis
        np.testing.assert_allclose(
            np.sqrt(np.sum(np.asarray(filt["conv"][i]) ** 2, axis=(0, 1, 2))),
            np.sqrt(np.sum(conv**2, axis=(0, 1, 2))),
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            np.linalg.norm(filt["dense"][i], axis=0), np.linalg.norm(dense, axis=0), rtol=1e-5
        )
        # a bias: each entry is the filter of one unit
        np.testing.assert_allclose(np.abs(filt["bias"][i]), np.abs(PARAMS["bias"]), rtol=1e-6)


@pytest.mark.slow
def test_normalisations_against_the_raw_draw_by_hand():
    raw = landscape.random_directions(KEY, PARAMS, 2, normalize=None)
    # the raw directions are the Gaussian sampler's draws for this key
    want = jax.jit(lambda k, p: phipsimu.mu.gaussian().sample(k, p, 2)[0])(KEY, PARAMS)
    for a, b in zip(jax.tree_util.tree_leaves(raw), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    filt = landscape.random_directions(KEY, PARAMS, 2)
    layer = landscape.random_directions(KEY, PARAMS, 2, normalize="layer")
    first = landscape.random_directions(KEY, PARAMS, 2, filter_axis=0)
    for i in range(2):
        r = {k: v[i] for k, v in raw.items()}
        for name, want in hand_normalised(r).items():
            np.testing.assert_allclose(filt[name][i], want, rtol=1e-5)
        np.testing.assert_allclose(filt["bias"][i], np.sign(r["bias"]) * np.abs(PARAMS["bias"]))
        for name, want in hand_normalised(r, layer=True).items():
            np.testing.assert_allclose(layer[name][i], want, rtol=1e-5)
        # PyTorch layout (out, in, ...): filters along axis 0
        for name, want in hand_normalised(r, axis=0).items():
            np.testing.assert_allclose(first[name][i], want, rtol=1e-5)


def quadratic():
    h = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    x_star = jnp.array([1.0, -1.0, 0.5])

    def loss(p, shift=0.0):
        r = p - x_star
        return 0.5 * r @ h @ r + shift

    return h, x_star, loss


def test_surface_matches_the_quadratic_along_given_directions():
    h, x_star, loss = quadratic()
    d1, d2 = jnp.array([1.0, 0.0, 1.0]), jnp.array([0.0, 2.0, -1.0])
    c1, c2 = np.linspace(-1.0, 1.0, 5), np.array([-0.5, 0.0, 0.25, 2.0])
    a, b = np.meshgrid(c1, c2, indexing="ij")
    exact = 0.5 * (
        a**2 * float(d1 @ h @ d1) + 2 * a * b * float(d1 @ h @ d2) + b**2 * float(d2 @ h @ d2)
    )
    z = landscape.surface(loss, x_star, directions=(d1, d2), coords=(c1, c2))
    assert z.shape == (5, 4)
    np.testing.assert_allclose(z, exact, rtol=1e-5, atol=1e-6)
    # chunks of 3 (a partial last chunk) and a stacked direction pytree: the same numbers
    z3 = landscape.surface(
        loss, x_star, directions=jnp.stack([d1, d2]), coords=(c1, c2), chunk_size=3
    )
    np.testing.assert_allclose(z3, z, rtol=1e-6)

    # the 20 points over a mapped axis of 4: every member returns the whole grid (8 devices
    # under shard_map: tests/landscape_check.py)
    def spread(_):
        return landscape.surface(loss, x_star, directions=(d1, d2), coords=(c1, c2), axis_name="i")

    for member in jax.vmap(spread, axis_name="i")(jnp.zeros(4)):
        np.testing.assert_allclose(member, z, rtol=1e-6)
    with pytest.raises(
        ValueError, match=r"coords: the grid's 20 points must split evenly over the 3"
    ):
        jax.vmap(spread, axis_name="i")(jnp.zeros(3))
    # a 1-D slice, with an extra argument
    z1 = landscape.surface(loss, x_star, 1.0, directions=(d1,), coords=c1)
    np.testing.assert_allclose(z1, 0.5 * c1**2 * float(d1 @ h @ d1) + 1.0, rtol=1e-5)


def test_bad_input_names_the_parameter():
    _, x_star, loss = quadratic()
    d = jnp.ones(3)
    with pytest.raises(ValueError, match=r"coords\[0\]: shape \(2, 2\).*must be a non-empty 1-D"):
        landscape.surface(loss, x_star, directions=(d,), coords=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"coords: 3 coordinate arrays"):
        landscape.surface(loss, x_star, directions=(d, d, d), coords=(np.zeros(2),) * 3)
    with pytest.raises(
        ValueError, match=r"directions: leaf \(root\) has shape \(1, 4\), expected \(1, 3\)"
    ):
        landscape.surface(loss, x_star, directions=jnp.ones((1, 4)), coords=np.zeros(2))
    with pytest.raises(ValueError, match=r"directions: 1 directions for 2 coordinate"):
        landscape.surface(loss, {"a": x_star}["a"], directions=[d], coords=(np.zeros(2),) * 2)
    with pytest.raises(ValueError, match=r"directions: structure"):
        landscape.surface(loss, x_star, directions={"w": d}, coords=np.zeros(2))
    with pytest.raises(ValueError, match=r"normalize='unit': must be one of"):
        landscape.random_directions(KEY, x_star, 1, normalize="unit")
    with pytest.raises(ValueError, match=r"axis_name='i': this axis is not bound"):
        landscape.surface(loss, x_star, directions=(d,), coords=np.zeros(2), axis_name="i")


@pytest.mark.slow
def test_surface_over_batches_is_the_dataset_mean():
    def loss(p, x, y):
        return jnp.mean((x @ p - y) ** 2)

    x = jax.random.normal(KEY, (10, 3))
    y = jnp.arange(10.0)
    p = jnp.array([0.1, 0.2, 0.3])
    dirs = landscape.random_directions(KEY, p, 2, normalize="layer")
    coords = (np.linspace(-1, 1, 3), np.linspace(-1, 1, 2))
    whole = landscape.surface(loss, p, x, y, directions=dirs, coords=coords)
    swept = landscape.surface(
        loss, p, directions=dirs, coords=coords, batches=[(x[:4], y[:4]), (x[4:], y[4:])]
    )
    np.testing.assert_allclose(swept, whole, rtol=1e-5)


@pytest.mark.slow
def test_surface_on_8_devices_matches_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(root / "tests" / "landscape_check.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout


@pytest.mark.slow
def test_surface_along_the_top_hessian_eigenvectors():
    h, x_star, loss = quadratic()
    top = phipsimu.top_eigenvalues(loss, 2)(x_star, key=KEY)
    c = np.linspace(-1.0, 1.0, 3)
    z = landscape.surface(loss, x_star, directions=top.vectors, coords=(c, c))
    a, b = np.meshgrid(c, c, indexing="ij")
    lam = np.linalg.eigvalsh(np.asarray(h, np.float64))[::-1][:2]
    np.testing.assert_allclose(z, 0.5 * (lam[0] * a**2 + lam[1] * b**2), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_plot_draws_slices_contours_and_surfaces_without_matplotlib_at_import():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, phipsimu; print('matplotlib' in sys.modules)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])},
    )
    assert out.stdout.strip() == "False", out.stderr
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c1, c2 = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
    z = np.add.outer(c1**2, c2**2)
    ax = landscape.plot(z, (c1, c2), radius=0.5)
    assert len(ax.lines) == 1  # the radius circle
    assert landscape.plot(z, (c1, c2), kind="surface").name == "3d"
    ax = landscape.plot(z[:, 0], c1, radius=0.5)
    assert len(ax.lines) == 3  # the slice and ±radius
    with pytest.raises(ValueError, match=r"values: shape \(5, 4\) does not match coords \(5,\)"):
        landscape.plot(z, c1)
    with pytest.raises(ValueError, match=r"kind='wire': must be"):
        landscape.plot(z, (c1, c2), kind="wire")
    plt.close("all")
