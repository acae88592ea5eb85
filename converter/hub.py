"""Publish a verified output folder to the Hugging Face hub in one commit."""

from __future__ import annotations

from pathlib import Path

from converter.errors import ConverterError


def default_repo_id(model_name: str | None, token: str | None = None) -> str:
    """`<user>/<model-name>` in the logged-in user's namespace."""
    from huggingface_hub import HfApi

    if not model_name:
        raise ConverterError("--push-to-hub needs a REPO_ID when --model-name is not given")
    try:
        user = HfApi(token=token).whoami()["name"]
    except Exception as err:  # offline, no token, revoked token
        raise ConverterError(
            f"cannot determine your hub namespace ({type(err).__name__}): pass --push-to-hub ORG/NAME "
            "and log in with `hf auth login` or HF_TOKEN"
        ) from None
    return f"{user}/{model_name}"


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
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConverterError(f"pushing to {repo_id} failed: {reason}") from None
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
