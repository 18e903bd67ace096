"""`leasehold up`: the whole system as child processes of one command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from app.core.settings import EMBEDDED_OPENBAO_FILE, Settings, get_settings

SAMPLE_PROFILES = Path(__file__).parent.parent / "sample" / "profiles.toml"
SAMPLE_POLICIES = Path(__file__).parent.parent / "sample" / "policies.cedar"


def _say(text: str) -> None:
    print(text, flush=True)


def _first_keys() -> dict[str, str] | None:
    """Admin, operator and emitter keys on a ledger that has none yet."""
    from sqlmodel import select

    from app.api.auth import create_key
    from app.core.db import session_scope
    from app.core.models import ApiKey, Role

    with session_scope() as session:
        if session.exec(select(ApiKey)).first() is not None:
            return None
        return {
            role.value: create_key(session, name=role.value, role=role, tenant="default")[1]
            for role in (Role.admin, Role.operator, Role.emitter)
        }


def _wait_healthy(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_everything(settings: Settings, *, host: str, port: int) -> int:
    from app.core.migrate import upgrade
    from app.local.openbao_dev import seed_demo, start_dev_server

    settings.home.mkdir(parents=True, exist_ok=True)
    # Ctrl-C and SIGTERM stop everything, also when started where SIGINT was ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    bao = None
    found = settings.home / EMBEDDED_OPENBAO_FILE
    if not settings.vault_addr or settings.embedded_vault:
        bao = start_dev_server(log_path=settings.home / "openbao.log")
        seed_demo(bao.addr, bao.token)
        os.environ["LEASEHOLD_VAULT_ADDR"] = bao.addr
        os.environ["LEASEHOLD_VAULT_TOKEN"] = bao.token
        # Other commands on this machine (`leasehold sweep`, ...) find it here.
        found.unlink(missing_ok=True)
        fd = os.open(found, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"addr": bao.addr, "token": bao.token}, fh)
        get_settings.cache_clear()
        _say(f"OpenBao dev server at {bao.addr} (in memory, gone at exit)")
    if not settings.profiles_file.exists():
        shutil.copyfile(SAMPLE_PROFILES, settings.profiles_file)
        _say(f"wrote sample profiles to {settings.profiles_file}")
    if not settings.policy_file.exists():
        shutil.copyfile(SAMPLE_POLICIES, settings.policy_file)
        _say(f"wrote sample policies to {settings.policy_file} (they permit the sample profiles)")
    upgrade()
    keys = _first_keys()
    exe = [sys.executable, "-m", "app.cli"]
    # On SQLite one worker process with the scheduler inside keeps one writer.
    concurrency = "1" if settings.is_sqlite else "2"
    procs: list[subprocess.Popen[bytes]] = []
    url = f"http://{host}:{port}"
    try:
        procs.append(subprocess.Popen([*exe, "api", "--host", host, "--port", str(port)]))
        procs.append(subprocess.Popen([*exe, "worker", "--beat", "--concurrency", concurrency]))
        proxy_port = str(urlsplit(settings.proxy_public_url).port or 8701)
        procs.append(subprocess.Popen([*exe, "proxy", "--host", host, "--port", proxy_port]))
        if not _wait_healthy(url, procs):
            _say("leasehold: the API did not come up; see the messages above")
            return 1
        _say(f"\nLeasehold is up: {url}  (dashboard {url}/dashboard, API docs {url}/docs)")
        _say(f"proxy for `proxy` credentials: {settings.proxy_public_url}")
        if keys:
            _say("first keys (shown once; store them now):")
            for role, secret in keys.items():
                _say(f"  {role:9} {secret}")
        else:
            _say("keys exist already; make more with `leasehold keys create`")
        _say("Ctrl-C stops everything.")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        _say("leasehold: a process stopped; stopping the rest")
        return 1
    except KeyboardInterrupt:
        _say("\nstopping")
        return 0
    finally:
        _stop(procs)
        if bao is not None:
            bao.stop()
            found.unlink(missing_ok=True)
