"""The `leasehold` command as a user runs it: real subprocesses, real services."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.api import auth, event, started, states
from tests.support.procs import free_port, start_api, stop_process, wait_until
from tests.support.world import HOME, ROOT, RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

CLI = [sys.executable, "-m", "app.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def unique_name(prefix: str) -> str:
    return f"{prefix}-{RUN}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    """A real `leasehold api --port P` process on the test run's ledger."""
    proc, url = start_api(HOME / f"cli-api-{RUN}.log")
    try:
        yield url
    finally:
        stop_process(proc)


def tasks_status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v1/tasks", headers=auth(key), timeout=5).status_code


# --- keys ------------------------------------------------------------------


def test_keys_create_list_revoke(api_url: str) -> None:
    name = unique_name("cli-key")
    made = run_cli("keys", "create", name, "--role", "emitter", "--tenant", "t1")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert made.stdout == key + "\n", "stdout must be the key and nothing else"
    assert key.startswith("lhk_") and len(key) > 20

    assert tasks_status(api_url, key) == 200

    listed = run_cli("keys", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert "emitter" in row and "t1" in row and "active" in row
    assert key not in listed.stdout + listed.stderr
    assert key[4:] not in listed.stdout  # not even without its prefix

    revoked = run_cli("keys", "revoke", name)
    assert revoked.returncode == 0, revoked.stderr
    assert key not in revoked.stdout + revoked.stderr
    # The API caches a key for up to 5 s.
    wait_until(lambda: tasks_status(api_url, key) == 401, timeout=10, interval=0.25)
    listed = run_cli("keys", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert "retired" in row


def test_keys_create_emitter_needs_a_tenant() -> None:
    name = unique_name("cli-notenant")
    made = run_cli("keys", "create", name, "--role", "emitter")
    assert made.returncode != 0
    assert made.stdout == ""
    assert "tenant" in made.stderr
    assert "Traceback" not in made.stderr
    assert name not in run_cli("keys", "list").stdout  # nothing was stored


def test_keys_create_duplicate_name_fails() -> None:
    name = unique_name("cli-dup")
    first = run_cli("keys", "create", name, "--role", "operator", "--tenant", "t1")
    assert first.returncode == 0, first.stderr
    second = run_cli("keys", "create", name, "--role", "operator", "--tenant", "t1")
    assert second.returncode != 0
    assert second.stdout == ""
    assert name in second.stderr and "exists" in second.stderr
    assert "Traceback" not in second.stderr


def test_keys_create_refuses_an_unknown_role() -> None:
    made = run_cli("keys", "create", unique_name("cli-role"), "--role", "root")
    assert made.returncode != 0
    assert made.stdout == ""
    assert "role" in made.stderr


def test_keys_revoke_unknown_name_fails() -> None:
    gone = run_cli("keys", "revoke", unique_name("cli-nobody"))
    assert gone.returncode != 0
    assert "no key named" in gone.stderr


# --- db --------------------------------------------------------------------


def test_db_upgrade_is_idempotent() -> None:
    for _ in range(2):
        done = run_cli("db", "upgrade")
        assert done.returncode == 0, done.stderr
        assert "up to date" in done.stdout


# --- emit and status ---------------------------------------------------------


def emitter_env(url: str, key: str) -> dict[str, str]:
    return {**os.environ, "LEASEHOLD_URL": url, "LEASEHOLD_KEY": key}


def test_emit_status_and_end(api_url: str, worker: Path, keys: dict[str, str]) -> None:
    env = emitter_env(api_url, keys["emitter"])
    task = unique_name("cli-emit")
    out = run_cli(
        "emit", "started", task, "--grant", "db=kv-reader", "--max-duration", "60", env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    assert answer["accepted"] is True and answer["duplicate"] is False
    assert answer["task"]["state"] == "running"
    assert answer["claim_token"]

    def listed() -> str | None:
        text = run_cli("status").stdout
        row = next((line for line in text.splitlines() if line.startswith(task)), None)
        return row if row and "kv-reader" in row else None

    row = wait_until(listed, timeout=15, interval=0.3)
    assert "vault-token" in row and " db " in row
    assert states("t1", task) == {"db": "active"}

    out = run_cli("emit", "succeeded", task, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["task"]["state"] == "succeeded"
    wait_until(lambda: states("t1", task) == {"db": "revoked"}, timeout=10)
    assert not any(line.startswith(task) for line in run_cli("status").stdout.splitlines())


def test_emit_unknown_profile_fails(api_url: str, keys: dict[str, str]) -> None:
    task = unique_name("cli-emit-bad")
    out = run_cli(
        "emit",
        "started",
        task,
        "--grant",
        "db=no-such-profile",
        env=emitter_env(api_url, keys["emitter"]),
    )
    assert out.returncode != 0
    assert "no-such-profile" in out.stdout + out.stderr
    assert states("t1", task) == {}  # nothing stored


def test_emit_without_a_key_says_so(api_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LEASEHOLD_KEY"}
    env["LEASEHOLD_URL"] = api_url
    out = run_cli("emit", "started", unique_name("cli-nokey"), "--grant", "db=kv-reader", env=env)
    assert out.returncode != 0
    assert "LEASEHOLD_KEY" in out.stderr


def test_emit_unreachable_server_fails_cleanly(keys: dict[str, str]) -> None:
    env = emitter_env(f"http://127.0.0.1:{free_port()}", keys["emitter"])
    out = run_cli("emit", "succeeded", unique_name("cli-noserver"), env=env)
    assert out.returncode != 0
    assert "cannot reach" in out.stderr
    assert keys["emitter"] not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


# --- leasehold up ------------------------------------------------------------


def _proc_info(pid: int) -> tuple[str, str, str] | None:
    """(cmdline, cwd, state) of a live process, None if it is gone or a zombie."""
    base = Path("/proc") / str(pid)
    try:
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = (base / "stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        try:
            cwd = os.readlink(base / "cwd")
        except OSError:
            cwd = ""
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if state in ("Z", "X"):
        return None
    return cmdline, cwd, state


def _descendants(root: int) -> dict[int, str]:
    """Live descendants of `root`, by pid, with their command lines."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                info = _proc_info(pid)
                if info is not None:
                    found[pid] = info[0]
                    frontier.append(pid)
    return found


def _leftovers(directory: Path, markers: list[str], known: dict[int, str]) -> list[str]:
    """Processes still running from `up`: known children, or cwd/cmdline pointing at it."""
    left = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        info = _proc_info(pid)
        if info is None:
            continue
        cmdline, cwd, _ = info
        if known.get(pid) == cmdline or cwd == str(directory) or any(m in cmdline for m in markers):
            left.append(f"{pid}: {cmdline}")
    return left


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_end_to_end_on_a_fresh_machine() -> None:
    """The README's first command: `leasehold up` in an empty directory, no configuration."""
    work = Path(tempfile.mkdtemp(prefix=f"leasehold-up-{RUN}-")).resolve()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEHOLD_")}
    proxy_port = free_port()  # not the default 8701: another run may hold it
    env["LEASEHOLD_PROXY_PUBLIC_URL"] = f"http://127.0.0.1:{proxy_port}"
    # The README's `.venv/bin/leasehold up` where the project is installed (.ci/run),
    # else the same entry point from this checkout.
    script = Path(sys.executable).parent / "leasehold"
    if script.is_file():
        command = [str(script)]
    else:
        command = list(CLI)
        env["PYTHONPATH"] = str(ROOT)
    out_path, err_path = work.parent / f"{work.name}.out", work.parent / f"{work.name}.err"
    proc = subprocess.Popen(
        [*command, "up", "--port", str(port)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out_path.open("wb"),
        stderr=err_path.open("wb"),
    )
    children: dict[int, str] = {}
    passed = False

    def output() -> str:
        return out_path.read_text(errors="replace")

    def logs() -> str:
        return f"stdout:\n{output()[-3000:]}\nstderr:\n{err_path.read_text()[-3000:]}"

    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"`up` exited {proc.returncode}\n{logs()}")
            return "Ctrl-C stops everything." in output()

        try:
            wait_until(ready, timeout=60, interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None
        text = output()
        url = f"http://127.0.0.1:{port}"
        assert f"Leasehold is up: {url}" in text
        found = dict(re.findall(r"^\s+(admin|operator|emitter)\s+(lhk_\S+)\s*$", text, re.M))
        assert set(found) == {"admin", "operator", "emitter"}, text
        bao = re.search(r"OpenBao dev server at (http://\S+)", text)
        assert bao, text
        bao_addr = bao.group(1)
        assert "lh-dev-" not in text  # the root token is not printed

        profiles = work / "profiles.toml"
        assert profiles.is_file() and "[profiles.demo-kv]" in profiles.read_text()
        assert (work / ".leasehold").is_dir()
        # The sample policies permit the sample profile: the claim below needs them.
        policies = work / "policies.cedar"
        assert "wrote sample policies to" in text
        assert '@id("demo-kv")' in policies.read_text()
        assert sorted(p.name for p in work.iterdir()) == [
            ".leasehold",
            "policies.cedar",
            "profiles.toml",
        ]
        children = _descendants(proc.pid)
        assert any(f"--port {port}" in c for c in children.values()), children
        assert any(" worker " in c for c in children.values()), children
        assert any("bao server" in c for c in children.values()), children
        assert any(f"proxy --host 127.0.0.1 --port {proxy_port}" in c for c in children.values())
        wait_until(
            lambda: _answers(f"http://127.0.0.1:{proxy_port}/healthz"), timeout=20, interval=0.2
        )

        # An orchestrator starts a task; its workload claims a Vault token and uses it.
        emitter = {"Authorization": f"Bearer {found['emitter']}"}
        task = f"demo/{uuid.uuid4().hex[:8]}/try-1"
        with httpx.Client(base_url=url, timeout=20) as http:
            r = http.post("/v1/events", json=started(task, {"kv": "demo-kv"}), headers=emitter)
            assert r.status_code == 202, r.text
            claim_token = r.json()["claim_token"]
            r = http.post(
                f"/v1/tasks/{quote(task, safe='')}/credentials/kv/claim?wait=10",
                headers={"Authorization": f"Bearer {claim_token}"},
            )
            assert r.status_code == 200, r.text
            claimed = r.json()
            assert claimed["issuer"] == "vault-token" and claimed["profile"] == "demo-kv"
            token = claimed["secret"]["token"]
            vault = {"X-Vault-Token": token}
            secret = httpx.get(f"{bao_addr}/v1/secret/data/demo/hello", headers=vault, timeout=5)
            assert secret.status_code == 200, secret.text
            assert secret.json()["data"]["data"] == {"greeting": "hello from leasehold"}

            # The task ends: the token is revoked within seconds.
            r = http.post("/v1/events", json=event("succeeded", task), headers=emitter)
            assert r.status_code == 202, r.text

        def revoked() -> bool:
            look = httpx.get(f"{bao_addr}/v1/auth/token/lookup-self", headers=vault, timeout=5)
            return look.status_code == 403

        wait_until(revoked, timeout=5, interval=0.1)

        # Another command in the same directory finds the embedded OpenBao too.
        swept = subprocess.run(
            [*command, "sweep"], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        assert swept.returncode == 0, swept.stdout + swept.stderr
        assert "errors           0" in swept.stdout

        # Ctrl-C stops everything, children included.
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`up` did not stop within 15 s\n{logs()}") from None
        assert code == 0, logs()
        markers = [f"--port {port}", f"--port {proxy_port}", bao_addr.rsplit("//", 1)[1], str(work)]
        wait_until(lambda: not _leftovers(work, markers, children), timeout=3, interval=0.1)
        assert not (work / ".leasehold" / "openbao-dev.json").exists()
        passed = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, cmdline in children.items():
            info = _proc_info(pid)
            if info is not None and info[0] == cmdline:
                os.kill(pid, signal.SIGKILL)
        if passed:  # keep the evidence of a failure
            shutil.rmtree(work, ignore_errors=True)
            out_path.unlink(missing_ok=True)
            err_path.unlink(missing_ok=True)


def test_beat_starts_where_its_home_does_not_exist_yet(tmp_path: Path) -> None:
    """A production host has no ./.leasehold: beat creates it for its schedule file."""
    home = tmp_path / "fresh-home"
    log = tmp_path / "beat.log"
    env = {**os.environ, "LEASEHOLD_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [*CLI, "beat"], cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:

        def scheduling() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return any(home.glob("beat-schedule*"))

        wait_until(scheduling, timeout=20, interval=0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
