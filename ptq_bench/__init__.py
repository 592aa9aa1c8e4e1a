"""ptq-bench: post-training quantization of Vision Transformers, reproducibly."""

__version__ = "0.1.0"
