"""Every YAML file in the repo is parsed and checked by the loader of its kind.

RULES maps paths to checkers. A YAML file that no rule covers fails the test: a new kind of
YAML gets a rule (and a loader that understands it) before it lands.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import yaml

from rayimg.config import JOBS, load_job, to_dict

REPO = Path(__file__).resolve().parents[1]
# Not part of the repo's own content: environments, outputs, build products, hidden dirs.
SKIP_DIRS = {".venv", "venv", "outputs", "build", "dist", "node_modules", "__pycache__"}


def repo_yaml_files(root: Path = REPO) -> list[str]:
    """Repo-relative paths of every *.yaml / *.yml file, outside SKIP_DIRS and hidden dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
        )
        for name in filenames:
            if name.endswith((".yaml", ".yml")):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


# --------------------------------------------------------------------------- credentials
# Keys that hold secrets, and secret-shaped values. Names of env vars or IAM profiles are fine.
SECRET_KEYS = re.compile(
    r"aws_access_key_id|aws_secret_access_key|aws_session_token|secret_access_key|secret_key"
    r"|ssh_private_key|ssh_public_key|private_key|password|passwd|api_key|token|hf_token|access_token",
    re.IGNORECASE,
)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key|aws_access_key_id", re.IGNORECASE),
]


def walk_keys(node, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}" if path else str(k)
            yield sub, str(k), v
            yield from walk_keys(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_keys(v, f"{path}[{i}]")


def check_no_credentials(text: str, data) -> None:
    for pattern in SECRET_TEXT:
        match = pattern.search(text)
        assert match is None, f"credential-like text {match.group(0)[:24]!r}: credentials never go in the repo"
    for dotted, key, value in walk_keys(data):
        assert not (SECRET_KEYS.fullmatch(key) and value not in (None, "")), f"{dotted} looks like a credential"


# --------------------------------------------------------------------------- job configs
JOB_MARKER = re.compile(r"^#\s*job:\s*(\S+)\s*$", re.MULTILINE)


def job_of(text: str) -> str:
    """The job named by the `# job: <name>` comment line (exactly one, in the header)."""
    markers = JOB_MARKER.findall(text)
    assert len(markers) == 1, f"needs exactly one '# job: <name>' comment line, found {len(markers)}"
    assert markers[0] in JOBS, f"'# job: {markers[0]}' names no job; one of {', '.join(JOBS)}"
    header = text.split("\n\n", 1)[0]
    assert JOB_MARKER.search(header), "the '# job:' line belongs in the comment header at the top"
    return markers[0]


def check_job_config(path: Path, root: Path) -> None:
    text = path.read_text(encoding="utf-8")
    job = job_of(text)
    cfg = load_job(job, path)
    assert isinstance(cfg, JOBS[job])
    # The resolved form (what `--dry-run` prints) loads back to the same config.
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp, "resolved.yaml")
        resolved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
        assert load_job(job, resolved) == cfg
    # The header says how to run this very file (catches copy-paste from another config).
    rel = path.relative_to(root).as_posix()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"--config {rel}" in header, f"header should show how to submit it: ... --config {rel}"
    for script in re.findall(r"python (\S+\.py)", header):
        assert (root / script).is_file(), f"the header runs {script}, which is not in the repo"


# --------------------------------------------------------------------------- cluster.yaml
def check_cluster_config(path: Path, root: Path) -> None:
    """Validated as `ray up` does before it calls AWS: prepare_config (merges the provider
    defaults) then validate_config (Ray's JSON schema plus its cross-field checks)."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    import jsonschema

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(config, dict), "a cluster config is a mapping"
    # The file as written, against Ray's schema (before defaults fill gaps).
    schema = json.loads(Path(ray.autoscaler.__file__).with_name("ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))

    assert config["provider"]["type"] == "aws"
    assert set(config.get("auth", {})) <= {"ssh_user"}, "auth holds the ssh user only; Ray creates the key pair"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    for name, node_type in node_types.items():
        node_config = node_type["node_config"]
        for key in ("InstanceType", "ImageId", "BlockDeviceMappings"):
            assert key in node_config, f"available_node_types.{name}.node_config needs {key}"
        assert "KeyName" not in node_config, f"available_node_types.{name}: no key pairs in the repo"
        if name != config["head_node_type"]:
            assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"] <= config["max_workers"], name
    # Every shell command must at least tokenize (an unquoted ' #' in YAML cuts a line short).
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config.get(key, []):
            shlex.split(command)


# --------------------------------------------------------------------------- Ray Serve config
def _unknown_keys(data: dict, model, where: str) -> list[str]:
    """Ray's Serve schemas ignore unknown keys (forward compatibility); a typo would pass."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}{k}" for k in data if k not in known]


def check_serve_config(path: Path, root: Path) -> None:
    """A Serve config file (`serve deploy` / `serve run`): Ray's ServeDeploySchema, no
    misspelled keys, and every application's import_path points at a module in the repo."""
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    ServeDeploySchema.model_validate(data)
    unknown = _unknown_keys(data, ServeDeploySchema, "")
    unknown += _unknown_keys(data.get("http_options") or {}, HTTPOptionsSchema, "http_options.")
    for i, app in enumerate(data.get("applications") or []):
        unknown += _unknown_keys(app, ServeApplicationSchema, f"applications[{i}].")
        for j, dep in enumerate(app.get("deployments") or []):
            where = f"applications[{i}].deployments[{j}]."
            unknown += _unknown_keys(dep, DeploymentSchema, where)
            unknown += _unknown_keys(dep.get("ray_actor_options") or {}, RayActorOptionsSchema, where + "ray_actor_options.")
        # "package.module:attribute" or "package.module.attribute"
        import_path = app["import_path"]
        module = import_path.split(":", 1)[0] if ":" in import_path else import_path.rsplit(".", 1)[0]
        base = root.joinpath(*module.split("."))
        assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), (
            f"applications[{i}].import_path {import_path!r}: no module {module} in the repo"
        )
    assert not unknown, f"keys Ray Serve does not know (ignored silently): {unknown}"


# --------------------------------------------------------------------------- the rules
Rule = tuple[str, Callable[[Path, Path], None]]
def check_base_model_recipe(path: Path, root: Path) -> None:
    """The recipe of the committed tiny shapes model (scripts/train_tiny_base.py): a BaseModelJob."""
    from rayimg.configbase import load
    from scripts.tiny_base.base_model import BaseModelJob

    job = load(BaseModelJob, path)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp, "resolved.yaml")
        resolved.write_text(yaml.safe_dump(to_dict(job), sort_keys=False), encoding="utf-8")
        assert load(BaseModelJob, resolved) == job


RULES: list[Rule] = [
    ("jobs/configs/*.yaml", check_job_config),
    ("jobs/configs/*.yml", check_job_config),
    ("cluster.yaml", check_cluster_config),
    ("serving/config.yaml", check_serve_config),
    ("scripts/train_tiny_base.yaml", check_base_model_recipe),
]


def rules_for(rel: str) -> list[Rule]:
    # fnmatch's * crosses "/", so compare directory depth too.
    return [r for r in RULES if fnmatch.fnmatch(rel, r[0]) and rel.count("/") == r[0].count("/")]


FILES = repo_yaml_files()


def test_repo_yaml_files_are_found():
    assert "cluster.yaml" in FILES
    assert sum(f.startswith("jobs/configs/") for f in FILES) >= 9
    assert not [f for f in FILES if f.startswith((".venv/", "outputs/"))]


@pytest.mark.parametrize("rel", FILES)
def test_yaml_file_passes_its_rule(rel):
    path = REPO / rel
    text = path.read_text(encoding="utf-8")
    documents = list(yaml.safe_load_all(text))
    check_no_credentials(text, documents)
    rules = rules_for(rel)
    assert rules, f"no rule covers {rel}: add one to RULES in tests/test_repo_yaml.py with a loader for its kind"
    assert len(rules) == 1, f"{rel} matches several rules: {[r[0] for r in rules]}"
    rules[0][1](path, REPO)


def test_example_configs_cover_the_cluster_jobs():
    jobs = {job_of((REPO / f).read_text(encoding="utf-8")) for f in FILES if f.startswith("jobs/configs/")}
    assert {"prepare", "train", "render", "serve"} <= jobs


def test_cluster_setup_installs_torch_before_the_project():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))
    assert config["file_mounts"] == {"~/rayimg": "."}
    commands = config["setup_commands"]
    torch = next(i for i, c in enumerate(commands) if re.search(r"pip install .*\btorch\b", c))
    project = next(i for i, c in enumerate(commands) if "pip install" in c and "-e ~/rayimg" in c)
    assert torch < project


# --------------------------------------------------------------------------- the rules themselves fail
def test_a_yaml_file_without_a_rule_is_reported(tmp_path):
    for rel in ("notes.yaml", "rayimg/models/tiny.yml", "jobs/configs/nested/x.yaml", "serving/other.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("a: 1\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "ci.yaml").write_text("a: 1\n")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "run.yaml").write_text("a: 1\n")
    found = repo_yaml_files(tmp_path)
    assert found == ["jobs/configs/nested/x.yaml", "notes.yaml", "rayimg/models/tiny.yml", "serving/other.yaml"]
    assert all(rules_for(rel) == [] for rel in found)


def test_job_config_checker_rejects_bad_files(tmp_path):
    (tmp_path / "jobs" / "configs").mkdir(parents=True)
    (tmp_path / "jobs" / "train.py").write_text("")
    path = tmp_path / "jobs" / "configs" / "x.yaml"
    header = "# job: train\n# python jobs/train.py --config jobs/configs/x.yaml\n\n"
    path.write_text(header + "cache: c\n")
    check_job_config(path, tmp_path)
    for text in (
        "cache: c\n",  # no marker
        "# job: finetune\n# --config jobs/configs/x.yaml\n\ncache: c\n",  # no such job
        header + "cache: c\ntrain:\n  rank: 4\n",  # not a field of the job
        "# job: train\n# --config jobs/configs/other.yaml\n\ncache: c\n",  # header names another file
        "# job: train\n# python jobs/tran.py --config jobs/configs/x.yaml\n\ncache: c\n",  # no such script
    ):
        path.write_text(text)
        with pytest.raises(Exception):
            check_job_config(path, tmp_path)


def test_cluster_checker_rejects_bad_configs(tmp_path):
    good = yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))
    broken = []
    bad = copy.deepcopy(good)
    bad["max_worker"] = 3  # misspelled top-level key
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["head_node_type"] = "no_such_type"
    broken.append(bad)
    bad = copy.deepcopy(good)
    next(iter(bad["available_node_types"].values())).pop("resources")
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["auth"]["ssh_private_key"] = "~/.ssh/id_rsa"
    broken.append(bad)
    bad = copy.deepcopy(good)
    bad["setup_commands"] = ["echo 'unterminated"]
    broken.append(bad)
    path = tmp_path / "cluster.yaml"
    for config in broken:
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(Exception):
            check_cluster_config(path, tmp_path)


def test_credentials_are_caught():
    with pytest.raises(AssertionError):
        check_no_credentials("", {"provider": {"aws_access_key_id": "x"}})
    with pytest.raises(AssertionError):
        check_no_credentials("", [{"auth": {"ssh_private_key": "~/.ssh/key.pem"}}])
    with pytest.raises(AssertionError):
        check_no_credentials("key: AKIAABCDEFGHIJKLMNOP\n", {"key": "AKIAABCDEFGHIJKLMNOP"})
    check_no_credentials("http:\n  api_key_env: RAYIMG_API_KEY\n", {"http": {"api_key_env": "RAYIMG_API_KEY"}})


def test_serve_config_checker(tmp_path):
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "app.py").write_text("app = None\n")
    path = tmp_path / "serving" / "config.yaml"
    good = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "rayimg",
                "route_prefix": "/",
                "import_path": "serving.app:app",
                "deployments": [{"name": "Generator", "num_replicas": 1, "ray_actor_options": {"num_gpus": 1}}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(good))
    check_serve_config(path, tmp_path)
    for mutate in (
        lambda c: c["applications"][0]["deployments"][0].update(num_replicas="many"),
        lambda c: c["applications"][0]["deployments"][0].update(num_replica=2),
        lambda c: c["applications"][0].update(import_path="serving.missing:app"),
        lambda c: c["http_options"].update(hots="0.0.0.0"),
    ):
        bad = copy.deepcopy(good)
        mutate(bad)
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(Exception):
            check_serve_config(path, tmp_path)
