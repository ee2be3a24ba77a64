"""The Kubernetes deployment (``deploy/``): the Helm values give an instance Dagster accepts and
that says what ``dagster_home/dagster.yaml`` says, its secrets stay in Kubernetes Secrets, and the
image copies what the repository holds, prepares dbt at build time and runs as a user, not root.

No cluster, no Docker, no network: the values are rendered into ``dagster.yaml`` here, by a
mapping written after the chart's instance template, and the Dockerfile is read, not built.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import QueuedRunCoordinator
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import class_from_code_pointer

from backfill_assets.core import settings
from backfill_assets.core.registry import TABLES_PATH_ENV
from backfill_assets.defs.dagster_internals import ConfigurableClassData
from backfill_assets.project import ensure_manifest, parse_dir

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
VALUES_FILE = REPO / "deploy" / "helm" / "values.yaml"
HOME_INSTANCE = REPO / "dagster_home" / "dagster.yaml"
RELEASE = NAMESPACE = "dagster"
"""``helm upgrade --install dagster dagster/dagster -n dagster``, as values.yaml's header says."""
CHART_DAGSTER_HOME = "/opt/dagster/dagster_home"
"""The chart's default ``global.dagsterHome``, where it mounts the instance's ConfigMap."""
DEFINITIONS_MODULE = "backfill_assets.definitions"
SECRET_VARIABLES = (
    settings.DATA_URL_ENV,
    settings.DAGSTER_URL_ENV,
    settings.CELERY_BROKER_ENV,
    "DAGSTER_PG_PASSWORD",
)


# ---------------------------------------------------------------------------------------------
# The instance the chart renders


def chart_instance(values: dict[str, Any], release: str = RELEASE) -> dict[str, Any]:
    """The ``dagster.yaml`` of dagster/dagster's ConfigMap ``<release>-instance`` for ``values``.

    Written after the chart's ``templates/configmap-instance.yaml`` and its helpers
    (``helpers/instance/_postgresql.tpl``, ``_run-launcher.tpl``, ``_run-coordinator.tpl``,
    ``_concurrency.tpl``, ``_compute-log-manager.tpl``) at the commit values.yaml names, for the
    branches values.yaml takes; any other branch raises rather than render a guess.
    """
    fullname = release if "dagster" in release else f"{release}-dagster"
    global_ = values.get("global", {})
    daemon = values["dagsterDaemon"]
    instance: dict[str, Any] = {}

    pg = values["postgresql"]
    if pg["enabled"]:
        raise NotImplementedError("only an external PostgreSQL (postgresql.enabled: false)")
    postgres_db = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg["postgresqlParams"],
    }
    if pg.get("postgresqlScheme"):
        postgres_db["scheme"] = pg["postgresqlScheme"]
    for section, module, cls in (
        ("schedule_storage", "dagster_postgres.schedule_storage", "PostgresScheduleStorage"),
        ("run_storage", "dagster_postgres.run_storage", "PostgresRunStorage"),
        ("event_log_storage", "dagster_postgres.event_log", "PostgresEventLogStorage"),
    ):
        instance[section] = {"module": module, "class": cls, "config": {"postgres_db": postgres_db}}

    instance["run_launcher"] = _k8s_run_launcher(values, fullname, global_)

    coordinator = daemon["runCoordinator"]
    if daemon["enabled"] and coordinator["enabled"]:
        if coordinator["type"] != "CustomRunCoordinator":
            raise NotImplementedError("only runCoordinator.type CustomRunCoordinator")
        custom = coordinator["config"]["customRunCoordinator"]
        instance["run_coordinator"] = {
            "module": custom["module"],
            "class": custom["class"],
            "config": custom["config"],
        }

    if values["computeLogManager"]["type"] != "NoOpComputeLogManager":
        raise NotImplementedError("only computeLogManager.type NoOpComputeLogManager")
    instance["compute_logs"] = {
        "module": "dagster.core.storage.noop_compute_log_manager",
        "class": "NoOpComputeLogManager",
    }

    monitoring = daemon["runMonitoring"]
    if daemon["enabled"] and monitoring["enabled"]:
        instance["run_monitoring"] = {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring.get("startTimeoutSeconds"),
            **_unless_none("cancel_timeout_seconds", monitoring.get("cancelTimeoutSeconds")),
            **_unless_none("max_runtime_seconds", monitoring.get("maxRuntimeSeconds")),
            **_unless_none("max_resume_run_attempts", monitoring.get("maxResumeRunAttempts")),
            "poll_interval_seconds": monitoring.get("pollIntervalSeconds"),
            "free_slots_after_run_end_seconds": monitoring.get("freeSlotsAfterRunEndSeconds"),
        }

    retries = daemon["runRetries"]
    if daemon["enabled"] and retries["enabled"]:
        instance["run_retries"] = {
            "enabled": retries["enabled"],
            **({"max_retries": retries["maxRetries"]} if retries.get("maxRetries") else {}),
            **(
                {"retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"]}
                if "retryOnAssetOrOpFailure" in retries
                else {}
            ),
        }

    instance["telemetry"] = {"enabled": values["telemetry"]["enabled"]}

    concurrency = values.get("concurrency", {})
    if concurrency.get("enabled"):
        pools, runs = concurrency.get("pools", {}), concurrency.get("runs", {})
        rendered: dict[str, Any] = {}
        pool_keys = {
            "default_limit": pools.get("defaultLimit"),
            "granularity": pools.get("granularity") or None,
            "op_granularity_run_buffer": pools.get("opGranularityRunBuffer"),
        }
        if any(v is not None for v in pool_keys.values()):
            rendered["pools"] = {k: v for k, v in pool_keys.items() if v is not None}
        run_keys = {
            **_unless_none("max_concurrent_runs", runs.get("maxConcurrentRuns")),
            **(
                {"tag_concurrency_limits": lim} if (lim := runs.get("tagConcurrencyLimits")) else {}
            ),
        }
        if run_keys:
            rendered["runs"] = run_keys
        instance["concurrency"] = rendered

    for key, value in (values.get("additionalInstanceConfig") or {}).items():
        if key in instance:  # the chart would write the key twice into one YAML mapping
            raise ValueError(f"additionalInstanceConfig.{key} repeats a key the chart renders")
        instance[key] = value
    return instance


def _k8s_run_launcher(values: dict, fullname: str, global_: dict) -> dict[str, Any]:
    """``dagsterYaml.runLauncher.k8s`` of ``_run-launcher.tpl``."""
    launcher = values["runLauncher"]
    if launcher["type"] != "K8sRunLauncher":
        raise NotImplementedError("only runLauncher.type K8sRunLauncher")
    k8s = launcher["config"]["k8sRunLauncher"]
    config: dict[str, Any] = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        **({"kubeconfig_file": k8s["kubeconfigFile"]} if k8s.get("kubeconfigFile") else {}),
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": k8s["imagePullPolicy"],
        **({"image_pull_secrets": s} if (s := values.get("imagePullSecrets")) else {}),
        "service_account_name": global_.get("serviceAccountName") or fullname,
    }
    if "image" in k8s:
        config["job_image"] = f"{k8s['image']['repository']}:{k8s['image']['tag']}"
    config["dagster_home"] = global_.get("dagsterHome") or CHART_DAGSTER_HOME
    config["instance_config_map"] = f"{fullname}-instance"
    config["postgres_password_secret"] = global_["postgresqlSecretName"]
    for key, name in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if names := [source["name"] for source in k8s.get(key) or [] if "name" in source]:
            config[name] = names
    for key, name in (
        ("envVars", "env_vars"),
        ("volumeMounts", "volume_mounts"),
        ("volumes", "volumes"),
        ("labels", "labels"),
        ("resources", "resources"),
        ("schedulerName", "scheduler_name"),
        ("securityContext", "security_context"),
    ):
        if k8s.get(key):
            config[name] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if run_k8s := k8s.get("runK8sConfig"):
        config["run_k8s_config"] = {
            re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): value
            for key, value in run_k8s.items()
            if value
        }
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def _unless_none(key: str, value: Any) -> dict[str, Any]:
    return {} if value is None else {key: value}


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES_FILE.read_text())


@pytest.fixture(scope="module")
def instance(values) -> dict[str, Any]:
    return chart_instance(values)


def test_the_helm_values_parse_into_the_sections_the_deployment_needs(values):
    """A YAML mistake (a tab, a bad indent) would only show at ``helm install``; and a section
    left out would silently fall back to the chart's defaults (its own PostgreSQL, no daemon)."""
    assert isinstance(values, dict)
    assert {
        "global",
        "postgresql",
        "dagster-user-deployments",
        "runLauncher",
        "dagsterDaemon",
        "concurrency",
        "telemetry",
    } <= values.keys()
    assert values["dagsterDaemon"]["enabled"] is True
    assert values["dagster-user-deployments"]["enabled"] is True


def test_the_instance_the_chart_renders_passes_dagsters_own_instance_schema(instance, tmp_path):
    """What Dagster itself checks when a pod loads ``$DAGSTER_HOME/dagster.yaml``: a misspelt or
    misplaced key fails every pod of the release at start."""
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    config, custom_instance_class = dagster_instance_config(str(tmp_path))
    assert custom_instance_class is None
    assert config["run_launcher"]["class"] == "K8sRunLauncher"


@pytest.mark.parametrize(
    "section",
    [
        "run_storage",
        "event_log_storage",
        "schedule_storage",
        "run_launcher",
        "run_coordinator",
        "compute_logs",
    ],
)
def test_each_class_the_instance_names_imports_and_accepts_its_config(instance, section):
    """Dagster's instance schema takes any module, class and config; the class checks its config
    only when a pod builds it. Here the class is imported (from this image's packages: dagster-k8s,
    dagster-postgres, the project) and its own ``config_type()`` validates the rendered config."""
    entry = instance[section]
    config = entry.get("config") or {}
    data = ConfigurableClassData(entry["module"], entry["class"], yaml.safe_dump(config))
    klass = class_from_code_pointer(data.module_name, data.class_name)
    result = validate_config(klass.config_type(), config)
    assert result.success, [error.message for error in result.errors]


def test_the_run_coordinator_is_the_projects_queued_one(instance):
    """The queue's limits (``concurrency``) apply to a ``QueuedRunCoordinator``; the project's
    subclass also refuses an accidental job backfill of a whole range."""
    entry = instance["run_coordinator"]
    klass = class_from_code_pointer(entry["module"], entry["class"])
    assert issubclass(klass, QueuedRunCoordinator)
    assert (entry["module"], entry["class"]) == (
        "backfill_assets.defs.run_coordinator",
        "GuardedRunCoordinator",
    )


def test_run_monitoring_can_see_the_run_launchers_workers(instance):
    """Run monitoring fails runs whose worker died only when the launcher can report a worker's
    health: K8sRunLauncher does, from the run's Job (the single-host launcher's pid check could
    not see another host)."""
    entry = instance["run_launcher"]
    klass = class_from_code_pointer(entry["module"], entry["class"])
    launcher = klass.__new__(klass)  # not built: it would load a kubeconfig
    assert launcher.supports_check_run_worker_health is True
    assert instance["run_monitoring"]["enabled"] is True


# ---------------------------------------------------------------------------------------------
# The same instance as dagster_home/dagster.yaml


def _home_instance() -> dict[str, Any]:
    return yaml.safe_load(HOME_INSTANCE.read_text())


@pytest.mark.parametrize(
    "section",
    ["run_coordinator", "concurrency", "run_monitoring", "run_retries", "telemetry", "nux"],
)
def test_the_kubernetes_instance_says_what_dagster_yaml_says(instance, section):
    """The queue, the pool limit, monitoring's intervals and retries are tuned in
    ``dagster_home/dagster.yaml``; the Helm values repeat them (a chart has no way to read that
    file), so a change to one that forgets the other fails here instead of drifting silently."""
    expected = _home_instance()[section]
    rendered = instance[section]
    if section == "run_monitoring":
        # The chart always writes this key; left out of dagster.yaml it means 0 (never).
        expected = {"free_slots_after_run_end_seconds": 0, **expected}
    assert rendered == expected


# ---------------------------------------------------------------------------------------------
# Secrets


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value of a YAML tree with its path (``a.b[0].c``), mappings and lists included."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _nodes(value, f"{path}[{index}]")


def test_no_password_or_database_url_is_written_in_the_values(values):
    """values.yaml is committed and shown by ``helm get values``: a password there is a leak.
    No password-named key holds a value, no string is a URL carrying credentials, and no
    environment entry gives a variable that holds them a literal value."""
    credentials_url = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]+@", re.IGNORECASE)
    for path, value in _nodes(values):
        key = path.rsplit(".", 1)[-1].lower()
        assert not ("password" in key and isinstance(value, str) and value), f"{path}: a password"
        assert not (isinstance(value, str) and credentials_url.match(value)), f"{path}: a URL"
        if isinstance(value, dict) and key == "env":  # env as a map: name -> literal value
            assert not set(value) & set(SECRET_VARIABLES), f"{path} sets a secret's variable"
        if isinstance(value, dict) and value.get("name") in SECRET_VARIABLES:  # env as a list
            assert "value" not in value, f"{path}: {value['name']} belongs in a Secret"


def test_the_passwords_and_the_data_url_come_from_kubernetes_secrets(values, instance):
    """The storage password from ``dagster-postgresql-secret`` (the chart must not create that
    Secret from a value), ``BACKFILL_PG_URL`` etc. from ``backfill-assets-env`` for the code
    server and every run's pod."""
    assert values["global"]["postgresqlSecretName"] == "dagster-postgresql-secret"
    assert values["generatePostgresqlPasswordSecret"] is False
    assert instance["run_storage"]["config"]["postgres_db"]["password"] == {
        "env": "DAGSTER_PG_PASSWORD"
    }
    assert instance["run_launcher"]["config"]["postgres_password_secret"] == (
        "dagster-postgresql-secret"
    )
    for deployment in values["dagster-user-deployments"]["deployments"]:
        assert {"name": "backfill-assets-env"} in deployment["envSecrets"]
        assert deployment.get("includeConfigInLaunchedRuns", {"enabled": True})["enabled"]


# ---------------------------------------------------------------------------------------------
# The image


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of deploy/Dockerfile: continuation lines joined, comments
    left out."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, arguments = (current + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile():
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {arguments}: write ENV NAME=value"
                env[name] = value
    return env


def copies() -> list[tuple[list[str], str]]:
    """Each COPY's sources (relative to the build context) and its destination, made absolute
    with the WORKDIR in force."""
    found, workdir = [], "/"
    for keyword, arguments in dockerfile():
        if keyword == "WORKDIR":
            workdir = arguments
        elif keyword == "COPY":
            parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
            destination = parts[-1]
            if not destination.startswith("/"):
                destination = f"{workdir.rstrip('/')}/{destination}"
            found.append((parts[:-1], destination))
    return found


def in_build_context(relative: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets ``relative`` into the build context (its
    rules, applied in order as Docker does: the last matching one wins)."""
    parts = Path(relative).parts
    included = True
    for rule in DOCKERIGNORE.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            name_pattern = pattern.removeprefix("**/")
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(parts[depth - 1], name_pattern)
            ):
                included = negated
                break
    return included


def test_every_file_the_image_copies_is_in_the_repository_and_the_build_context():
    """A COPY of a path that is missing, or that the ignore file keeps out of the context, fails
    the build; the host's dbt output and installed package must stay out (a link to a path of
    this machine)."""
    sources = [source for sources, _ in copies() for source in sources]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert in_build_context(source.rstrip("/")), f"COPY {source}: ignored by the context"
    for host_only in ("dbt_project/target", "dbt_project/dbt_packages", ".venv", ".pgdata"):
        assert not in_build_context(host_only), f"{host_only} would be sent to the builder"


def test_the_image_runs_as_a_numeric_user_that_is_not_root():
    """A pod should not run as root; Kubernetes can check ``runAsNonRoot`` only for a numeric
    user."""
    users = [arguments for keyword, arguments in dockerfile() if keyword == "USER"]
    assert users, "no USER: the image runs as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}"


def test_the_image_turns_dagster_telemetry_off():
    """``telemetry.enabled: false`` does not stop Dagster's daemon and webserver from uploading
    ``$DAGSTER_HOME/logs``; only this variable does (core/settings.py)."""
    assert image_env().get("DAGSTER_DISABLE_TELEMETRY") == "1"


def test_the_image_and_the_chart_serve_the_definitions_on_the_code_servers_port(values):
    """The image's own command (``docker run``) and the chart's code server (its args replace the
    CMD) serve the same module on the port the image exposes; the webserver, the daemon and the
    code location run one image, so the run coordinator they import is the code's."""
    instructions = dockerfile()
    command = json.loads(next(a for k, a in reversed(instructions) if k == "CMD"))
    assert command[:3] == ["dagster", "code-server", "start"]
    assert command[command.index("-m") + 1] == DEFINITIONS_MODULE
    port = command[command.index("-p") + 1]
    assert port in [a for k, a in instructions if k == "EXPOSE"]
    assert not any(k == "ENTRYPOINT" for k, _ in instructions), "the chart's args would follow it"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["codeServerArgs"]
    assert args[args.index("-m") + 1] == DEFINITIONS_MODULE
    assert str(deployment["port"]) == port
    images = {
        json.dumps(image, sort_keys=True)
        for image in (
            deployment["image"],
            values["dagsterWebserver"]["image"],
            values["dagsterDaemon"]["image"],
        )
    }
    assert len(images) == 1


def test_a_pod_finds_the_dbt_manifest_of_the_build_and_writes_nothing_into_the_code(
    tmp_path, monkeypatch
):
    """The image's folders, laid out under ``tmp_path`` as its ENV names them: the build's step
    (``ensure_manifest``) installs the dbt package and parses the manifest without a database;
    a pod loading the definitions then finds both current and writes only under
    ``BACKFILL_DBT_TARGET_DIR``, never into the code (which may be read-only to its user)."""
    env = image_env()
    root = tmp_path / "image"
    for sources, destination in copies():
        for source in sources:
            if (REPO / source).is_dir() and source.rstrip("/") != "backfill_assets":
                _copy_as_built(source.rstrip("/"), root / destination.lstrip("/"))
    for name in (TABLES_PATH_ENV, settings.DBT_PROJECT_ENV, settings.DBT_TARGET_ENV):
        monkeypatch.setenv(name, str(root / env[name].lstrip("/")))
    code = root / env[settings.DBT_PROJECT_ENV].lstrip("/")
    assert Path(settings.dbt_target_dir()).is_relative_to(root)
    assert not settings.dbt_target_dir().is_relative_to(code.parent), "dbt writes into the code"

    ensure_manifest()  # the image's build step
    manifest = parse_dir() / "manifest.json"
    built = _tree(code.parent), manifest.stat().st_mtime_ns
    ensure_manifest()  # a pod loading the definitions
    assert (_tree(code.parent), manifest.stat().st_mtime_ns) == built


def _copy_as_built(source: str, target: Path) -> None:
    """COPY ``source`` (a folder of the repository) to ``target``, as the build context has it."""

    def left_out(folder: str, names: list[str]) -> list[str]:
        inside = Path(folder).relative_to(REPO)
        return [name for name in names if not in_build_context(str(inside / name))]

    shutil.copytree(REPO / source, target, ignore=left_out)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.lstat().st_mtime_ns, path.lstat().st_size)
        for path in folder.rglob("*")
    }
