"""Function-preserving transformations of parameter pytrees, and the volume factor det D that
says when Theorem 1 applies: ``rescale_layers``, ``rescale_neurons``, ``volume_factor``.
Check a measure against any of them with :func:`phipsimu.check_invariance`."""

from phipsimu._invariance import VolumeFactor, rescale_layers, rescale_neurons, volume_factor

__all__ = ["VolumeFactor", "rescale_layers", "rescale_neurons", "volume_factor"]
