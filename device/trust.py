"""Which deployment keys a device trusts, and the signature check of an artefact's manifest.

The fleet manager signs every artefact's manifest with its Ed25519 deployment key
(``fleet model keygen``; ``fleet.deploy.signing``); a device trusts the public halves it was given
(PEM files, ``deploy.trusted_keys`` in its config, distributed like the CA certificate). A key
is named by its *key id*: the first 16 bytes of the SHA-256 of its 32 raw public bytes, in hex.
Several trusted keys allow a rotation: sign with the new key once every device trusts both.

``cryptography`` is imported only here and only when a key is loaded, so a device that never
receives deployments does not need it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from device.errors import ConfigError
from device.wire.artefact import Artefact, ArtefactError

__all__ = ["TrustedKeys", "key_id_of", "load_trusted_keys"]

KEY_ID_BYTES = 16


def key_id_of(raw_public_key: bytes) -> str:
    """The key id of a 32-byte Ed25519 public key: hex of SHA-256's first 16 bytes."""
    return hashlib.sha256(raw_public_key).digest()[:KEY_ID_BYTES].hex()


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - the device install depends on it
        raise ConfigError(
            "checking deployment signatures needs the 'cryptography' package "
            f"(pip install cryptography): {exc}"
        ) from None
    return ed25519


class TrustedKeys:
    """The Ed25519 public keys a device accepts artefacts from, by key id."""

    def __init__(self, raw_keys: Iterable[bytes]) -> None:
        ed25519 = _ed25519()
        self._keys: dict[str, Any] = {}
        for raw in raw_keys:
            self._keys[key_id_of(raw)] = ed25519.Ed25519PublicKey.from_public_bytes(raw)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, artefact: Artefact) -> None:
        """Raise ``ArtefactError`` unless a trusted key signed ``artefact``'s manifest bytes:
        ``untrusted_key`` when its signer is not trusted, ``bad_signature`` when the signature
        does not verify (a tampered manifest, or another key's signature)."""
        from cryptography.exceptions import InvalidSignature

        key = self._keys.get(artefact.key_id)
        if key is None:
            trusted = ", ".join(self.key_ids) or "none configured"
            raise ArtefactError(
                f"artefact signed by key {artefact.key_id}, which this device does not trust "
                f"(trusted: {trusted})",
                reason="untrusted_key",
            )
        try:
            key.verify(artefact.signature, artefact.manifest_data)
        except InvalidSignature:
            raise ArtefactError(
                f"the manifest's signature does not verify with key {artefact.key_id} "
                "(tampered manifest or wrong key)",
                reason="bad_signature",
            ) from None


def load_trusted_keys(
    paths: Iterable[Path], extra: Mapping[str, bytes] | None = None
) -> TrustedKeys:
    """Read PEM public keys (``-----BEGIN PUBLIC KEY-----``, Ed25519) from ``paths``.

    ``ConfigError`` names a file that is missing, unreadable or not an Ed25519 public key.
    ``extra`` adds raw keys by name (tests).
    """
    ed25519 = _ed25519()
    from cryptography.hazmat.primitives import serialization

    raws: list[bytes] = list((extra or {}).values())
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"trusted deployment key {path}: cannot read: {exc.strerror}"
            ) from None
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ConfigError(
                f"trusted deployment key {path}: not a PEM public key: {exc}"
            ) from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(f"trusted deployment key {path}: not an Ed25519 key")
        raws.append(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return TrustedKeys(raws)
