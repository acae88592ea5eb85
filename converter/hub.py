"""Publish a verified output folder to the Hugging Face hub in one commit."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import HFValidationError, HTTPError

from converter.errors import ConverterError, escape, reason

# What a hub call raises when the network or the hub says no: OSError (offline, no token, and
# HfHubHTTPError for an HTTP status), ValueError (arguments the hub refuses), the HTTP client's own errors.
HUB_ERRORS = (OSError, ValueError, HTTPError)


def hub_reason(err: BaseException) -> str:
    """A hub error as one line: its kind, or its HTTP status with the hub's explanation (its first line,
    which `reason` keeps, is a request id)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):  # a RepositoryNotFoundError too
        return "a gated repo: accept its terms on the hub and log in"
    if isinstance(err, RevisionNotFoundError):
        return "no such revision"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repo, or it is private"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        explained = escape(" ".join((err.server_message or "").split()))[:300] or reason(err)
        return f"HTTP {err.response.status_code}: {explained}"
    if isinstance(err, RuntimeError) and err.__cause__:  # huggingface_hub's wrap of a failed upload
        return f"{reason(err)} ({reason(err.__cause__)})"
    return reason(err)


def push_target(repo_id: str | None, model_name: str | None = None) -> str:
    """The repo to push to, checked before any work: `repo_id` as the hub accepts it (`name` or
    `namespace/name`), else `<user>/<model_name>`. Either way the hub is asked who is logged in, so no
    token or no network fails now, not after the conversion."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    if repo_id:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ConverterError(
                f"--push-to-hub {escape(repo_id)!r} is not a valid repo id: {reason(err)}"
            ) from None
    elif not model_name:
        raise ConverterError("--push-to-hub needs a REPO_ID when --model-name is not given")
    try:
        user = HfApi().whoami()["name"]
    except (*HUB_ERRORS, KeyError) as err:  # offline, no token, a revoked one
        target = repo_id or f"your namespace's {model_name}"
        raise ConverterError(
            f"cannot push to {target} ({hub_reason(err)}): log in with `hf auth login` or HF_TOKEN, and "
            "check the network"
        ) from None
    return repo_id or f"{user}/{model_name}"


def push_folder(folder: Path, repo_id: str, *, create_pr: bool = False, private: bool = False) -> str:
    """Upload every file of `folder` to `repo_id` in one commit; return the commit or PR URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=f"Add X-CLIP model converted by xclip-converter ({folder.name})",
            create_pr=create_pr,
        )
    except (*HUB_ERRORS, RuntimeError) as err:  # RuntimeError: huggingface_hub's wrap of a failed upload
        raise ConverterError(
            f"pushing to {repo_id} failed: {hub_reason(err)}; nothing was published"
        ) from None
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
