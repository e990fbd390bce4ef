"""stepdpo: step-level Direct Preference Optimization for math-reasoning language models."""

__version__ = "0.1.0"
