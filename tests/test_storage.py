"""Storage round-trips on local paths, file:// and s3:// (a real S3-protocol server on loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from rayimg.config import StorageConfig
from rayimg.storage import Storage, StorageError, content_hash, join


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    storage = request.getfixturevalue("storage")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


def test_round_trip_and_listing(root):
    st = Storage()
    payloads = {"a.txt": b"alpha", "sub/b.bin": os.urandom(1000), "sub/deep/c.json": b"{}", "data2/x": b"x"}
    for rel, data in payloads.items():
        st.write_bytes(join(root, rel), data)
    for rel, data in payloads.items():
        assert st.read_bytes(join(root, rel)) == data
        assert st.exists(join(root, rel))
    assert not st.exists(join(root, "nope.txt"))
    # listing is recursive, sorted, and a prefix names a directory (sub != sub2)
    st.write_bytes(join(root, "sub2/y"), b"y")
    assert st.list(join(root, "sub")) == [join(root, "sub/b.bin"), join(root, "sub/deep/c.json")]
    assert st.list(root) == sorted(join(root, r) for r in [*payloads, "sub2/y"])
    infos = st.list_info(join(root, "sub"))
    assert [i.size for i in infos] == [1000, 2]
    # overwrite replaces the content and changes the listing hash
    before = content_hash(st.list_info(root))
    st.write_bytes(join(root, "a.txt"), b"alpha-2")
    assert st.read_bytes(join(root, "a.txt")) == b"alpha-2"
    assert content_hash(st.list_info(root)) != before
    st.delete(join(root, "a.txt"))
    assert not st.exists(join(root, "a.txt"))
    assert st.delete_prefix(join(root, "sub")) == 2
    assert st.list(join(root, "sub")) == []


def test_missing_object_names_the_uri(root):
    st = Storage()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        st.read_bytes(join(root, "missing.bin"))
    with pytest.raises(FileNotFoundError, match="no objects"):
        st.download_prefix(join(root, "empty"), "/tmp/never-written")


def test_upload_dir_and_download_prefix(root, tmp_path):
    st = Storage()
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text('{"_class_name": "X"}')
    (src / "unet" / "weights.safetensors").write_bytes(os.urandom(4096))
    written = st.upload_dir(src, join(root, "model"))
    assert written == [join(root, "model/model_index.json"), join(root, "model/unet/weights.safetensors")]
    dst = st.download_prefix(join(root, "model"), tmp_path / "dst")
    assert (dst / "model_index.json").read_text() == '{"_class_name": "X"}'
    assert (dst / "unet" / "weights.safetensors").read_bytes() == (src / "unet" / "weights.safetensors").read_bytes()
    # no temp files are left behind by the atomic copies
    assert sorted(p.name for p in dst.rglob("*")) == ["model_index.json", "unet", "weights.safetensors"]


def test_unsupported_scheme_and_missing_bucket(storage):
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.read_bytes("gs://bucket/key")
    with pytest.raises(StorageError, match="no bucket name"):
        storage.read_bytes("s3:///key")
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-xyz/key", b"x")


def test_config_endpoint_overrides_environment(s3_server, s3_bucket, monkeypatch):
    # A wrong endpoint in the environment is overridden by the one in config.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    st = Storage(StorageConfig(endpoint_url=s3_server, region="us-east-1", addressing_style="path"))
    st.write_bytes(f"s3://{s3_bucket}/k", b"v")
    assert st.read_bytes(f"s3://{s3_bucket}/k") == b"v"


def test_s3_multipart_upload_is_invisible_until_complete(storage, s3_bucket, tmp_path):
    s3 = storage.s3
    key = "big/object.bin"
    uri = f"s3://{s3_bucket}/{key}"
    part = os.urandom(5 * 2**20)
    mpu = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)
    etag = s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1, Body=part)["ETag"]
    # parts uploaded, upload not completed: readers see nothing
    assert not storage.exists(uri)
    assert storage.list(f"s3://{s3_bucket}/big") == []
    s3.complete_multipart_upload(Bucket=s3_bucket, Key=key, UploadId=mpu["UploadId"],
                                 MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]})
    assert storage.read_bytes(uri) == part


def test_s3_large_upload_goes_multipart(s3_server, s3_bucket, tmp_path):
    st = Storage(StorageConfig(multipart_threshold_mb=5))
    src = tmp_path / "big.bin"
    data = os.urandom(11 * 2**20)
    src.write_bytes(data)
    uri = f"s3://{s3_bucket}/big.bin"
    st.upload_file(src, uri)
    (info,) = st.list_info(uri.rsplit("/", 1)[0])
    assert re.fullmatch(r"[0-9a-f]{32}-[2-9]", info.tag), info.tag  # a completed multipart upload
    assert st.read_bytes(uri) == data


def test_local_write_killed_midway_leaves_old_content(tmp_path):
    """A writer killed mid-write never leaves a torn file: readers see the old bytes."""
    target = tmp_path / "out" / "latest.bin"
    st = Storage()
    st.write_bytes(str(target), b"old")
    child = textwrap.dedent(f"""
        import os
        from rayimg.storage import Storage
        data = os.urandom(1 << 20) * 400  # 400 MB: slow enough to be killed while writing
        Storage().write_bytes({str(target)!r}, data)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 60
    while time.time() < deadline:
        if any(p.name.endswith(".tmp") for p in target.parent.iterdir()):
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the writer never started its temp file")
    proc.kill()
    proc.wait()
    assert target.read_bytes() == b"old"
    # the interrupted temp file is not listed as an object
    assert st.list(str(tmp_path / "out")) == [str(target)]
