"""serving.jsonbody: JSON bodies whose base64 images are written without re-encoding."""

import base64
import json
import math

import pytest
from starlette.responses import JSONResponse

from serving.jsonbody import JSONBody, json_bytes


def test_same_bytes_as_starlette_for_plain_values():
    obj = {"prompt": "ein Bäcker, 東京, \"quoted\" \\ back\nslash \x00", "n": [1, 2.5, None, True], "nested": {"a": []}}
    assert json_bytes(obj) == JSONResponse(obj).body


def test_base64_bytes_become_strings():
    pngs = [bytes(range(256)) * 40, b"", b"\x89PNG"]
    obj = {"images": [{"b64_json": base64.b64encode(p), "seed": i} for i, p in enumerate(pngs)],
           "a1111": [base64.b64encode(p) for p in pngs], "note": "after"}
    body = json_bytes(obj)
    back = json.loads(body)
    assert [base64.b64decode(i["b64_json"]) for i in back["images"]] == pngs
    assert [base64.b64decode(i) for i in back["a1111"]] == pngs
    assert back["note"] == "after" and [i["seed"] for i in back["images"]] == [0, 1, 2]
    as_text = {"images": [{"b64_json": base64.b64encode(p).decode(), "seed": i} for i, p in enumerate(pngs)],
               "a1111": [base64.b64encode(p).decode() for p in pngs], "note": "after"}
    assert body == JSONResponse(as_text).body


def test_text_that_looks_like_a_placeholder_is_kept():
    # a placeholder is a NUL, a random nonce and an index: a client's text cannot stand in for one
    obj = {"prompt": "\x000123456789abcdef:0\x00", "b64_json": base64.b64encode(b"pixels")}
    back = json.loads(json_bytes(obj))
    assert back == {"prompt": "\x000123456789abcdef:0\x00", "b64_json": base64.b64encode(b"pixels").decode()}


@pytest.mark.parametrize("value", [b'abc"def', b"ab\\c", b"\xff\xfe", b"line\nbreak"])
def test_bytes_that_are_not_base64_are_refused(value):
    with pytest.raises(ValueError, match="base64"):
        json_bytes({"b64_json": value})


def test_what_json_cannot_hold_is_refused():
    with pytest.raises(ValueError):
        json_bytes({"x": math.nan})
    with pytest.raises(TypeError, match="set"):
        json_bytes({"x": {1, 2}})


def test_response_class():
    response = JSONBody({"images": [base64.b64encode(b"\x00\x01")]})
    assert response.media_type == "application/json" and response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {"images": ["AAE="]}
