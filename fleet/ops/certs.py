"""A small certificate authority for the fleet: the CA, the broker's server certificate, and one
client certificate per device (with the ``cryptography`` library, no openssl command needed).

Layout of a PKI directory (``fleet certs init-ca DIR`` / ``fleet certs issue DEVICE``)::

    DIR/ca.crt  ca.key                    the CA (keep ca.key offline in production)
    DIR/server.crt  server.key            the broker's TLS certificate (``issue_server``)
    DIR/devices/{device_id}.crt  .key     one client certificate per device (``issue``)

Decisions, and why:

- The **certificate CN is the device id**. The broker's device listener sets
  ``use_identity_as_username true`` and ``use_username_as_clientid true``, so the CN becomes the
  MQTT username and client id, and the ``%u`` patterns of the ACL confine the device to its own
  topics. A device id is therefore validated (``validate_device_id``, whose rule lives in
  ``device.identity`` so that the device agent applies the same one) before it is signed, and
  the fleet manager's account name can never be issued to a device.
- Keys are **ECDSA P-256**: generated in microseconds (RSA-2048 takes ~0.1 s), small on a
  Raspberry Pi, and supported by every OpenSSL the broker and paho use.
- Private keys are written **mode 0600**, atomically (a temporary file in the same directory,
  then ``os.replace``), so a crash never leaves a half-written or briefly world-readable key.
  Certificates are public and written 0644.
- ``now`` can be given to issue certificates as of another time; with ``days`` that makes an
  already-expired certificate for tests. ``not_valid_before`` is set five minutes before ``now``
  so that a device whose clock is slightly behind still accepts a fresh certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device.errors import ConfigError, NotFoundError
from device.identity import FLEET_MANAGER_USER, RESERVED_NAMES, validate_device_id

log = logging.getLogger(__name__)

__all__ = [
    "FLEET_MANAGER_USER",
    "RESERVED_NAMES",
    "CertFiles",
    "ca_files",
    "device_files",
    "init_ca",
    "issue",
    "issue_server",
    "load_certificate",
    "server_files",
    "validate_device_id",
    "write_private_file",
]

CLOCK_SKEW = dt.timedelta(minutes=5)
MAX_DAYS = 36500

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
DEVICES_DIR = "devices"


@dataclass(frozen=True)
class CertFiles:
    """Where a certificate and its private key are (PEM)."""

    cert_file: Path
    key_file: Path


def write_private_file(
    path: str | Path,
    data: bytes,
    *,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically with permission bits ``mode`` (default 0600).

    The bytes go to a temporary file that is private from the start (``mkstemp`` creates it
    0600 whatever the umask) and gets ``mode`` and ``owner`` (uid, gid) before it is flushed to
    disk and renamed over ``path``: readers see the old file or the new one, never a partial or
    briefly wider-open one. Parent directories are created mode 0700. Changing the owner needs
    the privilege to do so; without it the file keeps the caller's owner and a warning is logged.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, *owner)
            except PermissionError:
                log.warning(
                    "cannot give %s to uid %d gid %d (not permitted); it stays owned by uid %d",
                    path,
                    owner[0],
                    owner[1],
                    os.geteuid(),
                )
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def ca_files(directory: str | Path) -> CertFiles:
    directory = Path(directory)
    return CertFiles(directory / CA_CERT, directory / CA_KEY)


def server_files(directory: str | Path) -> CertFiles:
    directory = Path(directory)
    return CertFiles(directory / SERVER_CERT, directory / SERVER_KEY)


def device_files(directory: str | Path, device_id: str) -> CertFiles:
    validate_device_id(device_id)
    base = Path(directory) / DEVICES_DIR
    return CertFiles(base / f"{device_id}.crt", base / f"{device_id}.key")


def load_certificate(path: str | Path) -> x509.Certificate:
    """Read a PEM certificate; ``NotFoundError`` if absent, ``ConfigError`` if not a PEM cert."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"certificate {path} does not exist") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from None


def init_ca(
    directory: str | Path,
    *,
    cn: str = "SparseFleet CA",
    days: int = 3650,
    overwrite: bool = False,
    now: dt.datetime | None = None,
) -> CertFiles:
    """Create a self-signed CA in ``directory`` (``ca.crt`` 0644, ``ca.key`` 0600).

    ``days`` (1..36500) is the validity from ``now`` (default: the current UTC time). Raises
    ``ConfigError`` if a CA exists there already, unless ``overwrite``: a new CA silently
    invalidates every certificate the old one issued.
    """
    files = ca_files(directory)
    if not overwrite and (files.cert_file.exists() or files.key_file.exists()):
        raise ConfigError(
            f"a CA already exists in {Path(directory)} ({files.cert_file.name}); replacing it "
            "would invalidate every certificate it issued (pass overwrite=True to do so anyway)"
        )
    if not cn.strip():
        raise ConfigError("CA common name must not be empty")
    start = _utc(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key.public_key(), start, _days(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(files, cert, key)
    log.info("created CA %r in %s (valid %d days)", cn, Path(directory), days)
    return files


def issue(
    directory: str | Path,
    device_id: str,
    *,
    days: int = 365,
    now: dt.datetime | None = None,
) -> CertFiles:
    """Issue a client certificate with CN ``device_id``, signed by the CA in ``directory``.

    Written to ``devices/{device_id}.crt`` (0644) and ``.key`` (0600); an existing pair is
    replaced (renewal). ``days`` (1..36500) counts from ``now``. Raises ``ConfigError`` for a bad
    or reserved device id and ``NotFoundError`` when the directory holds no CA.
    """
    validate_device_id(device_id)
    cert, key = _client_or_server(
        directory,
        cn=device_id,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        san=(),
        days=days,
        now=now,
    )
    files = device_files(directory, device_id)
    _write_pair(files, cert, key)
    log.info("issued certificate for device %s (valid %d days)", device_id, days)
    return files


def issue_server(
    directory: str | Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    cn: str | None = None,
    days: int = 825,
    now: dt.datetime | None = None,
) -> CertFiles:
    """Issue the broker's server certificate (``server.crt`` 0644, ``server.key`` 0600).

    ``hosts`` are the names and IP addresses clients connect to; each becomes a subjectAltName
    (clients check the SAN, not the CN). ``cn`` defaults to the first host. 825 days is the
    longest lifetime common TLS clients accept for a server certificate.
    """
    if not hosts:
        raise ConfigError("a server certificate needs at least one host name or IP address")
    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:" for c in host):
                raise ConfigError(f"server host {host!r} is neither a DNS name nor an IP") from None
            san.append(x509.DNSName(host))
    cert, key = _client_or_server(
        directory,
        cn=cn or hosts[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=san,
        days=days,
        now=now,
    )
    files = server_files(directory)
    _write_pair(files, cert, key)
    log.info("issued server certificate for %s (valid %d days)", ", ".join(hosts), days)
    return files


# -- internals ------------------------------------------------------------------------------------


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ConfigError(f"'now' must be timezone-aware, got naive {now.isoformat()}")
    return now.astimezone(dt.UTC)


def _days(days: int) -> dt.timedelta:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"validity must be 1..{MAX_DAYS} days, got {days!r}")
    return dt.timedelta(days=days)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + validity)
    )


def _load_ca(directory: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    files = ca_files(directory)
    if not files.key_file.exists():
        raise NotFoundError(
            f"no CA in {Path(directory)} (missing {files.key_file.name}); create one with init_ca"
        )
    cert = load_certificate(files.cert_file)
    try:
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{files.key_file} is not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{files.key_file}: expected an EC key, got {type(key).__name__}")
    return cert, key


def _client_or_server(
    directory: str | Path,
    *,
    cn: str,
    usage: x509.ObjectIdentifier,
    san: Sequence[x509.GeneralName],
    days: int,
    now: dt.datetime | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    validity = _days(days)
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), _utc(now), validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_pair(files: CertFiles, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    # The key first: a certificate on disk without its key would look usable but is not.
    write_private_file(
        files.key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    write_private_file(files.cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
