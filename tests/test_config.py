"""Job configs: YAML loading, dotted overrides, errors that name the field, self-documentation.

The shipped example YAMLs are loaded by tests/test_repo_yaml.py; here each job is loaded from
small YAML files written for the case at hand.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from rayimg.config import (
    JOBS,
    LORA_TARGETS,
    SCHEDULERS,
    ConfigError,
    DemoJob,
    LoraConfig,
    PrepareJob,
    RenderJob,
    ServeJob,
    TrainJob,
    describe,
    load_job,
    to_dict,
)
from rayimg.configbase import apply_overrides, parse_override

# The smallest valid YAML of each job: the fields without a usable default.
MINIMAL = {
    "prepare": "data:\n  source: data/raw\ncache:\n  output: outputs/cache\n",
    "train": "cache: outputs/cache\n",
    "render": "catalog:\n  source: catalogs/prompts.jsonl\n",
    "serve": "",
    "demo": "",
}


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, job: str, text: str | None = None, overrides: list[str] | None = None):
    return load_job(job, write(tmp_path, MINIMAL[job] if text is None else text), overrides)


def error(tmp_path: Path, job: str, text: str | None = None, overrides: list[str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, job, text, overrides)
    return info.value


# --------------------------------------------------------------------------- loading
def test_jobs_registry_names_every_job_class():
    assert JOBS == {"prepare": PrepareJob, "train": TrainJob, "render": RenderJob, "serve": ServeJob, "demo": DemoJob}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_minimal_yaml_loads_as_its_job(tmp_path, job):
    cfg = load(tmp_path, job)
    assert isinstance(cfg, JOBS[job])


@pytest.mark.parametrize("job", sorted(JOBS))
def test_resolved_config_round_trips_through_yaml(tmp_path, job):
    """What `--dry-run` prints (the resolved config as YAML) must load back to the same config."""
    cfg = load(tmp_path, job)
    dumped = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    again = load_job(job, write(tmp_path, dumped, "resolved.yaml"))
    assert again == cfg


def test_train_yaml_sets_nested_sections(tmp_path):
    text = textwrap.dedent(
        """
        model:
          pretrained: stable-diffusion-v1-5/stable-diffusion-v1-5
          family: sd
        cache: s3://rayimg-example/cache/sd15
        train:
          method: lora
          resolution: 768
          learning_rate: 5e-5      # no dot: plain YAML 1.1 would read a string
        """
    )
    cfg = load(tmp_path, "train", text)
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.model.family == "sd"
    assert cfg.cache == "s3://rayimg-example/cache/sd15"
    assert cfg.train.resolution == 768
    assert cfg.train.learning_rate == 5e-5 and type(cfg.train.learning_rate) is float
    # Sections not in the file keep their defaults.
    assert cfg.lora.rank == 16 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.deepspeed.enabled is False


def test_integer_in_a_float_field_becomes_a_float(tmp_path):
    cfg = load(tmp_path, "train", "cache: c\ntrain:\n  learning_rate: 1\nlora:\n  alpha: 8\n")
    assert type(cfg.train.learning_rate) is float and cfg.train.learning_rate == 1.0
    assert type(cfg.lora.alpha) is float and cfg.lora.alpha == 8.0


def test_empty_file_and_no_file_give_defaults(tmp_path):
    assert load_job("demo", write(tmp_path, "")) == DemoJob()
    assert load_job("serve") == ServeJob()


def test_unknown_job_lists_the_jobs():
    with pytest.raises(ConfigError) as info:
        load_job("finetune")
    for job in JOBS:
        assert job in str(info.value)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_job("train", missing)
    assert str(missing) in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: [1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_job("train", path)
    assert str(path) in str(info.value) and "YAML" in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- train\n- lora\n")
    with pytest.raises(ConfigError) as info:
        load_job("train", path)
    assert str(path) in str(info.value) and "mapping" in str(info.value)


# --------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("train.learning_rate=5e-5", ["train", "learning_rate"], 5e-5),
        ("train.learning_rate=5E-5", ["train", "learning_rate"], 5e-5),
        ("train.learning_rate=1.0e-4", ["train", "learning_rate"], 1e-4),
        ("train.learning_rate=0.0001", ["train", "learning_rate"], 1e-4),
        ("train.max_steps=500", ["train", "max_steps"], 500),
        ("train.max_steps=null", ["train", "max_steps"], None),
        ("scaling.use_gpu=true", ["scaling", "use_gpu"], True),
        ("lora.target_modules=[to_q,to_v]", ["lora", "target_modules"], ["to_q", "to_v"]),
        ("lora.target_modules=[to_q, to_out.0]", ["lora", "target_modules"], ["to_q", "to_out.0"]),
        ("validation.prompts=[a photo of sks dog, a dog]", ["validation", "prompts"], ["a photo of sks dog", "a dog"]),
        ("publish.name=sd15-products", ["publish", "name"], "sd15-products"),
        ("data.source=s3://bucket/data/manifest.jsonl", ["data", "source"], "s3://bucket/data/manifest.jsonl"),
        ("defaults.negative_prompt=blurry, low quality", ["defaults", "negative_prompt"], "blurry, low quality"),
        ("defaults.negative_prompt=", ["defaults", "negative_prompt"], ""),
        ("model.pretrained=a=b", ["model", "pretrained"], "a=b"),
        (" train.seed = 7", ["train", "seed"], 7),
    ],
)
def test_parse_override(text, keys, value):
    got_keys, got = parse_override(text)
    assert got_keys == keys
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["train.learning_rate", "=5", "train..seed=1", "train.=1"])
def test_malformed_override_is_an_error(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_overrides_create_nested_sections():
    data = apply_overrides({}, ["transforms.buckets.enabled=true", "transforms.buckets.step=32", "cache.output=c"])
    assert data == {"transforms": {"buckets": {"enabled": True, "step": 32}}, "cache": {"output": "c"}}


def test_overrides_beat_yaml_and_later_overrides_win(tmp_path):
    cfg = load(
        tmp_path,
        "train",
        "cache: c\ntrain:\n  learning_rate: 1.0e-4\n  batch_size: 4\n",
        ["train.learning_rate=5e-5", "train.batch_size=2", "train.batch_size=3"],
    )
    assert cfg.train.learning_rate == 5e-5 and type(cfg.train.learning_rate) is float
    assert cfg.train.batch_size == 3


def test_override_creates_a_section_missing_from_the_file(tmp_path):
    cfg = load(tmp_path, "train", "cache: c\n", ["lora.rank=32", "lora.target_modules=[to_q,to_v]"])
    assert cfg.lora.rank == 32
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.lora.dropout == 0.0  # the rest of the section keeps its defaults


def test_override_fills_an_empty_section(tmp_path):
    cfg = load(tmp_path, "train", "cache: c\nlora:\n", ["lora.rank=4"])
    assert cfg.lora.rank == 4


def test_override_two_levels_deep(tmp_path):
    cfg = load(tmp_path, "prepare", None, ["transforms.buckets.enabled=true", "transforms.buckets.max_aspect=2"])
    assert cfg.transforms.buckets.enabled is True
    assert cfg.transforms.buckets.max_aspect == 2.0
    assert cfg.transforms.resolution == 512


def test_override_null_and_number(tmp_path):
    cfg = load(tmp_path, "train", None, ["train.max_steps=null", "train.num_epochs=3", "train.snr_gamma=5"])
    assert cfg.train.max_steps is None and cfg.train.num_epochs == 3
    assert cfg.train.snr_gamma == 5.0


# --------------------------------------------------------------------------- errors
def literal_values(*values) -> list[str]:
    return [repr(v) for v in values]


# (job, YAML text or None for MINIMAL, overrides, dotted field, texts the message must contain)
ERROR_CASES = [
    # unknown keys: the dotted name, and the keys allowed at that level
    ("train", "cache: c\ntrian:\n  batch_size: 2\n", [], "trian", ["unknown key", "train", "lora", "deepspeed"]),
    ("train", "cache: c\ntrain:\n  learning_rat: 1.0e-4\n", [], "train.learning_rat", ["learning_rate", "lr_scheduler"]),
    ("train", None, ["train.learning_rat=1e-4"], "train.learning_rat", ["learning_rate"]),
    ("prepare", None, ["transforms.buckets.enable=true"], "transforms.buckets.enable", ["enabled", "max_aspect"]),
    ("serve", None, ["http.hots=0.0.0.0"], "http.hots", ["host", "port"]),
    ("render", "catalog:\n  source: c.jsonl\n  path: x\n", [], "catalog.path", ["source", "format"]),
    # wrong types
    ("train", None, ["train.batch_size=four"], "train.batch_size", ["integer", "four"]),
    ("train", None, ["train.batch_size=2.5"], "train.batch_size", ["integer"]),
    ("train", None, ["train.batch_size=true"], "train.batch_size", ["integer"]),
    ("train", None, ["train.learning_rate=fast"], "train.learning_rate", ["number", "fast"]),
    ("train", None, ["scaling.use_gpu=1"], "scaling.use_gpu", ["true or false"]),
    ("train", None, ["lora.target_modules=to_q"], "lora.target_modules", ["list"]),
    ("train", None, ["lora.target_modules=[to_q, 3]"], "lora.target_modules[1]", ["string"]),
    ("train", None, ["model.pretrained=[a, b]"], "model.pretrained", ["string"]),
    ("train", "cache: c\ntrain: 5\n", [], "train", ["mapping"]),
    ("train", None, ["cache.output=x"], "cache", ["not a section"]),
    # Literal fields: the allowed values are listed
    ("train", None, ["train.method=lorra"], "train.method", literal_values("lora", "dreambooth", "textual_inversion", "full")),
    ("train", "cache: c\ntrain:\n  mixed_precision: fp8\n", [], "train.mixed_precision", literal_values("no", "fp16", "bf16")),
    ("train", "cache: c\npublish:\n  registry: s3:/bucket/x\n", [], "publish.registry", ["://"]),
    ("serve", None, ["defaults.width=1024", "limits.max_width=512"], "defaults.width", ["max_width"]),
    ("train", None, ["train.lr_scheduler=cosine_restarts"], "train.lr_scheduler", literal_values("constant", "linear", "cosine")),
    ("train", None, ["train.prediction_type=sample"], "train.prediction_type", literal_values("epsilon", "v_prediction")),
    ("train", None, ["train.optimizer=sgd"], "train.optimizer", literal_values("adamw", "adamw8bit")),
    ("train", None, ["deepspeed.stage=1"], "deepspeed.stage", ["2", "3"]),
    ("train", None, ["deepspeed.stage='2'"], "deepspeed.stage", ["2", "3"]),
    ("train", None, ["model.family=flux"], "model.family", literal_values("auto", "sd", "sdxl")),
    ("train", None, ["model.dtype=fp16"], "model.dtype", literal_values("float16", "bfloat16")),
    ("serve", None, ["storage.addressing_style=dns"], "storage.addressing_style", literal_values("path", "virtual")),
    ("render", None, ["catalog.format=xlsx"], "catalog.format", literal_values("jsonl", "csv", "parquet")),
    ("prepare", None, ["data.format=webdataset"], "data.format", literal_values("imagefolder", "manifest")),
    # out of range
    ("train", None, ["lora.rank=0"], "lora.rank", [">= 1"]),
    ("train", None, ["lora.rank=-4"], "lora.rank", ["-4"]),
    ("train", None, ["lora.alpha=0"], "lora.alpha", ["> 0"]),
    ("train", None, ["train.learning_rate=0"], "train.learning_rate", ["> 0"]),
    ("train", None, ["train.learning_rate=-1e-4"], "train.learning_rate", ["> 0"]),
    ("train", None, ["train.resolution=500"], "train.resolution", ["multiple of 8", "500"]),
    ("train", None, ["train.resolution=0"], "train.resolution", ["multiple of 8"]),
    ("prepare", None, ["transforms.resolution=513"], "transforms.resolution", ["multiple of 8"]),
    ("render", None, ["defaults.width=1001"], "defaults.width", ["multiple of 8"]),
    ("serve", None, ["defaults.height=-8"], "defaults.height", ["multiple of 8"]),
    ("train", None, ["train.caption_dropout=1.0"], "train.caption_dropout", ["[0, 1)"]),
    ("train", None, ["train.ema_decay=1"], "train.ema_decay", ["(0, 1)"]),
    ("serve", None, ["http.port=70000"], "http.port", ["65535"]),
    ("serve", None, ["http.route_prefix=api"], "http.route_prefix", ["/"]),
    ("serve", None, ["storage.endpoint_url=localhost:9000"], "storage.endpoint_url", ["http://"]),
    ("serve", None, ["storage.multipart_threshold_mb=1"], "storage.multipart_threshold_mb", [">= 5"]),
    # unknown scheduler / target module: the allowed names are listed
    ("render", None, ["defaults.scheduler=euler_ancestral"], "defaults.scheduler", ["euler_ancestral", *SCHEDULERS]),
    ("serve", None, ["defaults.scheduler=lms"], "defaults.scheduler", ["lms", *SCHEDULERS]),
    ("train", None, ["lora.target_modules=[to_q,q_proj]"], "lora.target_modules", ["q_proj", *LORA_TARGETS]),
    ("train", None, ["lora.target_modules=[]"], "lora.target_modules", ["at least one"]),
    # adapter names: no path traversal, no separators, lower case
    ("train", None, ["publish.name=../x"], "publish.name", ["'../x'"]),
    ("train", None, ["publish.name=a/b"], "publish.name", ["'a/b'"]),
    ("train", None, ["publish.name=.hidden"], "publish.name", ["'.hidden'"]),
    ("train", None, ["publish.name=My-Adapter"], "publish.name", ["'My-Adapter'"]),
    ("train", None, ["publish.name=" + "a" * 65], "publish.name", ["a" * 65]),
    ("train", None, ["publish.version=../1"], "publish.version", ["'../1'"]),
    # URIs: s3 needs a bucket; only local paths, file:// and s3:// are supported
    ("train", "cache: s3:///prefix\n", [], "cache", ["bucket"]),
    ("train", "cache: s3://\n", [], "cache", ["bucket"]),
    ("train", None, ["checkpoint.storage_path=s3:///runs"], "checkpoint.storage_path", ["bucket"]),
    ("prepare", None, ["data.source=gs://bucket/data"], "data.source", ["'gs'", "s3://"]),
    ("prepare", None, ["cache.output=gs://bucket/cache"], "cache.output", ["'gs'"]),
    ("train", None, ["publish.registry=https://example.com/registry"], "publish.registry", ["'https'"]),
    ("train", None, ["model.pretrained=gs://bucket/model"], "model.pretrained", ["'gs'"]),
    ("render", None, ["registry=gs://bucket/registry"], "registry", ["'gs'"]),
    ("render", None, ["output.uri=s3:///renders"], "output.uri", ["bucket"]),
    ("serve", None, ["image_cache.uri=hdfs://nn/cache"], "image_cache.uri", ["'hdfs'"]),
    ("demo", None, ["output_dir="], "output_dir", ["non-empty"]),
    # fields that depend on each other
    ("train", "", [], "cache", ["data.source"]),
    ("prepare", "data:\n  source: d\n", [], "cache.output", ["required"]),
    ("prepare", "cache:\n  output: c\n", [], "data.source", ["required"]),
    ("render", "", [], "catalog.source", ["required"]),
    ("train", None, ["deepspeed.enabled=true"], "deepspeed.enabled", ["'full'"]),
    ("train", None, ["deepspeed.offload_params=true"], "deepspeed.offload_params", ["stage 3"]),
    ("train", None, ["train.method=dreambooth"], "data.instance_prompt", ["dreambooth"]),
    ("train", None, ["train.ema=true"], "train.ema", ["'full'"]),
    ("train", None, ["train.max_steps=null"], "train.max_steps", ["num_epochs"]),
    ("train", None, ["dreambooth.prior_preservation=true"], "data.class_prompt", ["prior_preservation"]),
    ("prepare", None, ["data.format=dreambooth"], "data.instance_prompt", ["dreambooth"]),
    ("prepare", None, ["data.class_source=class-images"], "data.class_prompt", ["class_source"]),
    ("prepare", None, ["transforms.buckets.min_side=100"], "transforms.buckets.min_side", ["step"]),
    ("render", None, ["defaults.width=4096"], "defaults.width", ["limits.max_width"]),
    ("serve", None, ["autoscaling.min_replicas=3", "autoscaling.max_replicas=2"], "autoscaling.max_replicas", ["min_replicas"]),
    ("demo", "prompts: []\n", [], "prompts", ["at least one"]),
]


@pytest.mark.parametrize(
    "job, text, overrides, field, expected",
    ERROR_CASES,
    ids=[f"{c[0]}:{c[3]}:{'|'.join(c[2]) or 'yaml'}"[:80] for c in ERROR_CASES],
)
def test_error_names_the_field(tmp_path, job, text, overrides, field, expected):
    err = error(tmp_path, job, text, overrides)
    assert err.field == field, str(err)
    message = str(err)
    assert message.startswith(f"{field}: "), message
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


def test_unknown_key_lists_every_allowed_key(tmp_path):
    err = error(tmp_path, "train", None, ["lora.rnak=8"])
    for name in (f.name for f in dataclasses.fields(LoraConfig)):
        assert name in err.message


# --------------------------------------------------------------------------- self-documentation
def config_classes() -> list[type]:
    """Every config dataclass reachable from the job classes."""
    seen: list[type] = []
    stack = list(JOBS.values())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(tp):
                stack.append(tp)
    return seen


def dotted_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(dotted_fields(hints[f.name], prefix + f.name + "."))
    return out


def test_config_classes_are_found():
    names = {cls.__name__ for cls in config_classes()}
    assert {"TrainConfig", "LoraConfig", "BucketConfig", "HttpConfig", "GenerationConfig"} <= names
    assert len(names) >= 25


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_doc(cls):
    undocumented = [f.name for f in dataclasses.fields(cls) if not str(f.metadata.get("doc", "")).strip()]
    assert not undocumented, f"{cls.__name__}: fields without doc: {undocumented}"
    # A dataclass without a docstring gets a generated one: "Name(field: type, ...)".
    assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), f"{cls.__name__} has no docstring"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_describe_covers_every_field_with_its_doc(job):
    lines = describe(JOBS[job])
    fields = dotted_fields(JOBS[job])
    names = [line.strip().split(" ", 1)[0].rstrip(":") for line in lines]
    assert sorted(names) == sorted(fields), set(names) ^ set(fields)
    for line, name in zip(lines, names):
        doc = fields[name].metadata["doc"]
        assert line.rstrip().endswith(doc), line


def test_describe_shows_types_defaults_and_allowed_values():
    lines = {line.strip().split(" ", 1)[0].rstrip(":"): line for line in describe(TrainJob)}
    assert "one of 'lora', 'dreambooth', 'textual_inversion', 'full'" in lines["train.method"]
    assert "default 'lora'" in lines["train.method"]
    assert "float" in lines["train.learning_rate"] and "default 0.0001" in lines["train.learning_rate"]
    assert "list of str" in lines["lora.target_modules"]
    assert "one of 2, 3" in lines["deepspeed.stage"]


def test_yaml_12_booleans_and_lenient_forms(tmp_path):
    """'no'/'yes' stay strings, versions may be integers, an empty section means defaults."""
    path = tmp_path / "t.yaml"
    path.write_text("cache: c\ntrain:\n  mixed_precision: no\npublish:\n  version: 2\n  trigger_word: yes\nlora:\n")
    cfg = load_job("train", path)
    assert cfg.train.mixed_precision == "no"
    assert cfg.publish.version == "2"
    assert cfg.publish.trigger_word == "yes"
    assert cfg.lora.rank == 16
    cfg = load_job("train", path, ["train.mixed_precision=no", "publish.version=3"])
    assert (cfg.train.mixed_precision, cfg.publish.version) == ("no", "3")
