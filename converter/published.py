"""Read a published transformers X-CLIP model (a folder or a hub repo id) as data only, for the audit and
the way back: safetensors weights only (a pickled `pytorch_model.bin` is refused, never unpickled)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from converter import reader
from converter.config import load_config_file
from converter.errors import ConverterError, escape, listed, reason
from converter.export import WEIGHTS_NAME
from converter.paths import is_inside
from converter.reader import CONFIG_LIMIT, TOKENIZER_LIMIT, finite_number, positive_int, shown

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, XCLIPConfig

StateDict = dict[str, torch.Tensor]

WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # the image processor's settings
# The tokenizer files transformers may read from a folder, each checked under its cap before it does.
TOKENIZER_FILES = {
    **dict.fromkeys(("tokenizer.json", "vocab.json", "merges.txt"), TOKENIZER_LIMIT),
    **dict.fromkeys(("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"), CONFIG_LIMIT),
}
# What a hub snapshot fetches: config, processor and tokenizer files, the safetensors weights (or shards).
HUB_PATTERNS = ["config.json", "*processor_config.json", *TOKENIZER_FILES, "model*.safetensors*"]
# Largest side a processor may resize or crop to: L/14 at 336 px resizes to 384; a 2048 px frame is 50 MB.
MAX_PROCESSOR_SIDE = 2048
# Buffers older transformers versions saved with the weights; recomputed on load, not parameters.
BENIGN_BUFFERS = re.compile(r".*\.position_ids\Z")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Published:
    source: str  # as the user gave it
    folder: Path  # the local folder (the user's, or the hub snapshot in the HF cache)
    config: XCLIPConfig
    state_dict: StateDict  # as stored: the published keys and dtype
    image_processor: dict[str, Any] | None  # the published image processor's settings
    revision: str | None = None  # the hub commit read, for a repo id

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in: the largest floating-point tensor's."""
        return max(self.state_dict.values(), key=lambda t: (t.is_floating_point(), t.numel())).dtype

    @property
    def weights_name(self) -> str:
        """The weights as the folder names them: model.safetensors, or the index of its shards."""
        return WEIGHTS_NAME if _present(self.folder / WEIGHTS_NAME) else WEIGHTS_INDEX

    def model_state_dict(self) -> StateDict:
        """The state dict without the buffers older transformers versions stored beside the weights."""
        return {k: v for k, v in self.state_dict.items() if not BENIGN_BUFFERS.match(k)}

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The published tokenizer, from its JSON and text files, each checked under its cap first."""
        from transformers import AutoTokenizer

        for name, limit in TOKENIZER_FILES.items():
            if _present(self.folder / name):  # JSON is read whole, so its depth and numbers are checked too
                check = reader.read_json if name.endswith(".json") else reader.check_size
                check(self.folder / name, f"{escape(self.source)}: {name}", limit)
        try:
            return AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, KeyError... for broken files
            raise ConverterError(f"{self.source}: cannot load the tokenizer ({reason(err)})") from None


def load_published(source: str | Path, *, revision: str | None = None) -> Published:
    """Read `source` (a folder, or a hub repo id such as `microsoft/xclip-base-patch32`)."""
    text, path = str(source), Path(source)
    if path.exists():
        if not path.is_dir():
            raise ConverterError(f"{text}: expected a converted model folder (with config.json), not a file")
        folder, commit, roots = path, None, (path,)
    elif isinstance(source, str) and _REPO_ID.fullmatch(text):
        folder, commit = _snapshot(text, revision)
        # A snapshot's files are links into its repo's blobs/, which may itself link to another disk.
        roots = (folder.parents[1], folder.parents[1] / "blobs")
    else:
        raise ConverterError(f"{text}: no such folder, and not a hub repo id (ORG/NAME)")
    if not _present(folder / "config.json"):
        raise ConverterError(f"{escape(text)}: no config.json (not a transformers model folder)")
    # Validated as --config is: a bad size or head count is named here, not met as a shape error in torch.
    config = load_config_file(folder / "config.json", where=f"{escape(text)}: config.json")
    weights = _read_weights(_weights_files(folder, roots, text), text)
    return Published(text, folder, config, weights, read_image_processor(folder, text), commit)


def _snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The repo's snapshot folder in the HF cache (downloaded unless offline) and its commit."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from converter.hub import HUB_ERRORS, hub_reason

    offline = constants.is_offline_mode()
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline
        )
    except HUB_ERRORS as err:  # not found, gated, offline
        if not (offline or isinstance(err, LocalEntryNotFoundError)):
            raise ConverterError(f"{repo_id}: cannot download from the hub ({hub_reason(err)})") from None
        at = f" revision {escape(revision)}" if revision else ""  # a tag or commit prefix is looked up online
        raise ConverterError(
            f"{repo_id}:{at} not in the local HF cache and the hub is unreachable"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}, and no local folder of that name exists: connect "
            "to the internet once (or run where it was downloaded before), or pass a local folder instead"
        ) from None
    # Offline, a snapshot fetched in part (hf_hub_download takes one file; from_pretrained the config and
    # weights) passes snapshot_download, and would be read as a repo without what was not fetched.
    parts = {"config": ["config.json"], "tokenizer": ["tokenizer_config.json"], "processor": PROCESSOR_FILES}
    lacking = [part for part, names in parts.items() if not any(_present(Path(snapshot, n)) for n in names)]
    if offline and lacking:
        raise ConverterError(
            f"{repo_id}: its cached snapshot has no {' or '.join(lacking)} files (fetched in part?) and "
            "HF_HUB_OFFLINE=1 keeps the hub from completing it: connect to the internet once, or pass a "
            "local folder instead"
        )
    return Path(snapshot), Path(snapshot).name


def _weights_files(folder: Path, roots: tuple[Path, ...], source: str) -> list[Path]:
    """model.safetensors, or the shards its index's weight_map names, each a regular file within `roots`."""
    if _present(folder / WEIGHTS_NAME):
        reader.check_regular(folder / WEIGHTS_NAME, f"{escape(source)}: {WEIGHTS_NAME}")
        return [folder / WEIGHTS_NAME]
    if not _present(folder / WEIGHTS_INDEX):
        pickled = next((name for name in PICKLED_WEIGHTS if (folder / name).is_file()), None)
        only = f" (only {pickled}, a pickle, which is never unpickled here)" if pickled else ""
        raise ConverterError(
            f"{escape(source)}: no {WEIGHTS_NAME}{only}; re-save the model with transformers' save_pretrained"
        )
    what = f"{escape(source)}: {WEIGHTS_INDEX}"
    weight_map = reader.read_json_object(folder / WEIGHTS_INDEX, what, reader.INDEX_LIMIT).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConverterError(
            f"{what}: weight_map must be an object naming each tensor's shard file, found "
            f"{shown(weight_map)}; re-save the model with transformers' save_pretrained"
        )
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:  # no file's name holds a NUL
            raise ConverterError(
                f"{what}: weight_map[{shown(tensor)}] must be a shard file name, found {shown(shard)}"
            )
    names, missing = sorted(set(weight_map.values())), []
    for name in names:
        path, relative = folder / name, PurePosixPath(name)
        named_outside = relative.is_absolute() or ".." in relative.parts
        try:  # a name too long, or a folder on the way that may not be searched: a read of the source
            present = _present(path)
        except OSError as err:
            raise ConverterError(f"{what}: cannot read shard {shown(name)} ({err.strerror})") from None
        if present and not named_outside:
            reader.check_regular(path, f"{what}: shard {escape(name)}")  # before resolving: names a link loop
        if named_outside or not any(is_inside(path, root) for root in roots):  # by its name, or a link
            raise ConverterError(
                f"{what}: shard {shown(name)} lies outside {escape(source)}: an index may name only files "
                "inside its own folder; copy the file there"
            )
        if not present:
            missing.append(escape(name))
    if missing:
        raise ConverterError(f"{what} names missing shards: {', '.join(listed(missing))}")
    return [folder / name for name in names]


def _read_weights(files: list[Path], source: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_dict: StateDict = {}
    for file in files:
        try:
            state_dict.update(load_file(file))
        except (SafetensorError, OSError) as err:
            why = f"{escape(source)}: cannot read {escape(file.name)} ({reason(err)})"
            raise ConverterError(why) from None
    if not state_dict:
        raise ConverterError(f"{escape(source)}: {escape(files[0].name)} holds no tensors")
    return state_dict


def read_image_processor(folder: Path, source: str | None = None) -> dict[str, Any] | None:
    """The checked settings of `preprocessor_config.json`, or of `processor_config.json`'s image_processor."""
    source = str(folder) if source is None else source
    for name in PROCESSOR_FILES:
        if not _present(folder / name):
            continue
        data = reader.read_json_object(folder / name, f"{escape(source)}: {name}")
        if isinstance(data.get("image_processor"), dict):
            data = data["image_processor"]
        elif name == "processor_config.json":
            return None  # only the processor's class: the image processor is not in this file
        check_image_processor(data, f"{escape(source)}: {name}")
        return data
    return None


def check_image_processor(settings: Mapping[str, Any], what: str) -> None:
    """Check what a VideoMAE image processor reads, so that running it can neither fail unnamed nor allocate
    without bound (absent or null: its default, which passes)."""
    from PIL import Image

    def refuse(name: str, want: str) -> ConverterError:
        return ConverterError(f"{what}: {name} must be {want}, found {shown(settings[name])}")

    given = {name: value for name, value in settings.items() if value is not None}
    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not isinstance(given.get(name, True), bool):
            raise refuse(name, "true or false")
    for name in ("size", "crop_size"):  # one number, a list, or a dict such as {"height": 224, ...}
        value = given.get(name, 224)
        sides = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if not (sides and all(positive_int(side, MAX_PROCESSOR_SIDE) for side in sides)):
            raise refuse(
                name, f'sizes in pixels from 1 to {MAX_PROCESSOR_SIDE} (e.g. {{"height": 224, ...}})'
            )
    filters = {int(r) for r in Image.Resampling}
    resample = given.get("resample", 2)
    if not (type(resample) is int and resample in filters):  # not a bool, nor a float equal to one
        raise refuse("resample", f"a PIL resampling filter, 0 to {max(filters)} (2 is bilinear)")
    if not finite_number(given.get("rescale_factor", 1)):
        raise refuse("rescale_factor", "a finite number (1/255 for 8-bit frames)")
    for name in ("image_mean", "image_std"):
        value = given.get(name, [0.5] * 3)
        if not (isinstance(value, list) and len(value) == 3 and all(map(finite_number, value))):
            raise refuse(name, "a list of 3 finite numbers, one per RGB channel")
        if name == "image_std" and 0 in value:
            raise refuse(name, "nonzero in every channel")


def _present(path: Path) -> bool:
    """Whether anything is at `path`, even a broken link."""
    return path.exists() or path.is_symlink()
