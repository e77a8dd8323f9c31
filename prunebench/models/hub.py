"""The Hugging Face hub as transformers uses it: download on demand, fail fast without it.

Online, ``from_pretrained`` downloads what the cache lacks (with its progress bars). With
``HF_HUB_OFFLINE=1``, or when the hub does not answer within seconds, everything is read from
the local cache only, so a missing model or dataset fails at once with a message naming the id,
the cache directory and the command that fetches it on a connected machine, instead of after
transformers' per-file retries.
"""

from __future__ import annotations

import os

from prunebench.errors import UserError

PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(UserError, FileNotFoundError):
    """A model or dataset that is neither in the local cache nor downloadable now."""


def offline_reason() -> str | None:
    """Why downloads are off (``HF_HUB_OFFLINE`` set, or the hub not answering), or None."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "downloads are disabled (HF_HUB_OFFLINE is set)"
    if not hub_reachable():
        return f"the hub ({constants.ENDPOINT}) cannot be reached"
    return None


def hub_reachable(endpoint: str | None = None) -> bool:
    """Whether the hub (``endpoint``, default huggingface_hub's) answers within a few seconds, asked
    through huggingface_hub's own HTTP client (so proxies and certificates configured for it apply)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint or constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any transport failure means: not reachable now
        return False
    return True


def pretrained_kwargs(revision: str | None = None, trust_remote_code: bool = False, offline: str | None = None) -> dict:
    """The keyword arguments every ``from_pretrained`` of one load gets: the revision, remote code
    only when asked, and ``local_files_only`` when downloads are off (``offline``: the reason)."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if offline is not None:
        kwargs["local_files_only"] = True
    return kwargs


def fetch_command(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str:
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return f"hf download{kind} {repo_id}" + (f" --revision {revision}" if revision else "")


def unavailable(repo_id: str, what: str, offline: str | None, err: Exception, revision: str | None = None,
                repo_type: str = "model") -> HubUnavailableError:
    """The error for a ``repo_id`` that could not be loaded: not cached while downloads are off, or
    not found / not downloadable on the hub."""
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    cause = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    if offline is not None:
        return HubUnavailableError(
            f"cannot load {what} {repo_id!r}{at}: it is not in the local cache ({constants.HF_HUB_CACHE}) and {offline}. "
            f"On a connected machine run `{fetch_command(repo_id, revision, repo_type)}` and copy its HF_HOME "
            f"({constants.HF_HOME}) here, or pass a local directory."
        )
    return HubUnavailableError(
        f"cannot load {what} {repo_id!r}{at} from the hub ({cause}); check the id and revision, and for a gated or "
        f"private repository log in first (`hf auth login`)."
    )


def snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str:
    """The local directory of a hub repository: downloaded when online, else from the cache."""
    from huggingface_hub import snapshot_download

    offline = offline_reason()
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=offline is not None)
    except (OSError, ValueError) as err:  # not cached, not on the hub, or not a valid id
        raise unavailable(repo_id, repo_type, offline, err, revision, repo_type) from None
