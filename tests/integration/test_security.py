"""Security against a real mosquitto: identities, the ACL, TLS, and the shipped configurations.

The broker tests run ``broker/mosquitto.prod.conf`` itself (``secure_broker``), so they prove
what that file does: device A can neither write nor read device B's topics, and nobody without
valid credentials gets in. mosquitto 2.0.11 grants every SUBSCRIBE and checks read access only
at delivery (DESIGN section 11), so "cannot read" is asserted as "nothing delivered", with a
positive control showing that the message was published and delivered to whoever may read it.

Non-delivery without long sleeps: mosquitto handles one client's messages in order and queues a
message for every subscriber at once, so once a later, permitted message has reached a client,
an earlier forbidden one would have reached it before, if it were delivered at all.

The first section tests ``fleet.ops.certs`` and ``fleet.ops.enroll`` without a broker.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device.errors import BrokerUnavailableError, ConfigError, NotFoundError
from device.wire.broker import free_port
from device.wire.mqtt import MqttTransport, TlsSettings
from device.wire.topics import Topics, chunk_topic, topic_matches
from fleet.ops import certs
from fleet.ops.enroll import (
    acl_rules,
    enroll,
    enroll_fleet_manager,
    ensure_acl,
    find_mosquitto_passwd,
    hash_password,
    remove,
    render_acl,
    set_password,
    verify_password,
)
from tests.integration.security_fixtures import (
    BAD_CREDENTIALS,
    DEV_CONFIG,
    HOST,
    NOT_AUTHORIZED,
    PROD_CONFIG,
    REPO,
    ConfiguredMosquitto,
    RawClient,
    SecureBroker,
    SecureClients,
    mosquitto_client,
    render_dev_config,
    secure_broker_fixture,  # noqa: F401 (fixture "secure_broker")
    secure_mqtt_fixture,  # noqa: F401 (fixture "secure_mqtt")
)

pytestmark = [pytest.mark.timeout(60)]

T = Topics()
PASSWORD_MODE = 0o600


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _nothing_more(client: MqttTransport, timeout_s: float = 0.05) -> list[str]:
    """Topics of whatever is still queued for ``client`` (it should be nothing)."""
    out: list[str] = []
    while (message := client.get(timeout_s)) is not None:
        out.append(message.topic)
    return out


def _raw_rest(client: RawClient, timeout_s: float = 0.05) -> list[str]:
    """``_nothing_more`` for a ``RawClient``."""
    out: list[str] = []
    while (message := client.get(timeout_s)) is not None:
        out.append(message[0])
    return out


# ==== fleet.ops.certs and fleet.ops.enroll, no broker
# ====================================================


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "a/b", "a:b", "a b", "dev+", "dev#", ".hidden", "x" * 65, "fleet-manager", "ca"],
)
def test_device_ids_that_could_escape_their_topics_files_or_account_are_refused(bad: str) -> None:
    """A device id is a topic level, a password-file key, a file name and the CN that the ACL
    trusts: a '/', ':' or the fleet manager's name would break out of one of them."""
    with pytest.raises(ConfigError, match="device id"):
        certs.validate_device_id(bad)


def test_acl_template_is_what_render_acl_writes() -> None:
    """broker/acl.template and the ACL enroll writes must not drift apart."""
    assert (REPO / "broker" / "acl.template").read_text() == render_acl()


def _allowed(device_id: str, access: str, topic: str) -> bool:
    rules = acl_rules()
    return any(
        a in (access, "readwrite") and topic_matches(p.replace("%u", device_id), topic)
        for a, p in rules.device_patterns
    )


def test_acl_patterns_grant_a_device_exactly_its_own_topics() -> None:
    """Every topic a device uses (built by device.wire.topics, chunks included) is granted with
    the right direction, and none of another device's private topics is."""
    me, other, run = "dev-a", "dev-b", "run-1"
    writes = [
        T.dev_status(me),
        T.dev_events(me),
        T.dev_update(me, run, 3),
        chunk_topic(T.dev_update(me, run, 3), 0),
    ]
    reads = [T.dev_cmd(me), T.run_model(run), chunk_topic(T.run_model(run), 7), T.fleet_status()]
    for topic in writes:
        assert _allowed(me, "write", topic), topic
        assert not _allowed(me, "read", topic), topic
    for topic in reads:
        assert _allowed(me, "read", topic), topic
        assert not _allowed(me, "write", topic), topic
    for topic in [
        T.dev_status(other),
        T.dev_events(other),
        T.dev_update(other, run, 3),
        T.dev_cmd(other),
    ]:
        assert not _allowed(me, "read", topic), topic
        assert not _allowed(me, "write", topic), topic


def test_own_password_hash_is_the_format_mosquitto_passwd_writes(tmp_path: Path) -> None:
    """Without the binary, enroll writes the hash itself: it must be exactly what the broker's
    own tool writes for the same salt, or the broker would refuse every device."""
    if find_mosquitto_passwd() is None:
        pytest.skip("mosquitto_passwd not installed: sudo apt-get install mosquitto")
    passwd = tmp_path / "passwd"
    set_password(passwd, "dev-a", "correct horse", use_binary=True)
    encoded = passwd.read_text().strip().split(":", 1)[1]
    assert verify_password(encoded, "correct horse")
    assert not verify_password(encoded, "correct horsE")
    _, _, iterations, salt_b64, _ = encoded.split("$")
    salt = base64.b64decode(salt_b64)
    assert hash_password("correct horse", iterations=int(iterations), salt=salt) == encoded


def test_enroll_writes_private_files_and_never_logs_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Secrets are files only their owner can read, and a password never reaches a log line or
    a repr that someone might print."""
    caplog.set_level(logging.DEBUG)
    creds = enroll(
        "dev-a",
        password_file=tmp_path / "broker" / "passwd",
        secrets_file=tmp_path / "secrets" / "dev-a.password",
        acl_file=tmp_path / "broker" / "acl",
    )
    assert len(creds.password) >= 43  # 256 random bits, URL-safe base64
    for path in (creds.secrets_file, tmp_path / "broker" / "passwd", tmp_path / "broker" / "acl"):
        assert _mode(path) == PASSWORD_MODE, path
    assert creds.secrets_file.read_text() == creds.password + "\n"
    entry = (tmp_path / "broker" / "passwd").read_text()
    assert entry.startswith("dev-a:$7$") and creds.password not in entry
    assert creds.password not in caplog.text
    assert creds.password not in repr(creds)
    assert "dev-a" in caplog.text  # the enrolment itself is logged


def test_enroll_again_rotates_the_password_and_keeps_other_accounts(tmp_path: Path) -> None:
    """Re-enrolling one device must not lock out the others (or the fleet manager)."""
    passwd = tmp_path / "passwd"
    fleet = enroll_fleet_manager(password_file=passwd, secrets_file=tmp_path / "fm.password")
    first = enroll("dev-a", password_file=passwd, secrets_file=tmp_path / "a.password")
    second = enroll("dev-a", password_file=passwd, secrets_file=tmp_path / "a.password")
    entries = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert sorted(entries) == ["dev-a", "fleet-manager"]
    assert first.password != second.password
    assert verify_password(entries["dev-a"], second.password)
    assert not verify_password(entries["dev-a"], first.password)
    assert verify_password(entries["fleet-manager"], fleet.password)
    assert remove(passwd, "dev-a") and not remove(passwd, "dev-a")
    assert "dev-a" not in passwd.read_text()


def test_an_existing_password_file_keeps_its_group_access_but_loses_world_access(
    tmp_path: Path,
) -> None:
    """The broker reads the file as the 'mosquitto' group (0640): keep that, drop world bits."""
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    passwd.chmod(0o644)
    set_password(passwd, "dev-a", "pw", use_binary=False)
    assert _mode(passwd) == 0o640


def test_enroll_refuses_the_fleet_managers_name(tmp_path: Path) -> None:
    """A device enrolled as 'fleet-manager' would be granted the whole topic tree."""
    with pytest.raises(ConfigError, match="reserved"):
        enroll("fleet-manager", password_file=tmp_path / "p", secrets_file=tmp_path / "s")
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_ensure_acl_refuses_an_acl_that_lacks_a_rule(tmp_path: Path) -> None:
    """An operator's ACL is never rewritten, but one that would break devices is reported."""
    acl = tmp_path / "acl"
    acl.write_text(render_acl().replace("pattern read fl/v1/dev/%u/cmd\n", ""))
    with pytest.raises(ConfigError, match=r"pattern read fl/v1/dev/%u/cmd"):
        ensure_acl(acl)
    acl.write_text(render_acl())
    assert ensure_acl(acl) == acl


def test_device_certificate_is_signed_by_the_ca_with_the_device_id_as_cn(tmp_path: Path) -> None:
    """The broker takes the CN as username: it must be the device id, for client auth only,
    signed by our CA, with a key only its owner can read."""
    ca = certs.init_ca(tmp_path, cn="Test CA", days=30)
    files = certs.issue(tmp_path, "dev-a", days=10)
    cert = certs.load_certificate(files.cert_file)
    ca_cert = certs.load_certificate(ca.cert_file)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 10  # 10 d + 5 min
    assert _mode(files.key_file) == PASSWORD_MODE and _mode(ca.key_file) == PASSWORD_MODE


def test_server_certificate_names_the_hosts_clients_connect_to(tmp_path: Path) -> None:
    """TLS clients check the subjectAltName; without 127.0.0.1 local tests would need
    'insecure' mode."""
    certs.init_ca(tmp_path)
    files = certs.issue_server(tmp_path, hosts=("localhost", "127.0.0.1", "broker.example"))
    san = certs.load_certificate(files.cert_file).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "broker.example"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_ca_is_never_replaced_by_accident_and_issue_needs_one(tmp_path: Path) -> None:
    """A second init_ca would silently invalidate every device certificate."""
    with pytest.raises(NotFoundError, match="no CA"):
        certs.issue(tmp_path, "dev-a")
    certs.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        certs.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="reserved"):
        certs.issue(tmp_path, "fleet-manager")


# ==== the production configuration against a real broker =========================================


@pytest.mark.integration
def test_prod_config_announces_its_packet_limit_on_every_listener(
    secure_mqtt: SecureClients,
) -> None:
    """The shipped limits are in force: clients learn the 8 MiB maximum packet size from the
    CONNACK and chunk below it, on each of the three listeners."""
    fleet = secure_mqtt.fleet()
    by_cert = secure_mqtt.device("dev-a", auth="cert")
    by_password = secure_mqtt.device("dev-b", auth="password")
    for client in (fleet, by_cert, by_password):
        assert client.max_packet_bytes == 8 * 1024 * 1024


FORBIDDEN_WRITES = {
    "b-status": T.dev_status("dev-b"),
    "b-events": T.dev_events("dev-b"),
    "b-update": T.dev_update("dev-b", "run-1", 1),
    "b-update-chunk": chunk_topic(T.dev_update("dev-b", "run-1", 1), 0),
    "b-cmd": T.dev_cmd("dev-b"),
    "own-cmd": T.dev_cmd("dev-a"),
    "run-model": T.run_model("run-1"),
    "fleet-status": T.fleet_status(),
}


@pytest.mark.integration
@pytest.mark.parametrize("auth", ["cert", "password"])
@pytest.mark.parametrize("name", sorted(FORBIDDEN_WRITES))
def test_device_cannot_publish_where_it_may_not_write(
    secure_mqtt: SecureClients, name: str, auth: str
) -> None:
    """Device A cannot forge B's status, events or updates, nor commands, models or the fleet
    status: the broker answers PUBACK 135 "Not authorized" and the fleet manager never sees it.
    Control: A's publish on its own status right after is delivered."""
    topic = FORBIDDEN_WRITES[name]
    observer = secure_mqtt.fleet()
    observer.subscribe(f"{T.prefix}/#")
    device = secure_mqtt.raw("dev-a", auth=auth)
    assert device.connect() == 0
    assert device.publish(topic, b"forged") == NOT_AUTHORIZED
    assert device.publish(T.dev_status("dev-a"), b"control") < 0x80
    received = observer.get(timeout_s=5)
    assert received is not None and received.topic == T.dev_status("dev-a")
    assert received.payload == b"control"
    assert _nothing_more(observer) == []


PRIVATE_TO_B = {
    "b-cmd": (T.dev_cmd("dev-b"), f"{T.prefix}/dev/+/cmd"),
    "b-update": (T.dev_update("dev-b", "run-1", 2), f"{T.prefix}/dev/+/up/#"),
    "b-status": (T.dev_status("dev-b"), f"{T.prefix}/dev/+/status"),
    "b-events": (T.dev_events("dev-b"), f"{T.prefix}/#"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(PRIVATE_TO_B))
def test_device_cannot_read_another_devices_topics(secure_mqtt: SecureClients, name: str) -> None:
    """A subscribes to B's topic, exactly and by wildcard. Nothing of B's reaches A, although
    the message was published and delivered to whoever may read it (B for its commands, the
    fleet manager for the rest)."""
    topic, wildcard = PRIVATE_TO_B[name]
    fleet = secure_mqtt.fleet()
    fleet.subscribe(f"{T.prefix}/dev/+/+")
    fleet.subscribe(f"{T.prefix}/dev/+/up/#")
    spy = secure_mqtt.raw("dev-a", auth="cert")
    assert spy.connect() == 0
    for pattern in (topic, wildcard, T.dev_cmd("dev-a")):
        spy.subscribe(pattern)  # 2.0.11 grants these; newer brokers may refuse: either is fine
    victim = secure_mqtt.device("dev-b", auth="cert")
    victim.subscribe(T.dev_cmd("dev-b"))

    if topic == T.dev_cmd("dev-b"):
        fleet.publish(topic, b"secret")
        got = victim.get(timeout_s=5)
    else:
        victim.publish(topic, b"secret")
        got = fleet.get(timeout_s=5)
    assert got is not None and got.topic == topic and got.payload == b"secret"

    fleet.publish(T.dev_cmd("dev-a"), b"for a")  # a later message A may read
    assert spy.get(timeout_s=5) == (T.dev_cmd("dev-a"), b"for a")
    # Only more copies of the control may follow (A's wildcard overlaps its own command topic).
    assert set(_raw_rest(spy)) <= {T.dev_cmd("dev-a")}


@pytest.mark.integration
def test_anonymous_clients_are_refused_on_every_listener(secure_broker: SecureBroker) -> None:
    """No listener accepts a client without credentials: CONNACK "Not authorized" on the
    password listeners, no TLS session at all without a client certificate."""
    plain = RawClient(secure_broker.fleet_port)
    tls_password = RawClient(secure_broker.password_port, tls=secure_broker.server_tls())
    tls_cert = RawClient(secure_broker.cert_port, tls=secure_broker.server_tls())
    try:
        assert plain.connect() == NOT_AUTHORIZED
        assert tls_password.connect() == NOT_AUTHORIZED
        assert tls_cert.connect() is None
    finally:
        for client in (plain, tls_password, tls_cert):
            client.close()
    assert "peer did not return a certificate" in secure_broker.process.log_text()


@pytest.mark.integration
@pytest.mark.parametrize("listener", ["fleet", "password"])
def test_wrong_or_borrowed_passwords_are_refused(
    secure_broker: SecureBroker, listener: str
) -> None:
    """A wrong password, or another account's password, never gets a session."""
    port = secure_broker.fleet_port if listener == "fleet" else secure_broker.password_port
    tls = secure_broker.server_tls() if listener == "password" else None
    b_password = secure_broker.passwords["dev-b"].password
    for username, password in [("dev-a", "not-the-password"), ("dev-a", b_password)]:
        client = RawClient(port, username=username, password=password, tls=tls)
        try:
            assert client.connect() in (BAD_CREDENTIALS, NOT_AUTHORIZED)
        finally:
            client.close()
    good = secure_broker.passwords["dev-a"]
    control = RawClient(port, username=good.username, password=good.password, tls=tls)
    try:
        assert control.connect() == 0
    finally:
        control.close()


@pytest.mark.integration
def test_certificate_from_another_ca_is_refused(
    secure_broker: SecureBroker, secure_mqtt: SecureClients, tmp_path: Path
) -> None:
    """A certificate with a valid-looking CN but signed by a CA the broker does not trust gets
    no session; the same device's real certificate does."""
    certs.init_ca(tmp_path, cn="Attacker CA")
    forged = certs.issue(tmp_path, "dev-a")
    real = secure_broker.device_tls("dev-a")
    client = RawClient(
        secure_broker.cert_port,
        tls=TlsSettings(real.ca_file, str(forged.cert_file), str(forged.key_file)),
    )
    try:
        assert client.connect() is None
    finally:
        client.close()
    assert "certificate verify failed" in secure_broker.process.log_text()
    assert secure_mqtt.device("dev-a", auth="cert").connected


@pytest.mark.integration
def test_expired_certificate_is_refused(secure_broker: SecureBroker) -> None:
    """A certificate from our own CA that expired yesterday gets no session."""
    files = secure_broker.issue(
        "dev-expired", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    )
    tls = secure_broker.device_tls("dev-expired")
    assert tls.cert_file == str(files.cert_file)
    client = RawClient(secure_broker.cert_port, tls=tls)
    before = secure_broker.process.log_text().count("certificate verify failed")
    try:
        assert client.connect() is None
    finally:
        client.close()
    assert secure_broker.process.log_text().count("certificate verify failed") > before


@pytest.mark.integration
def test_device_cannot_take_over_another_devices_session(secure_mqtt: SecureClients) -> None:
    """Connecting with B's client id would normally kick B off and inherit its session; the
    broker replaces A's client id with its username, so B stays connected and served."""
    victim = secure_mqtt.device("dev-b", auth="cert")
    victim.subscribe(T.dev_cmd("dev-b"))
    for auth in ("cert", "password"):
        intruder = secure_mqtt.raw("dev-a", auth=auth, client_id="dev-b")
        assert intruder.connect() == 0
    fleet = secure_mqtt.fleet()
    fleet.publish(T.dev_cmd("dev-b"), b"still yours")
    got = victim.get(timeout_s=5)
    assert got is not None and got.payload == b"still yours"
    assert victim.connected and victim.disconnect_reasons == []


@pytest.mark.integration
def test_chunked_model_and_update_pass_the_acl_over_tls(secure_mqtt: SecureClients) -> None:
    """Payloads above the broker's 8 MiB packet limit travel as chunks on ``{topic}/{i}``: the
    ACL must let a device read the model's chunks and write its update's chunks, or big models
    silently never arrive."""
    fleet = secure_mqtt.fleet()
    fleet.subscribe(T.all_updates("run-chunks"))
    device = secure_mqtt.factory(auth="cert")("dev-chunks")
    device.connect(timeout_s=5)
    device.subscribe(T.run_model("run-chunks"))
    model = bytes(range(256)) * (36 * 1024)  # 9 MiB: a manifest and 3 chunks of 4 MiB or less
    fleet.publish(T.run_model("run-chunks"), model, retain=True)
    assert fleet.packets_sent >= 3  # it was chunked
    got = device.get(timeout_s=10)
    assert got is not None and got.topic == T.run_model("run-chunks") and got.payload == model
    update = model[::-1]
    device.publish(T.dev_update("dev-chunks", "run-chunks", 1), update)
    assert device.packets_sent >= 3
    up = fleet.get(timeout_s=10)
    assert up is not None and up.payload == update
    fleet.publish(T.run_model("run-chunks"), b"", retain=True)  # clear the retained model


@pytest.mark.integration
def test_retained_device_status_reaches_a_fleet_manager_that_subscribes_later(
    secure_mqtt: SecureClients,
) -> None:
    """The registry is built from retained status: with the ACL and check_retain_source on, a
    device's own retained status is still delivered to the fleet manager on subscribe."""
    device = secure_mqtt.device("dev-status", auth="cert")
    device.publish(T.dev_status("dev-status"), b"online", retain=True)
    fleet = secure_mqtt.fleet()
    fleet.subscribe(T.dev_status("dev-status"))
    got = fleet.get(timeout_s=5)
    assert got is not None and got.payload == b"online" and got.retain
    device.publish(T.dev_status("dev-status"), b"", retain=True)  # clear it


@pytest.mark.integration
def test_enrolled_device_gets_in_after_reload_and_a_removed_one_no_longer(
    secure_broker: SecureBroker,
) -> None:
    """Enrolment takes effect on SIGHUP without a restart, and so does revoking a password."""
    creds = secure_broker.enroll("dev-new")  # waits until the broker accepts it
    assert remove(secure_broker.password_file, "dev-new")
    secure_broker.process.reload()
    for _ in range(100):
        client = RawClient(secure_broker.fleet_port, username="dev-new", password=creds.password)
        try:
            if client.connect() != 0:
                break
        finally:
            client.close()
    else:
        pytest.fail("dev-new still accepted after its entry was removed and the broker reloaded")


# ==== the real mosquitto_pub / mosquitto_sub clients ==============================================


def _cli_tls(broker: SecureBroker, device_id: str) -> list[str]:
    creds = broker.passwords[device_id]
    return [
        "-h", HOST, "-p", str(broker.password_port), "--cafile", str(broker.ca_file),
        "-u", creds.username, "-P", creds.password, "-V", "mqttv5", "-q", "1",
    ]  # fmt: skip


@pytest.mark.integration
def test_mosquitto_sub_as_a_device_receives_nothing_of_anothers_commands(
    secure_broker: SecureBroker, secure_mqtt: SecureClients
) -> None:
    """With the stock client: B's retained command goes to B (mosquitto_sub -C 1 exits 0 with
    it) but not to A, who times out (exit 27) on B's topic and on the wildcard alike."""
    sub = mosquitto_client("mosquitto_sub")
    fleet = secure_mqtt.fleet()
    topic = T.dev_cmd("dev-b")
    # Retained, so both subscribers see it whenever their SUBSCRIBE lands: no race.
    fleet.publish(topic, b"cmd-for-b", retain=True)
    try:
        common = ["-C", "1", "-W", "2", "-v"]
        spy = subprocess.Popen(
            [sub, *_cli_tls(secure_broker, "dev-a"), "-t", topic, "-t", "fl/v1/dev/+/cmd", *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        owner = subprocess.run(
            [sub, *_cli_tls(secure_broker, "dev-b"), "-t", topic, *common],
            capture_output=True,
            timeout=10,
            check=False,
        )
        spy_out, spy_err = spy.communicate(timeout=10)
    finally:
        fleet.publish(topic, b"", retain=True)
    assert owner.returncode == 0, owner.stderr
    assert owner.stdout.decode().strip() == f"{topic} cmd-for-b"
    assert spy.returncode == 27, spy_err  # mosquitto_sub's "timed out" exit code
    assert spy_out == b""


@pytest.mark.integration
def test_mosquitto_pub_with_a_wrong_password_is_refused(secure_broker: SecureBroker) -> None:
    """With the stock client: a wrong password fails the connection (non-zero exit, "not
    authorised"), and a device's forged publish is refused with "Not authorized"."""
    pub = mosquitto_client("mosquitto_pub")
    args = _cli_tls(secure_broker, "dev-a")
    wrong = [*args[: args.index("-P") + 1], "wrong-password", *args[args.index("-P") + 2 :]]
    result = subprocess.run(
        [pub, *wrong, "-t", T.dev_status("dev-a"), "-m", "x"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert result.returncode != 0
    assert "not author" in result.stderr.decode().lower()
    forged = subprocess.run(
        [pub, *args, "-t", T.dev_update("dev-b", "run-1", 1), "-m", "x"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    # mosquitto_pub 2.0.11 exits 0 after a refused QoS 1 publish but reports it on stderr.
    assert "Not authorized" in forged.stderr.decode()


# ==== the development configuration ===============================================================


@pytest.mark.integration
def test_dev_config_runs_with_password_auth_and_the_acl(tmp_path: Path) -> None:
    """broker/mosquitto.conf as shipped (only its port changed), with accounts and ACL made by
    fleet.ops.enroll in the places it names: devices log in with passwords, the ACL holds, and
    anonymous clients are refused."""
    state = tmp_path / ".sparsefleet" / "broker"
    acl = state / "acl"
    fleet = enroll_fleet_manager(
        password_file=state / "passwd", secrets_file=tmp_path / "fm.pw", acl_file=acl
    )
    # The device's entry is hashed by fleet.ops.enroll itself, the fleet manager's by
    # mosquitto_passwd (when installed): the broker must accept both.
    dev = enroll(
        "dev-a", password_file=state / "passwd", secrets_file=tmp_path / "a.pw", use_binary=False
    )
    port = free_port(HOST)
    config = tmp_path / "mosquitto.conf"
    config.write_text(render_dev_config(DEV_CONFIG.read_text(), port))
    broker = ConfiguredMosquitto(config, [port], cwd=tmp_path)
    broker.start()
    clients = [
        RawClient(port, username=dev.username, password=dev.password),
        RawClient(port, username=fleet.username, password=fleet.password),
        RawClient(port),
    ]
    device, manager, anonymous = clients
    try:
        assert anonymous.connect() == NOT_AUTHORIZED
        assert manager.connect() == 0 and device.connect() == 0
        assert manager.subscribe(f"{T.prefix}/#") < 0x80
        assert device.publish(T.dev_update("dev-b", "run-1", 1), b"forged") == NOT_AUTHORIZED
        assert device.publish(T.dev_status("dev-a"), b"online") < 0x80
        assert manager.get(timeout_s=5) == (T.dev_status("dev-a"), b"online")
        assert _raw_rest(manager) == []
    finally:
        for client in clients:
            client.close()
        broker.stop()
    assert (state / "mosquitto.db").is_file()  # persistence works where the config says
    assert "Error" not in broker.log_text()


def test_docker_compose_mounts_the_files_the_configs_name() -> None:
    """Docker is optional and not on CI, so at least check that the compose file mounts the
    shipped configs and every directory they read or write (a renamed file would otherwise only
    break for Docker users)."""
    compose = yaml.safe_load((REPO / "broker" / "docker-compose.yml").read_text())
    dev, prod = compose["services"]["mosquitto"], compose["services"]["mosquitto-prod"]
    dev_mounts = {v.split(":")[1]: v.split(":")[0] for v in dev["volumes"]}
    assert dev_mounts["/sparsefleet/broker/mosquitto.conf"] == "./mosquitto.conf"
    assert dev["command"][-1] == "/sparsefleet/broker/mosquitto.conf"
    for line in DEV_CONFIG.read_text().splitlines():
        words = line.split()
        if words and words[0] in ("password_file", "acl_file", "persistence_location"):
            path = f"{dev['working_dir']}/{words[1]}"
            assert any(path.startswith(f"{target}/") for target in dev_mounts), path
    prod_mounts = {v.split(":")[1]: v.split(":")[0] for v in prod["volumes"]}
    assert prod_mounts["/etc/mosquitto/mosquitto.conf"] == "./mosquitto.prod.conf"
    for line in PROD_CONFIG.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#") and any(w.startswith("/") for w in words):
            path = next(w for w in words if w.startswith("/"))
            assert any(path.startswith(f"{target}/") for target in prod_mounts), path
    for source in (*dev_mounts.values(), *prod_mounts.values()):
        if source.startswith("./"):
            assert (REPO / "broker" / source).is_file(), source


@pytest.mark.integration
def test_transport_reports_a_refused_connection(secure_broker: SecureBroker) -> None:
    """Our own client turns a refused login into BrokerUnavailableError naming the reason,
    instead of retrying forever."""
    client = MqttTransport(
        "dev-a",
        host=HOST,
        port=secure_broker.password_port,
        username="dev-a",
        password="wrong",
        tls=secure_broker.server_tls(),
        session_expiry_s=0,
    )
    with pytest.raises(BrokerUnavailableError, match="refused"):
        client.connect(timeout_s=5)


@pytest.mark.integration
def test_fleet_side_clients_share_the_account_without_taking_over_the_runner(
    secure_mqtt: SecureClients,
) -> None:
    """`fleet status`, the health check, the coordinator and the workers log in with the fleet
    manager's account beside the running runner. On the loopback listener each keeps its own
    client id: forced to the username, each would take over the runner's persistent session."""
    runner = secure_mqtt.fleet()
    runner.subscribe(T.dev_events("dev-a"))
    status = secure_mqtt.raw(None, auth="fleet", client_id="fleet-cli-4242")
    assert status.connect() == 0
    device = secure_mqtt.device("dev-a", auth="cert")
    device.publish(T.dev_events("dev-a"), b"still the runner's")
    got = runner.get(timeout_s=5)
    assert got is not None and got.payload == b"still the runner's"
    assert runner.connected and status.disconnect_reason is None
