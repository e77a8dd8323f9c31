"""prunebench: visual-token pruning for vision-language models, benchmarked under one protocol."""

__version__ = "0.1.0"
