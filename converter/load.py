"""Load an original X-CLIP checkpoint safely: weights only, never code from the file.

Accepted files: `.pth`/`.pt`/`.bin` (torch zip or legacy pickle) and `.safetensors`.
Accepted layouts: the training saver's dict (`{'model': sd, 'optimizer', ..., 'config'}`),
`{'state_dict': sd}`, or a bare state dict; an optional `module.` prefix (DataParallel) is removed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from converter.errors import ConverterError

StateDict = dict[str, torch.Tensor]

# The original training code stores its yacs `CfgNode` config in the checkpoint. The weights-only
# unpickler only allows SETITEM on exact dict/OrderedDict, so a stand-in that *becomes* an
# OrderedDict (via __new__) is the one way to read such files without yacs and without
# executing anything: it builds plain data and nothing else.


class _CfgNodeStandIn:
    def __new__(cls, *args: object, **kwargs: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# The whole allow-list beyond torch's own weights-only defaults.
ALLOWED_GLOBALS: list[tuple[object, str]] = [(_CfgNodeStandIn, "yacs.config.CfgNode")]
_CONTAINER_KEYS = ("model", "state_dict")
_HF_KEY_PREFIXES = ("vision_model.", "text_model.", "visual_projection.", "mit.encoder.")


def load_checkpoint(path: str | Path) -> StateDict:
    """Return the original state dict stored in `path` (tensors may be mmap-backed views)."""
    path = Path(path)
    if not path.is_file():
        raise ConverterError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        obj: object = _load_safetensors(path)
    else:
        obj = _load_torch(path)
    return extract_state_dict(obj, path)


def extract_state_dict(obj: object, source: str | Path = "<checkpoint>") -> StateDict:
    """Find the model's state dict in a loaded checkpoint object and normalise its keys."""
    if not isinstance(obj, Mapping):
        raise ConverterError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ConverterError(
            f"{source}: not a state dict: entries {non_tensors[:5]} are not tensors "
            f"(expected a bare state dict or one under {' / '.join(map(repr, _CONTAINER_KEYS))})"
        )
    if not obj:
        raise ConverterError(f"{source}: the state dict is empty")
    state_dict = {_strip_module_prefix(k): v for k, v in obj.items()}
    if any(k.startswith(_HF_KEY_PREFIXES) for k in state_dict):
        raise ConverterError(
            f"{source}: this looks like an already converted transformers checkpoint "
            "(keys like 'vision_model.…'); load it with XCLIPModel.from_pretrained instead"
        )
    return state_dict


def _strip_module_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from None


def _load_torch(path: Path) -> object:
    # mmap keeps the file's pages out of anonymous memory; only the zip format supports it.
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = _unsafe_globals(path)
        if refused:
            raise ConverterError(
                f"{path}: refused to load: the file references Python objects outside the allow-list: "
                f"{', '.join(refused)}. Checkpoints are loaded weights-only and code from them is never "
                "run; re-save the file as a plain state dict (torch.save(model.state_dict(), ...)) "
                "or as .safetensors"
            ) from None
        raise _unreadable(path, err) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise _unreadable(path, err) from None


def _unsafe_globals(path: Path) -> list[str]:
    allowed = {name for _, name in ALLOWED_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a corrupt archive: the caller reports it as unreadable
        return []
    return sorted(g for g in found if g not in allowed)


def _unreadable(path: Path, err: BaseException) -> ConverterError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConverterError(
        f"{path}: cannot read checkpoint ({reason}). The file may be truncated or corrupt; "
        "if it came from the download cache, fetch it again with --force-download"
    )
