"""raycat: complexity-aware fine-tuning on Ray."""

__version__ = "0.1.0"
