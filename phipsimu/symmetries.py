"""Function-preserving transformations of parameter pytrees, and the volume factor det D that
says when Theorem 1 applies: ``rescale_layers``, ``rescale_neurons``, ``volume_factor``.
Check a measure against any of them with :func:`phipsimu.check_invariance`.

Example:
  >>> import jax, jax.numpy as jnp, phipsimu
  >>> net = [jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[1.0], [-1.0]])]
  >>> f = lambda p, x: jax.nn.relu(x @ p[0]) @ p[1]  # bias-free ReLU net
  >>> x = jnp.ones((1, 2))
  >>> scale = lambda p: phipsimu.symmetries.rescale_layers(p, [2.0, 0.5])
  >>> f(net, x).tolist(), f(scale(net), x).tolist()  # the same function
  ([[-2.0]], [[-2.0]])
  >>> round(float(phipsimu.symmetries.volume_factor(net, scale).value), 4)  # 2⁴·0.5²
  4.0
"""

from phipsimu._invariance import VolumeFactor, rescale_layers, rescale_neurons, volume_factor

__all__ = ["VolumeFactor", "rescale_layers", "rescale_neurons", "volume_factor"]
