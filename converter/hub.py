"""Publish a verified output folder to the Hugging Face hub in one commit."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import HFValidationError, HTTPError

from converter.errors import ConverterError, escape, reason

# What a hub call raises when the network or the hub says no: OSError (offline, no token, and
# HfHubHTTPError for an HTTP status), ValueError (arguments the hub refuses), the HTTP client's own errors.
HUB_ERRORS = (OSError, ValueError, HTTPError)


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
        if repo_id:
            raise ConverterError(
                f"cannot push to {repo_id} ({reason(err)}): log in with `hf auth login` or HF_TOKEN, and "
                "check the network"
            ) from None
        raise ConverterError(
            f"cannot determine your hub namespace ({reason(err)}): pass --push-to-hub ORG/NAME "
            "and log in with `hf auth login` or HF_TOKEN"
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
    except HUB_ERRORS as err:
        raise ConverterError(f"pushing to {repo_id} failed: {reason(err)}") from None
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
