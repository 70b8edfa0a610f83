"""labs_lib: the helper library behind the Model Parallelism workshop notebooks."""

__version__ = "0.1.0"
