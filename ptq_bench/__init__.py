"""ptq-bench: post-training quantization of Vision Transformers, reproducibly."""

from ptq_bench.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()
