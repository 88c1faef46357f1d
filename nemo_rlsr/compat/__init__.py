"""Compatibility with the libraries we build on, where it depends on their release (megatron.py)."""
