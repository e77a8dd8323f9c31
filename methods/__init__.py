"""Pruning methods, one module each; every module here is imported by the registry.

Installed as ``prunebench.methods``. See ``prunebench/method.py`` for the interface.
"""
