"""Load an original X-CLIP checkpoint safely: weights only, never code from the file.

torch's zip or legacy format or safetensors, told apart by content whatever the file is named; the
training saver's dict (`{'model': sd, ..., 'config'}`), `{'state_dict': sd}` or a bare state dict,
`module.` prefixes stripped. Whatever else it holds is refused in one line naming what and where.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import mmap
import pickletools
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from converter.errors import ConverterError, escape, listed, reason
from converter.reader import file_format

StateDict = dict[str, torch.Tensor]


# The whole allow-list beyond torch's own weights-only defaults: the trainer's yacs `CfgNode` config is
# read as a plain OrderedDict (the weights-only unpickler allows SETITEM on exact dicts only); it runs
# nothing and needs no yacs.
ALLOWED_GLOBALS: list[tuple[object, str]] = [(OrderedDict, "yacs.config.CfgNode")]
_CONTAINER_KEYS = ("model", "state_dict")
_HF_KEY_PREFIXES = ("vision_model.", "text_model.", "visual_projection.", "mit.encoder.")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REFETCH = "if it came from the download cache, fetch it again with --force-download"
_RESAVE = "give a file that torch.save wrote (.pth) or a .safetensors file"
_NOT_A_CHECKPOINT = "it is not a checkpoint"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy (pre-1.6) format


def load_checkpoint(path: str | Path, *, check_values: bool = True) -> StateDict:
    """The original state dict in `path` (mmap-backed where it can be); `check_values=False` leaves
    `check_finite`, a pass over every byte, to the caller."""
    path = Path(path)
    if path.is_dir():
        raise ConverterError(
            f"checkpoint {escape(str(path))} is a folder: give the checkpoint file (.pth, .safetensors)"
        )
    if not path.is_file():
        raise ConverterError(f"checkpoint not found: {escape(str(path))}")
    state_dict = extract_state_dict(_load(path), path)
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
    state_dict = {key.removeprefix("module."): tensor for key, tensor in obj.items()}
    if len(state_dict) < len(obj):
        collided = [escape(k) for k in obj if f"module.{k}" in obj and not k.startswith("module.")]
        raise ConverterError(
            f"{where}: keys collide once the 'module.' prefix is removed: {', '.join(listed(collided, 5))} "
            "(each with and without it). Keep one of each pair"
        )
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


def check_finite(
    state_dict: Mapping[str, torch.Tensor], source: str | Path = "<checkpoint>", advice: str = _REFETCH
) -> None:
    """Refuse NaN and inf, naming each tensor; reads every value, so the pipeline runs it after the write."""
    if found := non_finite(state_dict):
        raise ConverterError(
            f"{escape(str(source))}: non-finite values (NaN or inf) in {len(found):,} tensors: "
            f"{', '.join(listed(found, 5))}. The weights are damaged; {advice}"
        )


def non_finite(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Each tensor holding NaN or inf, as 'key (count of size)'."""
    found = []
    for key, tensor in state_dict.items():
        # One sum is the cheap test (NaN and inf propagate); count only when it fails (an overflow does too).
        if not torch.isfinite(tensor.sum()) and (n := tensor.numel() - int(torch.isfinite(tensor).sum())):
            found.append(f"{escape(key)} ({n:,} of {tensor.numel():,})")
    return found


def _kind(tensor: torch.Tensor) -> str | None:
    """Why a tensor cannot be a weight, or None when it can."""
    if tensor.is_meta:
        return "a meta tensor without data"
    if tensor.is_nested:  # its layout reads as strided, but it has no single shape
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"sparse, {tensor.layout}"
    if tensor.is_quantized or tensor.device.type != "cpu":
        return f"{'quantized' if tensor.is_quantized else tensor.device.type} tensor"
    if tensor.dtype not in _FLOAT_DTYPES:
        return f"dtype {str(tensor.dtype).removeprefix('torch.')}"
    return None


def _load(path: Path) -> object:
    """The file's contents, weights only, or an error in our own words: torch's message advises
    `weights_only=False`, the opposite of this tool's promise."""
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as err:
        raise ConverterError(
            f"{escape(str(path))}: cannot read checkpoint ({err.strerror or reason(err)})"
        ) from None
    kind = file_format(head)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        with (
            torch.serialization.safe_globals(ALLOWED_GLOBALS),
            warnings.catch_warnings(),
            open(path, "rb") as file,
        ):
            # A plain pickle of protocol 3+ makes torch warn before it fails; the failure is explained.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # torch.load reads a path named *.safetensors as safetensors, an open file by its content.
            # mmap keeps the file's pages out of anonymous memory; it needs the path, and the zip format.
            by_path = path.suffix != ".safetensors"
            source = path if by_path else file
            return torch.load(source, map_location="cpu", weights_only=True, mmap=by_path and kind == "zip")
    except Exception as err:  # noqa: BLE001 - torch raises many types; we explain in our own words
        if kind != "safetensors" and (refused := _refused_globals(path)):
            raise ConverterError(
                f"{escape(str(path))}: refused to load: the file references Python objects outside the "
                f"allow-list: {', '.join(listed(refused, 10))}. Checkpoints are loaded weights-only and code "
                "from them is never run; re-save the file as a plain state dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from None
        what = _what_is_wrong(path, head, err)
        advice = _RESAVE if what.startswith(_NOT_A_CHECKPOINT) else _REFETCH
        raise ConverterError(f"{escape(str(path))}: cannot read checkpoint: {what}; {advice}") from None


def _refused_globals(path: Path) -> list[str]:
    """Every global the file's pickles reference beyond the allow-list and torch's own rebuild functions
    and storages (what weights-only loading is built from)."""
    try:
        if zipfile.is_zipfile(path):
            with _open_zip(path) as archive:
                records = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        else:
            records = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile):  # unreadable: reported as such by the caller
        return []
    found: set[str] = set()
    for data in records:
        for ops in _pickles(io.BytesIO(data)):
            strings: list[str] = []
            for opcode, arg, _ in ops:
                if opcode.name == "GLOBAL":
                    found.add(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    allowed = {name for _, name in ALLOWED_GLOBALS}
    return sorted(g for g in found if g not in allowed and not g.startswith(("torch.", "collections.")))


def _open_zip(path: Path) -> zipfile.ZipFile:
    """The zip archive at `path`, refused (BadZipFile) unless reading its entries by name, as `read` and
    `testzip` do, unpacks at most the file's size: torch.save stores each entry once, uncompressed. A zip
    bomb, or a central directory listing one entry over and over, would unpack without bound."""
    archive = zipfile.ZipFile(path)
    unpacked = sum(archive.getinfo(name).file_size for name in archive.namelist())
    if unpacked > (size := path.stat().st_size):
        archive.close()
        raise zipfile.BadZipFile(f"its entries unpack to {unpacked:,} bytes, more than the file's {size:,}")
    return archive


def _what_is_wrong(path: Path, head: bytes, err: BaseException) -> str:
    if not head:
        return "the file is empty"
    if (kind := file_format(head)) == "html":
        return "it is a web page (HTML), not a checkpoint"
    if kind == "safetensors":
        return f"it is not a valid safetensors file ({reason(err)})"
    if kind == "zip" and not zipfile.is_zipfile(path):
        return "it is a zip archive (PyTorch's format) whose end is missing: the file was cut short"
    if kind == "zip":
        try:
            with _open_zip(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    return f"{_NOT_A_CHECKPOINT}: a zip archive without the data.pkl that torch.save writes"
                damaged = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            return f"it is a damaged zip archive ({reason(err)})"
        if damaged is not None:
            return f"it is a damaged zip archive: {escape(damaged)} fails its checksum"
        return "it is a PyTorch zip archive whose contents are not plain tensors and containers"
    if kind != "pickle":
        return f"{_NOT_A_CHECKPOINT}: neither a PyTorch zip archive or pickle nor a safetensors file"
    # A legacy file: its magic number, then four more pickles. Mapped, not buffered: a length field claiming
    # more bytes than the file holds reads what is there, where a buffered read would allocate the claim.
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as stream:
        pickles = list(itertools.islice(_pickles(stream), 5))
        parsed = stream.tell()
    if pickles and _LEGACY_MAGIC not in (arg for _, arg, _ in pickles[0]):
        return f"{_NOT_A_CHECKPOINT}: a plain pickle (protocol {head[1]}) weights-only loading cannot read"
    if len(pickles) == 5:
        return "the tensor data after its pickled structure is cut short or damaged"
    if parsed < path.stat().st_size:
        return f"its pickled data is damaged at byte {parsed:,}"
    return "it ends in the middle of its pickled data: the file was cut short"


def _pickles(stream: BinaryIO) -> Iterator[list[tuple]]:
    """Each pickle in a row in `stream` as its opcodes, read without unpickling them; stops at the first
    that does not parse (torch's legacy format has five, then the tensors' bytes)."""
    with contextlib.suppress(ValueError):
        while True:
            yield list(pickletools.genops(stream))
