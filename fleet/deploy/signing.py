"""The fleet manager's deployment key: Ed25519, signing every artefact's manifest.

Files (``fleet model keygen``, made on first export when absent), in the state directory's
``pki/``::

    deploy-signing.key   private key, PEM (PKCS#8), mode 0600: never leaves the fleet manager
    deploy-signing.pub   public key, PEM (SubjectPublicKeyInfo): copy it to every device and name
                         it in the device config's ``deploy.trusted_keys`` (as the CA certificate)

Ed25519 rather than the CA's ECDSA P-256: deterministic signatures (an artefact exported twice
from the same manifest is byte-identical), 32-byte keys and no curve parameters to get wrong.
The key id (``device.trust.key_id_of``) names a key in manifests and messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device.errors import ConfigError, NotFoundError
from device.trust import key_id_of
from fleet.ops.certs import write_private_file

__all__ = ["PRIVATE_NAME", "PUBLIC_NAME", "DeployKey", "ensure_key", "generate_key", "load_key"]

PRIVATE_NAME = "deploy-signing.key"
PUBLIC_NAME = "deploy-signing.pub"


@dataclass(frozen=True)
class DeployKey:
    """A loaded deployment key (private half) and where its files are."""

    private: ed25519.Ed25519PrivateKey
    private_file: Path
    public_file: Path

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_raw)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of ``data``."""
        return self.private.sign(data)


def generate_key(directory: Path, *, force: bool = False) -> DeployKey:
    """Make a new key pair in ``directory``; ``ConfigError`` if one exists (unless ``force``:
    devices that trust only the old key then refuse new artefacts)."""
    private_file, public_file = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if private_file.exists() and not force:
        raise ConfigError(
            f"{private_file} exists; a new key would make devices refuse new artefacts until "
            "they trust it (pass --force to replace it)"
        )
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(private_file, pem)
    loaded = DeployKey(key, private_file, public_file)
    write_private_file(public_file, loaded.public_pem(), mode=0o644)
    return loaded


def load_key(directory: Path) -> DeployKey:
    """The key in ``directory``; ``NotFoundError`` when there is none, ``ConfigError`` when the
    file is not an Ed25519 private key."""
    private_file, public_file = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    try:
        data = private_file.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"no deployment key at {private_file}; make one with `fleet model keygen`"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{private_file} is not a PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{private_file} is not an Ed25519 key")
    loaded = DeployKey(key, private_file, public_file)
    if not public_file.exists():
        write_private_file(public_file, loaded.public_pem(), mode=0o644)
    return loaded


def ensure_key(directory: Path) -> tuple[DeployKey, bool]:
    """The key in ``directory``, made when absent; the flag says whether it was made now."""
    try:
        return load_key(directory), False
    except NotFoundError:
        return generate_key(directory), True
