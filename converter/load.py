"""Load an original X-CLIP checkpoint safely: weights only, never code from the file.

Files: `.pth`/`.pt`/`.bin` (torch's zip or legacy format) and `.safetensors`. Containers: the
training saver's dict (`{'model': sd, 'optimizer', ..., 'config'}`), `{'state_dict': sd}` or a bare
state dict, with an optional `module.` prefix (DataParallel). Refused, naming what and where: pickled
objects outside the allow-list, keys that are not strings or collide without the prefix, tensors that
are not real floating-point, dense and on the CPU, and non-finite values.
"""

from __future__ import annotations

import io
import pickletools
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from converter.errors import ConverterError, escape, listed, reason

StateDict = dict[str, torch.Tensor]


class _CfgNodeStandIn:
    """The training code's yacs `CfgNode` config, read as a plain OrderedDict: the weights-only
    unpickler allows SETITEM on exact dicts only, and this runs nothing and needs no yacs."""

    def __new__(cls, *args: object, **kwargs: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# The whole allow-list beyond torch's own weights-only defaults.
ALLOWED_GLOBALS: list[tuple[object, str]] = [(_CfgNodeStandIn, "yacs.config.CfgNode")]
_CONTAINER_KEYS = ("model", "state_dict")
_HF_KEY_PREFIXES = ("vision_model.", "text_model.", "visual_projection.", "mit.encoder.")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REFETCH = "if it came from the download cache, fetch it again with --force-download"
_RESAVE = "give a file that torch.save wrote (.pth) or a .safetensors file"
_NOT_A_CHECKPOINT = "it is not a checkpoint"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy (pre-1.6) format


def load_checkpoint(path: str | Path, *, check_values: bool = True) -> StateDict:
    """The original state dict stored in `path` (tensors may be mmap-backed views).
    `check_values=False` leaves `check_finite` (a pass over every byte) to the caller."""
    path = Path(path)
    if path.is_dir():
        raise ConverterError(
            f"checkpoint {escape(str(path))} is a folder: give the checkpoint file (.pth, .safetensors)"
        )
    if not path.is_file():
        raise ConverterError(f"checkpoint not found: {escape(str(path))}")
    obj = _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path)
    state_dict = extract_state_dict(obj, path)
    check_kinds(state_dict, path)
    if check_values:
        check_finite(state_dict, path)
    return state_dict


def extract_state_dict(obj: object, source: str | Path = "<checkpoint>") -> StateDict:
    """Find the model's state dict in a loaded checkpoint object and strip the `module.` prefix."""
    where = escape(str(source))
    if not isinstance(obj, Mapping):
        raise ConverterError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    obj = next((obj[key] for key in _CONTAINER_KEYS if isinstance(obj.get(key), Mapping)), obj)
    if not_strings := [repr(k) for k in obj if not isinstance(k, str)]:
        raise ConverterError(
            f"{where}: state-dict keys must be strings, found {', '.join(listed(not_strings, 5))}"
        )
    if non_tensors := [escape(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]:
        raise ConverterError(
            f"{where}: not a state dict: entries {', '.join(listed(non_tensors, 5))} are not tensors "
            f"(expected a bare state dict or one under {' / '.join(map(repr, _CONTAINER_KEYS))})"
        )
    if not obj:
        raise ConverterError(f"{where}: the state dict is empty")
    if collisions := [
        f"{escape(k)!r} and 'module.{escape(k)}'"
        for k in obj
        if f"module.{k}" in obj and not k.startswith("module.")
    ]:
        raise ConverterError(
            f"{where}: keys collide once the 'module.' prefix is removed: "
            f"{'; '.join(listed(collisions, 5))}. Keep one of each pair"
        )
    state_dict = {key.removeprefix("module."): tensor for key, tensor in obj.items()}
    if any(k.startswith(_HF_KEY_PREFIXES) for k in state_dict):
        raise ConverterError(
            f"{where}: this looks like an already converted transformers checkpoint "
            "(keys like 'vision_model.…'); load it with XCLIPModel.from_pretrained instead"
        )
    return state_dict


def check_kinds(state_dict: Mapping[str, torch.Tensor], source: str | Path = "<checkpoint>") -> None:
    """Refuse what is not a real floating-point dense CPU tensor (reads no values)."""
    if unusable := [f"{escape(k)} ({_kind(t)})" for k, t in state_dict.items() if _kind(t)]:
        raise ConverterError(
            f"{escape(str(source))}: {len(unusable):,} tensors are not real floating-point weights: "
            f"{', '.join(listed(unusable, 5))}. An original X-CLIP checkpoint holds float32 tensors only"
        )


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str | Path = "<checkpoint>") -> None:
    """Refuse NaN and inf, naming each tensor with its count (a NaN makes every output NaN). Reads
    every value, so the pipeline runs it after the weight write has paged the checkpoint in."""
    non_finite = [
        f"{escape(k)} ({n:,} of {t.numel():,})" for k, t in state_dict.items() if (n := _non_finite(t))
    ]
    if non_finite:
        raise ConverterError(
            f"{escape(str(source))}: non-finite values (NaN or inf) in {len(non_finite):,} tensors: "
            f"{', '.join(listed(non_finite, 5))}. The checkpoint is damaged; {_REFETCH}"
        )


def _kind(tensor: torch.Tensor) -> str | None:
    """Why a tensor cannot be a weight, or None when it can."""
    if tensor.is_meta:
        return "a meta tensor without data"
    if tensor.layout != torch.strided:
        return f"sparse, {tensor.layout}"
    if tensor.is_quantized or tensor.device.type != "cpu":
        return f"{'quantized' if tensor.is_quantized else tensor.device.type} tensor"
    if tensor.dtype not in _FLOAT_DTYPES:
        return f"dtype {str(tensor.dtype).removeprefix('torch.')}"
    return None


def _non_finite(tensor: torch.Tensor) -> int:
    # One summing pass is the cheap test (NaN and inf propagate); count exactly only when it fails,
    # which a sum that merely overflows also does.
    if torch.isfinite(tensor.sum()):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from None


def _load_torch(path: Path) -> object:
    # mmap keeps the file's pages out of anonymous memory; only the zip format supports it.
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
            # A plain pickle of protocol 3+ makes torch warn before it fails; the failure is explained.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - torch raises many types; we explain in our own words
        # torch's message advises `weights_only=False`, the opposite of this tool's promise: never relay it.
        if refused := _refused_globals(path):
            raise ConverterError(
                f"{escape(str(path))}: refused to load: the file references Python objects outside the "
                f"allow-list: {', '.join(listed(refused, 10))}. Checkpoints are loaded weights-only and code "
                "from them is never run; re-save the file as a plain state dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from None
        raise _unreadable(path, err) from None


def _pickles(stream: BinaryIO) -> Iterator[list[tuple]]:
    """The opcodes of each pickle in a row in `stream`, read without unpickling (torch's legacy format
    is five, then the tensors' bytes; a plain pickle is one); ValueError where one does not parse."""
    while True:
        yield list(pickletools.genops(stream))


def _refused_globals(path: Path) -> list[str]:
    """Every global the file's pickles reference (the zip format's .pkl records, the legacy format's
    pickles, a raw pickle) that neither the allow-list nor torch's weights-only defaults cover."""
    allowed = {name for _, name in ALLOWED_GLOBALS} | {
        f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1]
        for g in torch.serialization.get_safe_globals()
    }
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                records = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        else:
            records = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile):  # unreadable: reported as such by the caller
        return []
    found = {name for data in records for name in _globals(io.BytesIO(data))}
    # torch's own rebuild functions and storages are what weights-only loading is built from.
    return sorted(g for g in found if g not in allowed and not g.startswith(("torch.", "collections.")))


def _globals(stream: BinaryIO) -> Iterator[str]:
    """The GLOBAL and STACK_GLOBAL references of the pickles in `stream`, up to one that does not parse."""
    try:
        for ops in _pickles(stream):
            strings: list[str] = []
            for opcode, arg, _ in ops:
                if opcode.name == "GLOBAL":
                    yield str(arg).replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    yield f"{strings[-2]}.{strings[-1]}"
                elif isinstance(arg, str):
                    strings.append(arg)
    except ValueError:  # the end of the pickles
        return


def _unreadable(path: Path, err: BaseException) -> ConverterError:
    """Why `path` cannot be read, in words found by looking at the file (never torch's message,
    which names internals and advises loading unsafely)."""
    what = _what_is_wrong(path, err)
    advice = _RESAVE if what.startswith(_NOT_A_CHECKPOINT) else _REFETCH
    return ConverterError(f"{escape(str(path))}: cannot read checkpoint: {what}; {advice}")


def _what_is_wrong(path: Path, err: BaseException) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    if not head:
        return "the file is empty"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "it is a web page (HTML), not a checkpoint"
    if path.suffix == ".safetensors":
        return f"it is not a valid safetensors file ({reason(err)})"
    if head.startswith(b"PK\x03\x04"):
        return _what_is_wrong_in_zip(path)
    if head.startswith(b"\x80"):  # pickle protocol 2 or later: torch's legacy format or a plain pickle
        return _what_is_wrong_in_pickles(path, protocol=head[1])
    return f"{_NOT_A_CHECKPOINT}: neither a PyTorch zip archive or pickle nor a safetensors file"


def _what_is_wrong_in_zip(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        return "it is a zip archive (PyTorch's format) whose end is missing: the file was cut short"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return f"{_NOT_A_CHECKPOINT}: a zip archive without the data.pkl that torch.save writes"
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"it is a damaged zip archive ({reason(err)})"
    if damaged is not None:
        return f"it is a damaged zip archive: {escape(damaged)} fails its checksum"
    return "it is a PyTorch zip archive whose contents are not plain tensors and containers"


def _what_is_wrong_in_pickles(path: Path, protocol: int) -> str:
    with open(path, "rb") as stream:
        pickles = _pickles(stream)
        try:
            first = next(pickles)
            if not any(op.name in ("LONG1", "LONG4") and arg == _LEGACY_MAGIC for op, arg, _ in first):
                return (
                    f"{_NOT_A_CHECKPOINT}: a plain pickle (protocol {protocol}) holding what weights-only "
                    "loading cannot read"
                )
            for _ in range(4):  # protocol version, system info, the state dict's structure, storage keys
                next(pickles)
        except ValueError:
            if stream.tell() >= path.stat().st_size:
                return "it ends in the middle of its pickled data: the file was cut short"
            return f"its pickled data is damaged at byte {stream.tell():,}"
    return (
        "the tensor data after its pickled structure is incomplete or damaged (a cut-short or corrupt file)"
    )
