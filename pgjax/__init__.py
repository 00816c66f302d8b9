"""pgjax: PaliGemma 1 and 2 as pure JAX functions over the official checkpoint's param tree."""

__version__ = "0.1.0"
