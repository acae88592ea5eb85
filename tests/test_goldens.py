"""Goldens converted through the CLI, loaded with from_pretrained, compared with the ORIGINAL's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import XCLIPModel

from converter.cli import main
from tests import helpers

LOGITS_ATOL = 1e-4
EMBEDS_ATOL = 1e-4


@pytest.mark.parametrize("case", list(helpers.CASES))
def test_golden_through_cli(case, tmp_path, record_property, capsys):
    output = tmp_path / "out"
    config = helpers.write_config(case, tmp_path / "config")
    assert (
        main(
            ["--checkpoint", str(helpers.checkpoint(case)), "--config", str(config), "--output", str(output)]
        )
        == 0
    )
    assert "verification OK" in capsys.readouterr().out

    model, info = XCLIPModel.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixel_values, input_ids = helpers.inputs(case)
    with torch.no_grad():
        out = model.eval()(input_ids=input_ids, pixel_values=pixel_values)
    want = helpers.expected(case)
    deltas = {
        "logits": np.abs(out.logits_per_video.numpy() - want["logits"]).max(),
        "video_embeds": np.abs(out.video_embeds.numpy() - want["video_embeds_normalized"]).max(),
        "text_embeds": np.abs(out.text_embeds.numpy() - want["text_embeds_normalized"]).max(),
    }
    record_property("max_abs_delta", {k: float(v) for k, v in deltas.items()})
    print(case, {k: f"{v:.2e}" for k, v in deltas.items()})
    assert deltas["logits"] <= LOGITS_ATOL
    assert deltas["video_embeds"] <= EMBEDS_ATOL and deltas["text_embeds"] <= EMBEDS_ATOL
