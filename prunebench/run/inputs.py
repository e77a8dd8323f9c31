"""What a record's key digests besides its names: the contents behind a cell's inputs.

A record is reused only when every one of these is unchanged; otherwise the cell is a new record
(the old one stays, and `prunebench report` shows one set of inputs per table, saying which).

- ``model``: the files of a local model directory or of the built-in trained model (contents; a
  file over 256 MB by name, size and modification time: prunebench.fingerprint), a hub model's
  cached snapshot (its commit); nothing for the models built in code from their name (``random:``).
- ``prompt``: the prompt built around a probe question (the chat template, or LLaVA's format).
- ``task``: a ``--task-data`` file's sha256; a generated task's rows are drawn in code from its name.
- ``method``: the files a method reads (a checkpoint's config and weights).
- ``decoding``: ``--max-new-tokens`` and ``--seed``.
"""

from __future__ import annotations

import os
from pathlib import Path

from prunebench.engine.method import Method
from prunebench.fingerprint import combine, directory_digest, files_digest, text_digest
from prunebench.models.loading import BUILTIN_TRAINED

PROBE = "<image>\nWhat is in the image?"


def model_digest(name: str, revision: str | None = None) -> str | None:
    if name in BUILTIN_TRAINED:
        return directory_digest(BUILTIN_TRAINED[name])
    if name.startswith("random:"):  # built in code from the name
        return None
    if os.path.isdir(name):
        return directory_digest(name)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json", revision=revision)
    return text_digest(f"hub:{name}@{Path(config).parent.name}") if isinstance(config, str) else None


def prompt_digest(processor) -> str:
    from prunebench.run.lmms_bridge import build_prompt

    return text_digest(build_prompt(processor, PROBE))


def method_digest(method: Method) -> str | None:
    files = [Path(f) for f in method.input_files()]
    if not files:
        return None
    root = Path(os.path.commonpath([f.parent for f in files]))
    return files_digest(files, root)


def key_digest(parts: dict) -> str:
    """The ``inputs`` field of a record key."""
    return combine(parts)[:16]
