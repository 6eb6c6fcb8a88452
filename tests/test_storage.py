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


def test_read_head_gives_the_first_bytes(root):
    st = Storage()
    data = os.urandom(100_000)
    st.write_bytes(join(root, "big.bin"), data)
    assert st.read_head(join(root, "big.bin"), 10) == data[:10]
    assert st.read_head(join(root, "big.bin"), 1 << 16) == data[:1 << 16]
    assert st.read_head(join(root, "big.bin"), 200_000) == data  # shorter than asked: all of it
    assert st.read_head(join(root, "big.bin"), 0) == b""
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        st.read_head(join(root, "missing.bin"), 10)


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


@pytest.fixture
def recording_s3(s3_server):
    """A second loopback S3 endpoint (moto, sharing the session server's buckets) that records,
    for every request, the access key and region it was signed with, the Host header, the path
    and the client (user agent)."""
    import threading

    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    seen = []

    def recording(environ, start_response):
        signed = re.search(r"Credential=([^/]+)/\d+/([^/]+)/s3/", environ.get("HTTP_AUTHORIZATION", ""))
        seen.append({"key": signed and signed.group(1), "region": signed and signed.group(2), "host": environ.get("HTTP_HOST"),
                     "path": environ.get("PATH_INFO"), "agent": environ.get("HTTP_USER_AGENT", "")})
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, recording, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_port}", seen  # a host name: virtual-hosted addressing would show in Host
    server.shutdown()
    thread.join()


def test_boto3_and_arrow_use_the_same_profile_endpoint_and_addressing(recording_s3, s3_bucket, tmp_path, monkeypatch):
    """Storage (boto3) and arrow_filesystem (Ray Data, Ray Train checkpoints) read and write
    through one named profile whose keys and region exist only in a temporary AWS config: every
    request of both clients is signed with those keys for that region, goes to the configured
    endpoint and names the bucket in the path."""
    from rayimg.storage import arrow_filesystem, s3_settings

    endpoint, seen = recording_s3
    (tmp_path / "config").write_text("[profile rayimg-test]\nregion = eu-west-3\n")
    (tmp_path / "credentials").write_text("[rayimg-test]\naws_access_key_id = AKIAPROFILEONLY\n"
                                          "aws_secret_access_key = profile-only-secret\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    cfg = StorageConfig(endpoint_url=endpoint, profile="rayimg-test", addressing_style="path")

    settings = s3_settings(cfg)
    assert (settings.endpoint_url, settings.region, settings.addressing_style, settings.access_key) == (
        endpoint, "eu-west-3", "path", "AKIAPROFILEONLY")
    st = Storage(cfg)
    st.write_bytes(f"s3://{s3_bucket}/from-boto3.txt", b"boto3")
    fs, path = arrow_filesystem(cfg, f"s3://{s3_bucket}/from-arrow.txt")
    assert path == f"{s3_bucket}/from-arrow.txt"
    with fs.open_output_stream(path) as f:
        f.write(b"arrow")
    with fs.open_input_stream(f"{s3_bucket}/from-boto3.txt") as f:
        assert f.read() == b"boto3"
    assert st.read_bytes(f"s3://{s3_bucket}/from-arrow.txt") == b"arrow"

    agents = {"boto3" if "Boto3" in r["agent"] else "arrow" if "aws-sdk-cpp" in r["agent"] else r["agent"] for r in seen}
    assert agents == {"boto3", "arrow"}
    for request in seen:
        assert (request["key"], request["region"]) == ("AKIAPROFILEONLY", "eu-west-3"), request
        assert request["host"] == endpoint.removeprefix("http://") and request["path"].startswith(f"/{s3_bucket}"), request


def test_s3_settings_fall_back_to_the_aws_environment(monkeypatch, tmp_path):
    from rayimg.storage import s3_settings

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    env = s3_settings(None)
    assert (env.endpoint_url, env.region, env.addressing_style, env.access_key) == ("http://127.0.0.1:9", "ap-south-1", "path", "AKIAENV")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    aws = s3_settings(StorageConfig(region="eu-central-1"))
    assert (aws.endpoint_url, aws.region, aws.addressing_style) == (None, "eu-central-1", "virtual")
    assert s3_settings(StorageConfig(addressing_style="path")).arrow_filesystem().__reduce__()[1][0]["endpoint_override"] == \
        "s3.ap-south-1.amazonaws.com"


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


def test_remove_partial_writes_deletes_only_temp_files(tmp_path):
    from rayimg.storage import Storage

    st = Storage()
    st.write_bytes(str(tmp_path / "out" / "images" / "a.png"), b"png")
    (tmp_path / "out" / "images" / ".b.png.x1y2.tmp").write_bytes(b"half")
    (tmp_path / "out" / ".manifest.parquet.z9.tmp").write_bytes(b"half")
    assert st.remove_partial_writes(str(tmp_path / "out")) == 2
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["a.png", "images"]
    assert st.remove_partial_writes(str(tmp_path / "missing")) == 0


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_local_files_get_the_umask_mode(umask, tmp_path, storage, s3_bucket):
    """Every way Storage creates a local file gives it 0o666 & ~umask (0644 under 022, 0664
    under 002), like any tool that calls open(); reading the umask leaves it unchanged."""
    from rayimg.storage import current_umask

    assert current_umask() == umask and os.umask(umask) == umask  # read, not changed
    want = 0o666 & ~umask
    st = Storage()
    st.write_bytes(str(tmp_path / "a" / "written.bin"), b"x")
    st.write_text("file://" + str(tmp_path / "a" / "text.json"), "{}")
    (tmp_path / "src.bin").write_bytes(b"src")
    st.upload_file(tmp_path / "src.bin", str(tmp_path / "a" / "uploaded.bin"))
    st.download_file(str(tmp_path / "src.bin"), tmp_path / "a" / "copied.bin")
    st.write_bytes(f"s3://{s3_bucket}/obj.bin", b"s3")
    st.download_file(f"s3://{s3_bucket}/obj.bin", tmp_path / "a" / "downloaded.bin")
    st.download_prefix(f"s3://{s3_bucket}", tmp_path / "mirror")
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "src.bin"]
    assert len(files) == 6
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(want) for p in files}
    # an existing file replaced by a write gets the same mode
    os.chmod(tmp_path / "a" / "written.bin", 0o600)
    st.write_bytes(str(tmp_path / "a" / "written.bin"), b"y")
    assert (tmp_path / "a" / "written.bin").stat().st_mode & 0o777 == want


def test_umask_is_read_per_write_from_any_thread(tmp_path):
    """The mode follows the umask at write time, also for writes from worker threads."""
    from concurrent.futures import ThreadPoolExecutor

    st = Storage()
    old = os.umask(0o002)
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: st.write_bytes(str(tmp_path / f"{i}.bin"), b"x"), range(16)))
        assert os.umask(0o002) == 0o002
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o664)}


def test_model_cache_follows_the_umask(tmp_path):
    """The model cache a job fills (the built tiny model's folder, the content-hash memo) gets
    the umask's modes like the files Storage writes, not the 0700/0600 of temp folders and files."""
    from rayimg.config import ModelConfig
    from rayimg.models.loader import model_id_and_hash
    from rayimg.models.tiny import ensure_tiny

    old = os.umask(0o002)
    try:
        cache = tmp_path / "models"
        model_dir = ensure_tiny("rayimg-tiny-sd", cache)
        model_id_and_hash(ModelConfig(pretrained="rayimg-tiny-sd", cache_dir=str(cache)), model_dir)
    finally:
        os.umask(old)
    assert model_dir.stat().st_mode & 0o777 == 0o775
    memos = list((cache / "hashes").glob("*.json"))
    assert memos and all(m.stat().st_mode & 0o777 == 0o664 for m in memos)
    assert {oct(p.stat().st_mode & 0o777) for p in model_dir.rglob("*")} == {"0o664", "0o775"}  # save_pretrained wrote some 0600
