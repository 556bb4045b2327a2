"""Enrolling devices with the broker: a password entry per device, the ACL, the device's secret.

``enroll(device_id, password_file=..., secrets_file=...)`` generates a random password, adds (or
replaces) the device's entry in the mosquitto password file and writes the password, alone on
one line, to the device's secrets file. Both files are written atomically; a new file gets mode
0600. The password is never logged, never put on a command line (other local users can read
``/proc/*/cmdline``) and not shown by ``repr(Credentials)``.

Decisions, and why:

- **The ACL is pattern-based** (``render_acl``; ``broker/acl.template`` is its output for the
  default prefix): ``%u`` stands for the username, which the broker forces to be the client id
  (``use_username_as_clientid``) and, on the certificate listener, the certificate CN. So nothing
  per device is written to the ACL; ``ensure_acl`` only creates the file when absent and checks
  that an existing one still holds every rule a device needs.
- **Hashes.** When the ``mosquitto_passwd`` binary is present (Debian package ``mosquitto``), it
  computes the entry (the password travels on its stdin) into a private temporary file and that
  line is merged here; otherwise the same format is written directly: mosquitto 2.0's
  PBKDF2-SHA512 ``$7$<iterations>$<base64 12-byte salt>$<base64 64-byte hash>`` with 101
  iterations, which is what ``mosquitto_passwd`` 2.0.11 writes (checked against it in the tests).
  A low iteration count is harmless here because every password is 256 random bits, and it
  keeps the broker's CPU cost per connection small when a fleet reconnects at once.
- **Existing password files keep their owner and group** (the broker, started as root, reads
  them as the ``mosquitto`` user) and their mode, minus any world bits.
- The broker reads the password file and ACL at start and on SIGHUP (``reload_broker``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from device.errors import ConfigError, NotFoundError
from device.identity import FLEET_MANAGER_USER, validate_device_id
from device.wire.topics import validate_prefix
from fleet.ops.certs import write_private_file

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PREFIX",
    "PBKDF2_ITERATIONS",
    "AclRules",
    "Credentials",
    "acl_rules",
    "enroll",
    "enroll_fleet_manager",
    "ensure_acl",
    "find_mosquitto_passwd",
    "generate_password",
    "hash_password",
    "reload_broker",
    "remove",
    "render_acl",
    "set_password",
    "verify_password",
]

DEFAULT_PREFIX = "fl/v1"
PASSWORD_BYTES = 32  # 256 random bits, URL-safe base64 (43 characters)
PBKDF2_ITERATIONS = 101  # mosquitto_passwd 2.0.11's default; see the module docstring
PBKDF2_SALT_BYTES = 12
PBKDF2_HASH_BYTES = 64
MOSQUITTO_PASSWD_PATHS = ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")


@dataclass(frozen=True)
class Credentials:
    """What a device (or the fleet manager) logs in with. ``password`` is left out of ``repr``
    so that logging or printing the object never leaks it."""

    username: str
    password: str = field(repr=False)
    secrets_file: Path


# -- passwords ------------------------------------------------------------------------------------


def generate_password(nbytes: int = PASSWORD_BYTES) -> str:
    """A random password of ``nbytes`` (16..64) bytes from the OS CSPRNG, URL-safe base64."""
    if not 16 <= nbytes <= 64:
        raise ValueError(f"password length must be 16..64 random bytes, got {nbytes}")
    return secrets.token_urlsafe(nbytes)


def hash_password(
    password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None
) -> str:
    """The mosquitto 2.0 PBKDF2-SHA512 hash of ``password``: ``$7$iter$salt$hash`` (base64)."""
    if not password:
        raise ValueError("password must not be empty")
    if not 1 <= iterations <= 10_000_000:
        raise ValueError(f"iterations must be 1..10000000, got {iterations}")
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), salt, iterations, PBKDF2_HASH_BYTES
    )
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(encoded: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (as written by ``mosquitto_passwd``)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        raise ValueError("not a mosquitto PBKDF2-SHA512 ($7$) hash")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError as exc:
        raise ValueError(f"malformed $7$ hash: {exc}") from None
    actual = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), salt, iterations, len(expected)
    )
    return hmac.compare_digest(actual, expected)


def find_mosquitto_passwd() -> str | None:
    """The path of ``mosquitto_passwd``, or ``None`` when it is not installed."""
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    for candidate in MOSQUITTO_PASSWD_PATHS:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def set_password(
    password_file: str | Path,
    username: str,
    password: str,
    *,
    use_binary: bool | None = None,
) -> Path:
    """Add or replace ``username``'s entry in a mosquitto password file (created if absent).

    ``use_binary``: ``None`` uses ``mosquitto_passwd`` when installed, ``True`` requires it,
    ``False`` writes the hash itself. Other entries are kept as they are. Concurrent calls on
    the same file are serialised with a lock file next to it (``.{name}.lock``).
    """
    path = Path(password_file)
    if not username or ":" in username or any(c.isspace() for c in username):
        raise ConfigError(f"username {username!r} cannot go in a password file")
    if not password or "\n" in password:
        raise ConfigError("password must be non-empty and on one line")
    binary = find_mosquitto_passwd() if use_binary is not False else None
    if use_binary and binary is None:
        raise NotFoundError(
            "mosquitto_passwd not found; install it with 'sudo apt-get install mosquitto' or "
            "pass use_binary=False"
        )
    entry = _entry_from_binary(binary, username, password) if binary else None
    if entry is None:
        entry = f"{username}:{hash_password(password)}"
    with _locked(path):
        lines = _read_lines(path)
        kept = [line for line in lines if line.split(":", 1)[0] != username]
        _write_keeping_owner(path, "".join(f"{line}\n" for line in [*kept, entry]))
    return path


def remove(password_file: str | Path, username: str) -> bool:
    """Delete ``username``'s entry (revokes its password after ``reload_broker``); returns
    whether there was one."""
    path = Path(password_file)
    with _locked(path):
        lines = _read_lines(path)
        kept = [line for line in lines if line.split(":", 1)[0] != username]
        if len(kept) == len(lines):
            return False
        _write_keeping_owner(path, "".join(f"{line}\n" for line in kept))
    log.info("removed %s from %s", username, path)
    return True


# -- enrolment ------------------------------------------------------------------------------------


def enroll(
    device_id: str,
    *,
    password_file: str | Path,
    secrets_file: str | Path,
    acl_file: str | Path | None = None,
    prefix: str = DEFAULT_PREFIX,
    fleet_user: str = FLEET_MANAGER_USER,
    use_binary: bool | None = None,
) -> Credentials:
    """Give ``device_id`` a fresh random password; returns its credentials.

    Writes the password to ``secrets_file`` (mode 0600, one line) and its hash to
    ``password_file``; enrolling again rotates the password. With ``acl_file``, makes sure the
    ACL covers every device (``ensure_acl``). Raises ``ConfigError`` for a bad or reserved
    device id. The running broker picks the change up on SIGHUP (``reload_broker``).
    """
    validate_device_id(device_id)
    if device_id == fleet_user:
        raise ConfigError(f"device id {device_id!r} is the fleet manager's account")
    return _create_account(
        device_id,
        password_file=password_file,
        secrets_file=secrets_file,
        acl_file=acl_file,
        prefix=prefix,
        fleet_user=fleet_user,
        use_binary=use_binary,
    )


def enroll_fleet_manager(
    *,
    password_file: str | Path,
    secrets_file: str | Path,
    acl_file: str | Path | None = None,
    prefix: str = DEFAULT_PREFIX,
    username: str = FLEET_MANAGER_USER,
    use_binary: bool | None = None,
) -> Credentials:
    """Create (or rotate) the fleet manager's account; the ACL gives it ``{prefix}/#``."""
    if not username or ":" in username or any(c.isspace() for c in username):
        raise ConfigError(f"fleet manager username {username!r} is not allowed")
    return _create_account(
        username,
        password_file=password_file,
        secrets_file=secrets_file,
        acl_file=acl_file,
        prefix=prefix,
        fleet_user=username,
        use_binary=use_binary,
    )


def reload_broker(pid: int) -> None:
    """Ask a running mosquitto (process ``pid``) to re-read its password file and ACL."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise NotFoundError(f"no broker process with pid {pid}") from None


# -- ACL ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AclRules:
    """The ACL rules SparseFleet needs. ``device_patterns`` are ``(access, pattern)`` with ``%u``
    for the device's username; ``fleet`` are the fleet manager's ``(access, topic)``."""

    fleet_user: str
    fleet: tuple[tuple[str, str], ...]
    device_patterns: tuple[tuple[str, str], ...]


def acl_rules(prefix: str = DEFAULT_PREFIX, fleet_user: str = FLEET_MANAGER_USER) -> AclRules:
    """The rules of DESIGN sections 4 and 8 for ``prefix``.

    A device may write its own status, events and updates (chunks included), and read its own
    commands, every run's model (chunks included) and the fleet status; it reads every
    deployment's notice and artefact (chunks included), and its own remote-inference requests,
    answering on its own reply topic (docs/deployment.md); nothing else. These mirror the topic
    table of ``device.wire.topics``; a test checks every topic built there against them.
    """
    p = validate_prefix(prefix)
    return AclRules(
        fleet_user=fleet_user,
        fleet=(("readwrite", f"{p}/#"),),
        device_patterns=(
            ("write", f"{p}/dev/%u/status"),
            ("write", f"{p}/dev/%u/events"),
            ("write", f"{p}/dev/%u/up/#"),
            ("read", f"{p}/dev/%u/cmd"),
            ("read", f"{p}/dev/%u/cmd/#"),
            ("read", f"{p}/runs/+/model"),
            ("read", f"{p}/runs/+/model/#"),
            ("read", f"{p}/runs/+/patch"),
            ("read", f"{p}/runs/+/patch/#"),
            ("read", f"{p}/fleet/status"),
            ("read", f"{p}/deploy/+/notice"),
            ("read", f"{p}/deploy/+/notice/#"),
            ("read", f"{p}/deploy/+/artefact"),
            ("read", f"{p}/deploy/+/artefact/#"),
            ("read", f"{p}/dev/%u/infer/req"),
            ("read", f"{p}/dev/%u/infer/req/#"),
            ("write", f"{p}/dev/%u/infer/res"),
            ("write", f"{p}/dev/%u/infer/res/#"),
        ),
    )


def render_acl(prefix: str = DEFAULT_PREFIX, fleet_user: str = FLEET_MANAGER_USER) -> str:
    """The text of a mosquitto ``acl_file`` granting ``acl_rules(prefix, fleet_user)``.

    ``broker/acl.template`` is this text for the defaults (a test keeps the two identical).
    """
    rules = acl_rules(prefix, fleet_user)
    lines = [
        "# SparseFleet broker ACL (made by fleet.ops.enroll.render_acl; DESIGN sections 4, 8).",
        "# Everything not granted here is denied. Anonymous clients get nothing (no topic lines",
        "# before the first 'user' line).",
        "#",
        "# %u is the MQTT username = client id (use_username_as_clientid) = certificate CN",
        "# (use_identity_as_username), i.e. the device id, so one set of patterns serves every",
        "# device. Patterns without %u (model, fleet status) make mosquitto log a harmless",
        "# warning at start: they are meant to apply to every user.",
        "",
        "# The fleet manager: everything under the prefix.",
        f"user {rules.fleet_user}",
        *(f"topic {access} {topic}" for access, topic in rules.fleet),
        "",
        "# Every device: write its own status, events and updates (and their chunks); read its own",
        "# commands, the runs' models (and chunks) and the fleet status; read the deployments'",
        "# notices and artefacts (and chunks); read its own inference requests, write the replies.",
        *(f"pattern {access} {pattern}" for access, pattern in rules.device_patterns),
    ]
    return "\n".join(lines) + "\n"


def ensure_acl(
    acl_file: str | Path, *, prefix: str = DEFAULT_PREFIX, fleet_user: str = FLEET_MANAGER_USER
) -> Path:
    """Create ``acl_file`` from ``render_acl`` (mode 0600) if absent; if present, check that it
    grants every rule of ``acl_rules`` and raise ``ConfigError`` listing what is missing.

    An existing ACL is never edited: it belongs to the operator.
    """
    path = Path(acl_file)
    if not path.exists():
        write_private_file(path, render_acl(prefix, fleet_user).encode())
        log.info("wrote ACL %s", path)
        return path
    users, patterns = _parse_acl(path)
    rules = acl_rules(prefix, fleet_user)
    missing = [f"pattern {a} {t}" for a, t in rules.device_patterns if (a, t) not in patterns]
    granted = users.get(fleet_user, set())
    missing += [
        f"user {fleet_user}: topic {a} {t}" for a, t in rules.fleet if (a, t) not in granted
    ]
    if missing:
        raise ConfigError(f"{path} lacks rules SparseFleet needs: {'; '.join(missing)}")
    return path


# -- internals ------------------------------------------------------------------------------------


def _create_account(
    username: str,
    *,
    password_file: str | Path,
    secrets_file: str | Path,
    acl_file: str | Path | None,
    prefix: str,
    fleet_user: str,
    use_binary: bool | None,
) -> Credentials:
    if acl_file is not None:
        ensure_acl(acl_file, prefix=prefix, fleet_user=fleet_user)
    password = generate_password()
    secret_path = Path(secrets_file)
    # The secret first: once the broker knows a password, its owner already has it.
    write_private_file(secret_path, f"{password}\n".encode())
    set_password(password_file, username, password, use_binary=use_binary)
    log.info("enrolled %s: entry in %s, secret in %s", username, password_file, secret_path)
    return Credentials(username=username, password=password, secrets_file=secret_path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _entry_from_binary(binary: str, username: str, password: str) -> str:
    """Let ``mosquitto_passwd`` hash ``password`` into a throw-away file; return its line."""
    with tempfile.TemporaryDirectory(prefix="sparsefleet-passwd-") as tmp:
        scratch = Path(tmp) / "passwd"
        try:
            result = subprocess.run(
                [binary, "-c", str(scratch), username],
                input=f"{password}\n{password}\n".encode(),
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"running {binary} failed: {exc}") from None
        if result.returncode != 0:
            # stderr carries mosquitto_passwd's error message, never the password (stdin).
            why = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            raise ConfigError(f"{binary} could not hash the password for {username!r}: {why}")
        lines = _read_lines(scratch)
    if len(lines) != 1 or not lines[0].startswith(f"{username}:$"):
        raise ConfigError(f"{binary} wrote an unexpected password file for {username!r}")
    return lines[0]


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_keeping_owner(path: Path, text: str) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        write_private_file(path, text.encode(), mode=0o600)
        return
    mode = stat.S_IMODE(st.st_mode) & 0o770  # world bits off: it holds (hashed) credentials
    write_private_file(path, text.encode(), mode=mode, owner=(st.st_uid, st.st_gid))


def _parse_acl(path: Path) -> tuple[dict[str, set[tuple[str, str]]], set[tuple[str, str]]]:
    """``(user -> {(access, topic)}, {(access, pattern)})`` of a mosquitto ACL file; ``topic
    TOPIC`` alone means read access, as in mosquitto."""
    users: dict[str, set[tuple[str, str]]] = {}
    patterns: set[tuple[str, str]] = set()
    current: str | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        keyword, rest = words[0], words[1:]
        if keyword == "user" and rest:
            current = " ".join(rest)
            users.setdefault(current, set())
        elif keyword in ("topic", "pattern") and rest:
            access, target = (rest[0], rest[1]) if len(rest) > 1 else ("read", rest[0])
            if keyword == "pattern":
                patterns.add((access, target))
            elif current is not None:
                users[current].add((access, target))
    return users, patterns
