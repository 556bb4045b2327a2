"""The fleet_device role over SSH, the way a real fleet is reached.

The test starts its own sshd on a free loopback port with a throw-away host key and a throw-away
client key (nothing of the machine's own SSH setup is used or changed), and converges the role
over it twice: the second run must change nothing, as over the local connection.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ansible_harness import (
    Ansible,
    WheelBuilder,
    device_vars,
    write_inventory,
)

from device import __version__
from device.settings import load_device_config
from device.wire.broker import free_port, is_listening
from fleet.ops.certs import init_ca, issue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
INSTALL_HINT = "install it with 'sudo apt-get install openssh-server'"


def _find(name: str, paths: tuple[str, ...] = ()) -> str:
    for candidate in (shutil.which(name), *paths):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(f"{name} not found: {INSTALL_HINT}")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, object]]:
    """An sshd on 127.0.0.1:<free port> accepting only a fresh key for the current user.

    Yields the connection variables for the inventory.
    """
    sshd_bin = _find("sshd", SSHD_PATHS)
    keygen = _find("ssh-keygen")
    _find("ssh")
    base = tmp_path / "sshd"
    base.mkdir(mode=0o700)
    host_key = base / "host_ed25519"
    client_key = base / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60
        )
    authorized = base / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        # sshd running as root needs its privilege-separation directory (normally made by the
        # service unit).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    port = free_port()
    config = base / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {base / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                f"AllowUsers {user}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                # The key files live under pytest's temporary directory, not in ~/.ssh.
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    log = base / "sshd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sshd_bin, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 15
        while not is_listening("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start on port {port}: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield {
            "ansible_connection": "ssh",
            "ansible_host": "127.0.0.1",
            "ansible_port": port,
            "ansible_user": user,
            "ansible_ssh_private_key_file": str(client_key),
            "ansible_ssh_common_args": (
                "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes"
            ),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_device_role_over_ssh_converges_and_is_idempotent(
    ansible: Ansible,
    wheels: WheelBuilder,
    reused_site_dir: Path,
    sshd: dict[str, object],
    tmp_path: Path,
) -> None:
    """site.yml over SSH installs the agent (files copied over the connection, the wheel
    installed remotely; a device with a client certificate, so the TLS files travel too), and a
    second run over SSH reports changed=0."""
    root = tmp_path / "root"
    pki = tmp_path / "pki"
    init_ca(pki)
    device_cert = issue(pki, "pi-ssh")
    host = device_vars(
        root,
        wheel=wheels(__version__),
        version=__version__,
        site_dir=reused_site_dir,
        broker_port=8883,
        # This device logs in with a client certificate over TLS.
        fleet_device_tls=True,
        fleet_device_tls_ca_src=str(pki / "ca.crt"),
        fleet_device_tls_cert_src=str(device_cert.cert_file),
        fleet_device_tls_key_src=str(device_cert.key_file),
    )
    inventory = write_inventory(tmp_path / "hosts.yml", {"devices": {"pi-ssh": {**sshd, **host}}})
    first = ansible.playbook("site.yml", inventory, "-vvv")
    assert first.returncode == 0, first.explain()
    assert first.changed("pi-ssh") > 0
    # Really over SSH, to the test's sshd.
    assert f"ESTABLISH SSH CONNECTION FOR USER: {sshd['ansible_user']}" in first.output
    assert "ESTABLISH LOCAL CONNECTION" not in first.output
    second = ansible.playbook("site.yml", inventory)
    assert second.returncode == 0, second.explain()
    assert second.changed("pi-ssh") == 0, second.explain()
    fleet_device = root / "opt/sparsefleet/venv/bin/fleet-device"
    proc = subprocess.run(
        [str(fleet_device), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == f"fleet-device {__version__}"
    config = load_device_config(root / "etc/sparsefleet/device.yaml")
    secrets = root / "etc/sparsefleet/secrets"
    assert config.broker.url == "mqtts://127.0.0.1:8883"
    assert config.broker.password_file is None
    assert config.broker.tls is not None
    assert config.broker.tls.ca_file == secrets / "ca.crt"
    assert config.broker.tls.cert_file == secrets / "device.crt"
    assert config.broker.tls.key_file == secrets / "device.key"
    assert (secrets / "device.key").read_bytes() == device_cert.key_file.read_bytes()
    for name in ("ca.crt", "device.crt", "device.key"):
        assert (secrets / name).stat().st_mode & 0o777 == 0o600, name
