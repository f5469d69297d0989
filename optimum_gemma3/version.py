"""The package version, in a module of its own so that every layer can read it without
importing the package root (which registers the model with optimum-neuron)."""

__version__ = "0.1.0.dev0"
