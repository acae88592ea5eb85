"""Read a transformers X-CLIP model as it is published: a converted folder or a hub repo id.

Used by the audit (`converter.audit`) and the way back (`converter.to_original`). Reads data only:
`config.json`, the weights from safetensors (pickled `pytorch_model.bin` files are refused, never
unpickled), and the processor and tokenizer files. A hub repo is fetched with huggingface_hub's
`snapshot_download` into the ordinary HF cache; offline, only that cache is used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from converter.errors import ConverterError, escape, reason

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, XCLIPConfig

StateDict = dict[str, torch.Tensor]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Everything a model folder needs except weights; the weights are asked for separately.
METADATA_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
WEIGHT_PATTERNS = [WEIGHTS, WEIGHTS_INDEX, "model-*-of-*.safetensors"]
# Buffers older transformers versions saved with the weights; recomputed on load, not parameters.
BENIGN_BUFFERS = re.compile(r".*\.position_ids\Z")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Published:
    """A published X-CLIP model, read but not built."""

    source: str  # as the user gave it
    folder: Path  # the local folder (the user's, or the hub snapshot in the HF cache)
    config: XCLIPConfig
    state_dict: StateDict  # as stored: the published keys and dtype
    image_processor: dict[str, Any] | None  # the published image processor's settings
    revision: str | None = None  # the hub commit read, for a repo id
    files: list[str] = field(default_factory=list)

    def model_state_dict(self) -> StateDict:
        """The state dict without the buffers older transformers versions stored beside the weights."""
        return {k: v for k, v in self.state_dict.items() if not BENIGN_BUFFERS.match(k)}

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The published tokenizer, from its JSON/text files only."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, KeyError... for broken files
            raise ConverterError(f"{self.source}: cannot load the tokenizer ({reason(err)})") from None


def load_published(source: str | Path, *, revision: str | None = None) -> Published:
    """Read `source` (a folder, or a hub repo id such as `microsoft/xclip-base-patch32`)."""
    text = str(source)
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ConverterError(f"{text}: expected a converted model folder (with config.json), not a file")
        folder, commit = path, None
    elif isinstance(source, str) and _REPO_ID.fullmatch(text) and not text.startswith((".", "/")):
        folder, commit = _snapshot(text, revision)
    else:
        raise ConverterError(f"{text}: no such folder, and not a hub repo id (ORG/NAME)")
    config = _read_config(folder, text)
    return Published(
        source=text,
        folder=folder,
        config=config,
        state_dict=_read_weights(_weights_files(folder, text), text),
        image_processor=read_image_processor(folder),
        revision=commit,
        files=sorted(p.name for p in folder.iterdir()),
    )


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# ---- the hub -----------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The repo's metadata and safetensors weights in the HF cache; offline, the cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from converter.hub import HUB_ERRORS

    offline = _offline()
    patterns = METADATA_PATTERNS + WEIGHT_PATTERNS
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
        )
    except HUB_ERRORS as err:  # not found, gated, offline, an incomplete snapshot
        if offline or isinstance(err, LocalEntryNotFoundError):
            raise ConverterError(
                f"{repo_id}: not in the local HF cache and the hub is unreachable"
                f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: connect to the internet once (or run "
                "where it was downloaded before), or pass a local folder instead"
            ) from None
        why = f"{type(err).__name__}: {reason(err)}"
        raise ConverterError(f"{repo_id}: cannot download from the hub ({why})") from None
    if not (folder / "config.json").is_file():
        # A partial cache (e.g. one file fetched by hf_hub_download) passes snapshot_download offline.
        raise ConverterError(
            f"{repo_id}: the cached snapshot {folder} has no config.json"
            f"{'; connect to the internet to complete it' if offline else ' (not a transformers model?)'}"
        )
    return folder, folder.name


# ---- files -------------------------------------------------------------------------------------


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConverterError(f"{source}: cannot read {path.name} ({reason(err)})") from None
    if not isinstance(data, dict):
        raise ConverterError(f"{source}: {path.name} is not a JSON object")
    return data


def _read_config(folder: Path, source: str) -> XCLIPConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ConverterError(f"{source}: no config.json (not a transformers model folder)")
    from converter.config import load_config_file

    # The same field-by-field validation as --config: a bad size or head count is named here, not
    # met later as a shape error deep inside torch.
    return load_config_file(path, where=f"{escape(source)}: config.json")


def _weights_files(folder: Path, source: str) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        index = _read_json(folder / WEIGHTS_INDEX, source)
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise ConverterError(
                f"{source}: {WEIGHTS_INDEX} names missing shards: {missing or 'none listed'}"
            )
        return [folder / s for s in shards]
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    if pickled:
        why = f"it has only {pickled[0]}, a pickle, which is never unpickled here"
    else:
        why = "no weights in safetensors (pickled weights such as pytorch_model.bin are never read)"
    raise ConverterError(
        f"{source}: no {WEIGHTS}: {why}; re-save the model with transformers' save_pretrained, which "
        "writes safetensors"
    )


def _read_weights(files: list[Path], source: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_dict: StateDict = {}
    for file in files:
        try:
            state_dict.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise ConverterError(f"{source}: cannot read {file.name} ({reason(err)})") from None
    if not state_dict:
        raise ConverterError(f"{source}: {files[0].name} holds no tensors")
    return state_dict


def read_image_processor(folder: Path) -> dict[str, Any] | None:
    """The image processor's settings: a flat `preprocessor_config.json` (the hub's usual file) or
    the `image_processor` entry of `processor_config.json` (what transformers 5 writes)."""
    flat, nested = folder / "preprocessor_config.json", folder / "processor_config.json"
    if flat.is_file():
        data = _read_json(flat, str(folder))
        if isinstance(data.get("image_processor"), dict):
            return data["image_processor"]
        return data
    if nested.is_file():
        data = _read_json(nested, str(folder))
        if isinstance(data.get("image_processor"), dict):
            return data["image_processor"]
    return None
