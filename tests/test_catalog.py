"""Catalog rows -> validated settings: defaults, limits, adapters, seeds."""

from __future__ import annotations

import pytest

from rayimg.config import GenerationConfig, LimitsConfig
from rayimg.render.catalog import AdapterRef, RowError, derived_seed, normalize_row, parse_adapters, row_id

D = GenerationConfig(steps=20, width=64, height=64)
L = LimitsConfig(max_width=512, max_height=512, max_steps=50)


def test_defaults_fill_missing_fields():
    s = normalize_row({"prompt": "a cat", "seed": 3}, D, L)
    assert (s["width"], s["height"], s["steps"], s["scheduler"], s["seed"], s["adapters"]) == (64, 64, 20, "euler", 3, [])
    s = normalize_row({"prompt": "a cat", "width": 128.0, "steps": "10", "guidance": 4, "scheduler": "ddim"}, D, L)
    assert (s["width"], s["steps"], s["guidance_scale"], s["scheduler"]) == (128, 10, 4.0, "ddim")


@pytest.mark.parametrize("row, reason", [
    ({}, "missing prompt"),
    ({"prompt": "  "}, "missing prompt"),
    ({"prompt": "x", "width": 100}, "not a positive multiple of 8"),
    ({"prompt": "x", "height": 1024}, "above the maximum 512"),
    ({"prompt": "x", "steps": 0}, "steps must be > 0"),
    ({"prompt": "x", "steps": 51}, "above the maximum 50"),
    ({"prompt": "x", "scheduler": "heun"}, "unknown scheduler 'heun'"),
    ({"prompt": "x", "seed": -1}, "seed must be"),
    ({"prompt": "x", "adapters": [{"name": "../etc"}]}, "not valid"),
    ({"prompt": "x", "adapters": "a:lots"}, "scale must be a number"),
    ({"prompt": "x", "adapters": ["a", "a"]}, "listed twice"),
    ({"prompt": "x", "guidance_scale": "high"}, "must be a number"),
])
def test_bad_rows_name_the_reason(row, reason):
    with pytest.raises(RowError, match=reason):
        normalize_row(row, D, L)


def test_adapter_forms():
    want = [AdapterRef("a", "2", 0.8), AdapterRef("b", None, 1.0)]
    assert parse_adapters("a@2:0.8,b") == want
    assert parse_adapters('[{"name": "a", "version": 2, "scale": 0.8}, {"name": "b"}]') == want
    assert parse_adapters([{"name": "a", "version": "2", "scale": 0.8}, "b"]) == want
    assert parse_adapters(None) == [] and parse_adapters("") == []


def test_seed_and_id_come_from_the_row_itself():
    row = {"prompt": "a cat", "steps": 10}
    assert derived_seed(row) == derived_seed(dict(row)) != derived_seed({"prompt": "a dog", "steps": 10})
    assert normalize_row(row, D, L)["seed"] == derived_seed(row)
    assert row_id({"id": 7, "prompt": "x"}) == "7"
    assert row_id(row) == row_id(dict(reversed(list(row.items())))) != row_id({"prompt": "a dog"})
