"""The bounded reader (`converter.reader`) and the checks built on it: config fields by type and range,
config fields against the weights, the shard index, the image processor's settings and the tokenizer
files. Bad inputs through `main()` are in tests/test_bad_inputs.py; here are the bounds themselves,
and proof that every real file the converter meets stays far inside them."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from converter import reader
from converter.config import (
    FIELDS,
    LIMITS,
    check_config_values,
    check_fits_weights,
    hyper_for_variant,
    load_config_file,
    to_config,
)
from converter.errors import ConverterError
from converter.published import (
    MAX_PROCESSOR_SIDE,
    TOKENIZER_FILES,
    check_image_processor,
    load_published,
    read_image_processor,
)
from converter.reader import CONFIG_LIMIT, MAX_DEPTH, MAX_INT_DIGITS, MiB
from converter.registry import VARIANTS
from tests import helpers

# ---- the reader --------------------------------------------------------------------------------


def finishes(call: Callable[[], object], fifo: Path, seconds: float = 10) -> BaseException | None:
    """Run `call` (which must not open `fifo` for reading) in a thread; the exception it raised.

    Should it block on the FIFO, the test fails, and the FIFO is then opened for writing so that the
    blocked thread ends instead of keeping the suite from exiting."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:
            raised.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"blocked on the FIFO {fifo}")
    return raised[0] if raised else None


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    err = finishes(lambda: reader.read_json(fifo, "--config config.json"), fifo)
    assert isinstance(err, ConverterError)
    assert str(err) == "--config config.json is a FIFO, not a regular file: give a file"
    link = tmp_path / "link.json"
    link.symlink_to(fifo)  # links are followed, and what they lead to is checked
    err = finishes(lambda: reader.read_bytes(link, "link.json", CONFIG_LIMIT), fifo)
    assert isinstance(err, ConverterError) and "is a FIFO" in str(err)


@pytest.mark.parametrize(
    ("device", "kind"), [("/dev/zero", "character device"), ("/dev/null", "character device")]
)
def test_a_device_is_refused_unread(device, kind, monkeypatch):
    monkeypatch.setattr(os, "read", _never("os.read"))
    with pytest.raises(ConverterError, match=f"^{device} is a {kind}, not a regular file"):
        reader.read_json(Path(device), device)


def test_a_large_file_is_refused_by_its_size_unread(tmp_path, monkeypatch):
    big = tmp_path / "config.json"
    with open(big, "wb") as file:
        file.truncate(2 << 30)  # sparse: 2 GB that take no disk
    monkeypatch.setattr(os, "read", _never("os.read"))
    with pytest.raises(ConverterError) as refused:
        reader.read_json(big, "SRC: config.json")
    assert str(refused.value) == (
        "SRC: config.json is 2,147,483,648 bytes, more than the 4 MiB such a file may have: "
        "is it the right file?"
    )


def test_the_size_cap_is_exact(tmp_path):
    at = tmp_path / "at"
    at.write_bytes(b" " * (MiB - 2) + b"{}")
    assert reader.read_json(at, "at", MiB) == {}
    at.write_bytes(b" " * (MiB - 1) + b"{}")
    with pytest.raises(ConverterError, match="1,048,577 bytes, more than the 1 MiB"):
        reader.read_json(at, "at", MiB)


def test_a_file_that_grows_past_the_cap_while_read_is_refused_not_cut_short():
    """/proc files stat as 0 bytes, then read as many: like a file appended to after its size was
    checked. The byte read past the cap tells it; without it the first `limit` bytes would pass whole."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc")
    with pytest.raises(ConverterError, match="^status is 17 bytes, more than the 0 MiB"):
        reader.read_bytes(status, "status", 16)


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    """The path is a file when checked, a FIFO with no writer when opened: the open must not wait for a
    writer, and the check of what was opened refuses it."""
    path = tmp_path / "config.json"
    path.write_text("{}")
    checked = reader.check_regular

    def check_then_swap(target: Path | int, what: str) -> os.stat_result:
        info = checked(target, what)
        if not isinstance(target, int):
            path.unlink()
            os.mkfifo(path)
        return info

    monkeypatch.setattr(reader, "check_regular", check_then_swap)
    err = finishes(lambda: reader.read_json(path, "config.json"), path)
    assert isinstance(err, ConverterError)
    assert str(err) == "config.json is a FIFO, not a regular file: give a file"


def _never(name: str) -> Callable[..., object]:
    def called(*args: object) -> object:
        raise AssertionError(f"{name} was called: the file was read")

    return called


def test_nesting_is_capped(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert reader.read_json(path, "deep.json") == _nested(MAX_DEPTH)
    for depth in (MAX_DEPTH + 1, 100_000):  # the second is past the interpreter's recursion limit
        path.write_text('{"a": ' * depth + "1" + "}" * depth)
        with pytest.raises(ConverterError) as refused:
            reader.read_json(path, "deep.json")
        assert (
            str(refused.value)
            == f"deep.json: JSON nested more than {MAX_DEPTH} levels deep: not a config file"
        )


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_integers_are_bounded(tmp_path):
    path = tmp_path / "ints.json"
    largest = "9" * MAX_INT_DIGITS
    path.write_text(f'{{"a": {largest}, "b": -{largest}}}')
    assert reader.read_json(path, "ints.json") == {"a": int(largest), "b": -int(largest)}
    for digits in (MAX_INT_DIGITS + 1, 5000, 100_000):
        path.write_text(f'{{"a": {"9" * digits}}}')
        with pytest.raises(ConverterError, match=f"^ints.json: an integer of {digits:,} digits"):
            reader.read_json(path, "ints.json")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{", "cannot read JSON"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"[1, 2]", "expected a JSON object, found array"),
        (b'"text"', "expected a JSON object, found string"),
        (b"null", "expected a JSON object, found null"),
    ],
)
def test_not_a_json_object(tmp_path, content, words):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(ConverterError, match=f"^c.json: {words}"):
        reader.read_json_object(path, "c.json")


def test_a_folder_or_nothing(tmp_path):
    with pytest.raises(ConverterError, match="^F is a folder: give the file inside it$"):
        reader.read_json(tmp_path, "F")
    with pytest.raises(ConverterError, match="^N: no such file$"):
        reader.read_json(tmp_path / "none.json", "N")


def test_a_name_that_is_not_utf8_is_refused_before_it_is_read(tmp_path):
    """torch.load and safetensors cannot open it: said so, not misread as a file with foreign contents."""
    path = tmp_path / os.fsdecode(b"c\xff.pth")
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(ConverterError, match="^C: the path is not valid UTF-8, which torch and safetensors"):
        reader.check_regular(path, "C")


def test_values_are_shown_on_one_short_line():
    assert reader.shown("\x1b[2Kok\r\nfake") == "'\\x1b[2Kok\\r\\nfake'"
    assert len(reader.shown("x" * 10_000)) == 80


# ---- the files the converter writes fit the caps many times over -------------------------------


def test_real_files_are_far_inside_the_caps(tmp_path):
    """A converted folder's every small file (CLIP's tokenizer, the processor, the config) is read by
    the reader at a tenth of its cap, and passes every value check."""
    from converter.processor_files import build_processor_files

    folder = tmp_path / "converted"
    build_processor_files(folder, 336)
    helpers.write_config("tiny-a", folder)
    limits = {**TOKENIZER_FILES, "config.json": CONFIG_LIMIT, "preprocessor_config.json": CONFIG_LIMIT}
    limits["processor_config.json"] = CONFIG_LIMIT
    present = sorted(p.name for p in folder.iterdir())
    assert set(present) <= set(limits), present
    for name in present:
        assert (folder / name).stat().st_size * 10 < limits[name], name
        if name.endswith(".json"):
            reader.read_json(folder / name, name, limits[name])
    settings = read_image_processor(folder)
    assert settings is not None and settings["crop_size"] == {"height": 336, "width": 336}
    assert load_config_file(folder / "config.json").vision_config.image_size == 32


# ---- config fields by type and range -----------------------------------------------------------


def test_every_size_has_a_limit_above_every_published_variant():
    assert set(LIMITS) == {f.name for f in FIELDS}
    for variant in VARIANTS.values():
        hyper = hyper_for_variant(variant)
        for f in FIELDS:
            assert getattr(hyper, f.name) * 3 <= LIMITS[f.name], (variant.name, f.name)
        check_config_values(to_config(hyper).to_dict(), variant.name)  # no published config is refused


def test_every_variants_config_file_loads(tmp_path):
    for variant in VARIANTS.values():
        folder = tmp_path / variant.name
        to_config(hyper_for_variant(variant)).save_pretrained(folder)
        assert load_config_file(folder / "config.json").vision_config.image_size == variant.image_size


def _config(**changes: object) -> dict:
    data = to_config(helpers.UNEVEN).to_dict()
    for path, value in changes.items():
        *section, name = path.split("__")
        (data[section[0]] if section else data)[name] = value
    return data


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"vision_config__hidden_size": 10**9}, "vision_config.hidden_size must be at most 16,384"),
        ({"vision_config__mit_hidden_size": 10**9}, "vision_config.mit_hidden_size must be at most"),
        ({"text_config__vocab_size": 2**40}, "text_config.vocab_size must be at most 1,048,576"),
        ({"vision_config__num_frames": 1000}, "vision_config.num_frames must be at most 128"),
        (
            {"text_config__max_position_embeddings": 1},
            "text_config.max_position_embeddings must be at least 2",
        ),
        ({"vision_config__num_channels": True}, "vision_config.num_channels must be a positive integer"),
        (
            {"vision_config__num_channels": 65},
            "vision_config.num_channels must be a positive integer of at most",
        ),
        ({"text_config__hidden_act": "gelu_new_ish"}, "text_config.hidden_act must be an activation"),
        ({"text_config__hidden_act": ["quick_gelu"]}, "text_config.hidden_act must be an activation"),
        (
            {"vision_config__layer_norm_eps": 0},
            "vision_config.layer_norm_eps must be a number between 0 and 1",
        ),
        ({"vision_config__layer_norm_eps": float("nan")}, "vision_config.layer_norm_eps must be a number"),
        ({"vision_config__drop_path_rate": -0.1}, "vision_config.drop_path_rate must be a probability"),
        ({"prompt_projection_dropout": "0.1"}, "prompt_projection_dropout must be a probability"),
        ({"initializer_factor": float("inf")}, "initializer_factor must be a finite number"),
        (
            {"text_config__initializer_range": None, "prompt_alpha": False},
            "prompt_alpha must be a finite number",
        ),
    ],
)
def test_config_values_are_checked_by_type_and_range(changes, words):
    with pytest.raises(ConverterError, match=f"^CFG: {words}"):
        check_config_values(_config(**changes), "CFG")


def test_allowed_values_pass():
    check_config_values(
        _config(
            text_config__hidden_act="gelu",
            vision_config__layer_norm_eps=1e-6,
            prompt_alpha=0,
            initializer_factor=2,
        ),
        "CFG",
    )


def test_values_at_their_bounds_pass(tmp_path):
    """The bounds are inclusive where the messages say so: every size at exactly its limit, dropouts of
    0 and 1; and a patch as large as the image (one patch) is a model, not a refusal."""
    data = to_config(helpers.UNEVEN).to_dict()
    for f in FIELDS:
        for path in f.config_paths:
            *section, name = path.split(".")
            (data[section[0]] if section else data)[name] = f.limit
    check_config_values(data, "CFG")
    check_config_values(_config(vision_config__drop_path_rate=1, prompt_attention_dropout=0), "CFG")
    one_patch = dataclasses.replace(helpers.UNEVEN, image_size=32, patch_size=32)
    to_config(one_patch).save_pretrained(tmp_path)
    assert load_config_file(tmp_path / "config.json").vision_config.patch_size == 32


# ---- config fields against the weights ---------------------------------------------------------


def _weights(grid: int, patch: int, channels: int = 3) -> dict[str, torch.Tensor]:
    return {
        "vision_model.embeddings.position_embedding.weight": torch.zeros(grid * grid + 1, 4),
        "vision_model.embeddings.patch_embedding.weight": torch.zeros(4, channels, patch, patch),
    }


def test_image_size_must_be_patch_size_times_the_grid():
    b32 = dataclasses.replace(helpers.UNEVEN, image_size=224, patch_size=32)
    check_fits_weights(to_config(b32), _weights(7, 32), "CFG")
    with pytest.raises(ConverterError) as refused:  # 240 // 32 is also 7: no shape can tell
        check_fits_weights(to_config(dataclasses.replace(b32, image_size=240)), _weights(7, 32), "CFG")
    assert str(refused.value) == (
        "CFG: vision_config.image_size 240 is not vision_config.patch_size 32 × the 7×7 patch grid of the "
        "weights' position embedding: set image_size to 224"
    )


def test_num_channels_must_match_the_patch_embedding():
    config = to_config(helpers.UNEVEN)
    grid = helpers.UNEVEN.image_size // helpers.UNEVEN.patch_size
    check_fits_weights(config, _weights(grid, 8), "CFG")
    config.vision_config.num_channels = 1
    with pytest.raises(ConverterError, match="^CFG: vision_config.num_channels 1 does not match the 3 input"):
        check_fits_weights(config, _weights(grid, 8), "CFG")


# ---- a published folder: shards, processor, tokenizer ------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The golden tiny-a converted (verified) once: a folder as the tool writes it."""
    from converter.pipeline import convert_checkpoint

    root = tmp_path_factory.mktemp("converted")
    config = helpers.write_config("tiny-a", root / "cfg")
    convert_checkpoint(helpers.checkpoint("tiny-a"), config=config, output=root / "tiny-a")
    return root / "tiny-a"


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def _shard(folder: Path) -> dict[str, torch.Tensor]:
    """Split the folder's model.safetensors into two shards named by an index; the tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in halves.items():
        save_file({k: tensors[k] for k in names}, folder / name)
    weight_map = {k: name for name, names in halves.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tensors


def test_a_file_given_as_the_model_folder_is_called_a_file(converted, tmp_path):
    """A user who names the weights file instead of its folder is told so, not that a folder lacks files."""
    weights = _copy(converted, tmp_path / "model") / "model.safetensors"
    with pytest.raises(ConverterError) as err:
        load_published(weights)
    assert str(err.value) == f"{weights}: expected a converted model folder (with config.json), not a file"


def test_a_sharded_folder_loads(converted, tmp_path):
    folder = _copy(converted, tmp_path / "sharded")
    tensors = _shard(folder)
    published = load_published(folder)
    assert published.state_dict.keys() == tensors.keys()
    assert all(torch.equal(published.state_dict[k], v) for k, v in tensors.items())


def test_a_hub_snapshot_with_links_into_its_blobs_loads(converted, tmp_path, monkeypatch):
    """The HF cache keeps a snapshot's files as links into the repo's blobs folder: inside SOURCE."""
    from huggingface_hub import constants

    tensors = _shard(_copy(converted, tmp_path / "sharded"))
    repo = Path(constants.HF_HUB_CACHE) / "models--someone--sharded"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for n, file in enumerate(sorted((tmp_path / "sharded").iterdir())):
        file.rename(repo / "blobs" / f"blob{n}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{n}"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    published = load_published("someone/sharded")
    assert published.folder == snapshot and published.state_dict.keys() == tensors.keys()


@pytest.mark.parametrize(
    "settings",
    [
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "resample": 2},
        {"size": 224, "crop_size": [224, 224], "resample": 3, "do_resize": False},
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1},
        {"size": None, "crop_size": None, "image_mean": None},  # null: the processor's default
        {"crop_size": {"height": MAX_PROCESSOR_SIDE, "width": MAX_PROCESSOR_SIDE}},
    ],
)
def test_processor_settings_a_processor_accepts_pass(settings):
    check_image_processor(settings, "P")


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (
            {"crop_size": {"height": MAX_PROCESSOR_SIDE + 1, "width": 224}},
            "crop_size must be sizes in pixels",
        ),
        ({"size": {}}, "size must be sizes in pixels"),
        ({"size": [224, -1]}, "size must be sizes in pixels"),
        ({"size": {"shortest_edge": 224.0}}, "size must be sizes in pixels"),
        ({"resample": 9}, "resample must be a PIL resampling filter"),
        ({"resample": [2]}, "resample must be a PIL resampling filter"),
        ({"image_std": [0.2, 0.2]}, "image_std must be a list of 3 finite numbers"),
        ({"image_mean": [0.5, 0.5, float("inf")]}, "image_mean must be a list of 3 finite numbers"),
        ({"image_mean": [True, 0.5, 0.5]}, "image_mean must be a list of 3 finite numbers"),
        ({"do_normalize": 1}, "do_normalize must be true or false"),
    ],
)
def test_processor_settings_are_checked(settings, words):
    with pytest.raises(ConverterError, match=f"^P: {words}"):
        check_image_processor(settings, "P")


@pytest.mark.parametrize("resample", [True, 2.0])
def test_a_resample_filter_is_an_integer_not_a_bool_or_float(resample):
    """JSON's true and 2.0 are no filter numbers, though Python finds them equal to 1 and 2."""
    with pytest.raises(ConverterError, match="^P: resample must be a PIL resampling filter"):
        check_image_processor({"resample": resample}, "P")


def test_the_nested_processor_file_is_checked_too(converted, tmp_path):
    folder = _copy(converted, tmp_path / "nested")
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").unlink()
    bad = {**settings, "crop_size": {"height": 30000, "width": 30000}}
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": bad}))
    with pytest.raises(ConverterError, match="nested: processor_config.json: crop_size must be sizes"):
        read_image_processor(folder, "nested")
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "XCLIPProcessor"}))
    assert read_image_processor(folder, "nested") is None


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "merges.txt"])
def test_tokenizer_files_are_checked_before_transformers_reads_them(converted, tmp_path, name):
    folder = _copy(converted, tmp_path / "tok")
    published = load_published(folder)
    assert published.load_tokenizer()("a video")["input_ids"]
    (folder / name).unlink()
    os.mkfifo(folder / name)
    err = finishes(published.load_tokenizer, folder / name)
    assert isinstance(err, ConverterError) and str(err) == (
        f"{folder}: {name} is a FIFO, not a regular file: give a file"
    )


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json"])
def test_a_tokenizer_file_over_its_cap_is_refused_unread(converted, tmp_path, monkeypatch, name):
    """merges.txt and vocab.json are parsed by the tokenizers library, so only their size is checked:
    a file past the cap is refused before it is read."""
    folder = _copy(converted, tmp_path / "tok")
    with open(folder / name, "wb") as file:
        file.truncate(reader.TOKENIZER_LIMIT + 1)  # sparse: takes no disk
    monkeypatch.setattr(os, "read", _never("os.read"))
    with pytest.raises(ConverterError) as err:
        load_published(folder).load_tokenizer()
    assert str(err.value) == (
        f"{folder}: {name} is {reader.TOKENIZER_LIMIT + 1:,} bytes, more than the 64 MiB such a file may "
        "have: is it the right file?"
    )


def test_a_deep_tokenizer_config_is_one_line(converted, tmp_path):
    folder = _copy(converted, tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(ConverterError, match="tokenizer_config.json: JSON nested more than 64 levels"):
        load_published(folder).load_tokenizer()
