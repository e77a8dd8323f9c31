"""prunebench's own lmms-eval tasks (YAML + generators); installed as ``prunebench.tasks``.

The built-in offline tasks land here with the built-in benchmark; real tasks come from lmms-eval.
"""
