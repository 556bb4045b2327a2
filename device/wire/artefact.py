"""The exported model artefact: a small zip holding a signed manifest and the sparse tensors.

Layout (docs/deployment.md, "Artefact format"); entries in this order, each dated 1980-01-01 so
that equal inputs give equal bytes:

``manifest.json`` (stored)
    UTF-8 JSON object, keys sorted, no insignificant white space (``manifest_bytes``). Its exact
    bytes are what the signature covers. Fields: see ``Manifest``.
``signature.json`` (stored)
    ``{"algorithm": "ed25519", "key_id": ..., "signature": <base64 of 64 bytes>}``: the
    Ed25519 signature of the manifest's bytes by the fleet manager's deployment key
    (``device.trust`` verifies it; ``key_id`` must equal the manifest's ``signer.key_id``).
``model.pb`` (deflated)
    one ``sparsefleet.v1.Envelope`` holding a ``ModelSnapshot``: every state_dict tensor as a
    ``SparseTensor`` with ABSOLUTE positions (pruned tensors) or DENSE ones, values in the
    manifest's ``values`` dtype (fp32, fp16 or int8 with a per-tensor scale). The snapshot's
    ``digest`` is ``model_digest`` of the tensors as decoded (the quantised weights), and
    ``content_sha256`` in the manifest is the SHA-256 of these bytes, so the signature covers
    the tensors too. ``device.wire.envelope.decode`` reads it as any other envelope.

Nothing is trusted when reading (``read_artefact``): a truncated or corrupt zip, unexpected or
missing entries, entries above their size limit (a zip bomb stops at the limit), a manifest that
is not the canonical JSON of a known format, a content digest that does not match: each raises
``ArtefactError`` with a ``reason`` code. Signatures are checked by ``device.trust``, not here
(this module needs no cryptography library).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from device.errors import DecodeError
from device.wire.codec import (
    Chunk,
    SparseTensor,
    decode_tensor,
    encode_tensor_parts,
    length_delimited,
    model_digest,
)
from device.wire.messages import SCHEMA_VERSION
from device.wire.pb import sparsefleet_pb2 as pb
from device.wire.precision import dtype_key

__all__ = [
    "FORMAT",
    "VALUE_DTYPES",
    "Artefact",
    "ArtefactError",
    "ArtefactModel",
    "Manifest",
    "build_artefact",
    "encode_content",
    "manifest_bytes",
    "read_artefact",
    "version_label",
]

FORMAT = "sparsefleet-model/1"
SIGNATURE_ALGORITHM = "ed25519"
MANIFEST_ENTRY, SIGNATURE_ENTRY, CONTENT_ENTRY = "manifest.json", "signature.json", "model.pb"
ENTRIES = (MANIFEST_ENTRY, SIGNATURE_ENTRY, CONTENT_ENTRY)
VALUE_DTYPES = ("fp32", "fp16", "int8")

MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
#: Largest model.pb accepted by default (bytes, decompressed).
DEFAULT_MAX_CONTENT_BYTES = 1 << 30

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ArtefactError(DecodeError):
    """An artefact that must not be installed; ``reason`` is a short code such as
    ``"not_zip"``, ``"bad_manifest"``, ``"digest_mismatch"`` or ``"bad_signature"``."""


def version_label(text: str) -> str:
    """``text`` if it is a valid version label (1-128 of ``A-Z a-z 0-9 . _ -``, starting with a
    letter or digit: it names a file on the device), else ``ValueError``."""
    if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
        raise ValueError(
            f"version {text!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return text


@dataclass(frozen=True)
class Manifest:
    """The signed description of an artefact (``manifest.json``).

    ``model``: the model reference's text (``device.model_ref``: a registered name, or a
    factory with its kwargs); ``architecture_digest``: hex (``device.model_id``), empty when the
    exporter had none; ``model_digest``: hex ``model_digest`` of the tensors as stored
    (quantised); ``source_model_digest``: hex digest of the checkpoint exported.
    ``classes``: class ``i`` is ``classes[i]``; ``input_shape``: one example, no batch dimension.
    ``source``: run, round, model version; ``metrics``: accuracies known at export (0..1);
    ``sizes``: bytes and counts; ``content_sha256``: hex SHA-256 of ``model.pb``;
    ``signer_key_id``: the deployment key that signs it. ``preprocess``: how an image's pixels
    become the model's input, ``(pixel / 255 - mean[c]) / std[c]`` per channel ``c`` (keys
    ``mean`` and ``std``; empty when unknown: pixels are scaled to [0, 1] only).
    """

    version: str
    model: str
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    values: str
    content_sha256: str
    model_digest: str
    signer_key_id: str
    architecture_digest: str = ""
    source_model_digest: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    sizes: Mapping[str, int | float] = field(default_factory=dict)
    created_unix_s: float = 0.0
    tool: str = ""
    preprocess: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "model": {
                "ref": self.model,
                "architecture_digest": self.architecture_digest,
                "model_digest": self.model_digest,
                "source_model_digest": self.source_model_digest,
            },
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "values": self.values,
            "content_sha256": self.content_sha256,
            "signer": {"algorithm": SIGNATURE_ALGORITHM, "key_id": self.signer_key_id},
            "source": dict(self.source),
            "metrics": dict(self.metrics),
            "sizes": dict(self.sizes),
            "created_unix_s": self.created_unix_s,
            "tool": self.tool,
            "preprocess": dict(self.preprocess),
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Validate a parsed manifest; ``ArtefactError(reason="bad_manifest")`` says what is
        wrong."""
        try:
            return _manifest_from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"manifest.json: {exc}", reason="bad_manifest") from None


def _hex(value: Any, what: str, length: int | None = 64, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (
        not (empty and value == "")
        and not (re.fullmatch(r"[0-9a-f]+", value) and (length is None or len(value) == length))
    ):
        raise ValueError(f"{what} must be {length or 'some'} lowercase hex digits, got {value!r}")
    return value


def _manifest_from_json(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"format {data.get('format')!r} is not {FORMAT!r}")
    model = data["model"]
    signer = data["signer"]
    if not isinstance(model, dict) or not isinstance(signer, dict):
        raise ValueError("model and signer must be objects")
    if signer.get("algorithm") != SIGNATURE_ALGORITHM:
        raise ValueError(f"signer.algorithm must be {SIGNATURE_ALGORITHM!r}")
    name = model["ref"]
    if not isinstance(name, str) or not name:
        raise ValueError("model.ref must be a non-empty string")
    classes = data["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError("classes must be at least 2 distinct non-empty strings")
    shape = data["input_shape"]
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError("input_shape must be a non-empty list of positive integers")
    values = data["values"]
    if values not in VALUE_DTYPES:
        raise ValueError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    created = data.get("created_unix_s", 0.0)
    if not isinstance(created, int | float) or not math.isfinite(created):
        raise ValueError("created_unix_s must be a number")
    mappings = {k: data.get(k, {}) for k in ("source", "metrics", "sizes", "preprocess")}
    for key, value in mappings.items():
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be an object")
    return Manifest(
        version=version_label(data["version"]),
        model=name,
        classes=tuple(classes),
        input_shape=tuple(shape),
        values=values,
        content_sha256=_hex(data["content_sha256"], "content_sha256"),
        model_digest=_hex(model["model_digest"], "model.model_digest"),
        signer_key_id=_hex(signer["key_id"], "signer.key_id", None),
        architecture_digest=_hex(
            model.get("architecture_digest", ""), "model.architecture_digest", None, empty=True
        ),
        source_model_digest=_hex(
            model.get("source_model_digest", ""), "model.source_model_digest", empty=True
        ),
        source=mappings["source"],
        metrics=mappings["metrics"],
        sizes=mappings["sizes"],
        created_unix_s=float(created),
        tool=str(data.get("tool", "")),
        preprocess=_preprocess(mappings["preprocess"]),
    )


def _preprocess(data: Mapping[str, Any]) -> dict[str, Any]:
    if not data:
        return {}
    mean, std = data.get("mean"), data.get("std")
    if (
        set(data) != {"mean", "std"}
        or not isinstance(mean, list)
        or not isinstance(std, list)
        or not mean
        or len(mean) != len(std)
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in mean + std)
        or not all(v > 0 for v in std)
    ):
        raise ValueError("preprocess holds equally long lists mean and std (std > 0)")
    return {"mean": list(mean), "std": list(std)}


def manifest_bytes(manifest: Manifest) -> bytes:
    """The canonical bytes of a manifest: the signed form."""
    return json.dumps(
        manifest.to_json(),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# The tensors (model.pb)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ArtefactModel:
    """The decoded ``model.pb``: every tensor as a ``SparseTensor`` (values float32, as stored;
    pruned tensors keep their mask, dense ones have an all-true mask), and the snapshot header.

    Dense weights are never built unless asked for (``dense``), so an inference model can hold
    only the kept values of its sparse layers.
    """

    model_name: str
    version: int
    digest: bytes
    tensors: Mapping[str, SparseTensor]
    pruned: frozenset[str]

    def dense(self, name: str) -> npt.NDArray[np.float32]:
        return self.tensors[name].to_dense()

    def masks(self) -> dict[str, npt.NDArray[np.bool_]]:
        return {name: self.tensors[name].mask for name in self.pruned}

    def computed_digest(self) -> bytes:
        """``model_digest`` of the tensors (one dense tensor at a time in memory)."""
        return model_digest(_DenseView(self.tensors), self.masks())

    @property
    def nnz(self) -> int:
        return sum(t.nnz for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())


class _DenseView(Mapping[str, npt.NDArray[np.float32]]):
    """Dense weights made on access, so that hashing holds one dense tensor at a time."""

    def __init__(self, tensors: Mapping[str, SparseTensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, name: str) -> npt.NDArray[np.float32]:
        return self._tensors[name].to_dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def encode_content(
    *,
    model_name: str,
    model_version: int,
    mask_version: int,
    weights: Mapping[str, npt.ArrayLike],
    masks: Mapping[str, npt.ArrayLike],
    values: str,
    run_id: str = "",
    round_: int = 0,
) -> tuple[bytes, bytes]:
    """``(model.pb bytes, model digest)`` of a model with its values in ``values``.

    Each tensor is encoded once; the digest is computed from exactly the bytes that were encoded
    (decoded back), so it names the quantised model a device will decode. Pruned tensors (those
    with a mask) keep only the mask's positions. ``ValueError`` for an unknown dtype, a mask
    without a weight or non-finite values in int8.
    """
    key = dtype_key(values)
    if key not in VALUE_DTYPES:
        raise ValueError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    unknown = sorted(set(masks) - set(weights))
    if unknown:
        raise ValueError(f"masks without weights: {unknown}")
    chunks: list[Chunk] = []
    decoded: dict[str, SparseTensor] = {}
    for name, weight in weights.items():
        mask = masks.get(name)
        tensor = SparseTensor.from_dense(
            weight, None if mask is None else np.asarray(mask, dtype=np.bool_)
        )
        encoded = encode_tensor_parts(tensor, key)
        decoded[name] = decode_tensor(encoded.message(), where=name)
        chunks += length_delimited(
            5,
            [*length_delimited(1, [name.encode("utf-8")]), *length_delimited(2, encoded.chunks())],
        )
    pruned = [name for name in weights if name in masks]
    digest = model_digest(_DenseView(decoded), {n: decoded[n].mask for n in pruned})
    head = pb.ModelSnapshot(
        model_name=model_name, version=model_version, digest=digest, mask_version=mask_version
    )
    head.pruned.extend(pruned)
    envelope_head = pb.Envelope(schema_version=SCHEMA_VERSION, run_id=run_id, round=round_)
    body = length_delimited(15, [head.SerializeToString(), *chunks])
    return b"".join([envelope_head.SerializeToString(), *body]), digest


def decode_content(content: bytes, where: str = CONTENT_ENTRY) -> ArtefactModel:
    """Parse ``model.pb``; ``ArtefactError`` (or ``TensorDecodeError``) when malformed."""
    env = pb.Envelope()
    try:
        env.ParseFromString(content)
    except Exception as exc:  # protobuf's own DecodeError, whatever the implementation
        raise ArtefactError(
            f"{where} is not a protobuf Envelope: {exc}", reason="bad_content"
        ) from None
    if env.schema_version != SCHEMA_VERSION or env.WhichOneof("kind") != "model":
        raise ArtefactError(
            f"{where} holds no model snapshot of schema {SCHEMA_VERSION}", reason="bad_content"
        )
    snapshot = env.model
    tensors: dict[str, SparseTensor] = {}
    for nt in snapshot.tensors:
        if nt.name in tensors:
            raise ArtefactError(f"{where}: tensor {nt.name!r} twice", reason="bad_content")
        tensors[nt.name] = decode_tensor(nt.tensor, where=f"{where}[{nt.name!r}]")
    pruned = frozenset(snapshot.pruned)
    if len(pruned) != len(snapshot.pruned) or not pruned <= tensors.keys():
        raise ArtefactError(f"{where}: bad list of pruned tensors", reason="bad_content")
    for name, t in tensors.items():
        if name not in pruned and t.nnz != t.numel:
            raise ArtefactError(
                f"{where}: tensor {name!r} has positions but is not pruned", reason="bad_content"
            )
    return ArtefactModel(
        model_name=snapshot.model_name,
        version=int(snapshot.version),
        digest=bytes(snapshot.digest),
        tensors=tensors,
        pruned=pruned,
    )


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Artefact:
    """A structurally valid artefact file (its signature not yet checked: ``device.trust``).

    ``sha256`` is the SHA-256 of the whole file, ``manifest_data`` the exact signed bytes.
    """

    manifest: Manifest
    manifest_data: bytes
    key_id: str
    signature: bytes
    content: bytes
    sha256: bytes
    size: int

    def model(self) -> ArtefactModel:
        """Decode the tensors; ``ArtefactError`` when they do not match the manifest (model
        name, values dtype, the snapshot's digest)."""
        decoded = decode_content(self.content)
        if decoded.model_name != self.manifest.model:
            raise ArtefactError(
                f"model.pb holds model {decoded.model_name!r}, the manifest says "
                f"{self.manifest.model!r}",
                reason="bad_content",
            )
        if decoded.digest.hex() != self.manifest.model_digest:
            raise ArtefactError(
                "model.pb's snapshot digest differs from the manifest's", reason="digest_mismatch"
            )
        return decoded


def build_artefact(manifest: Manifest, content: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """The artefact file: ``manifest`` (whose ``content_sha256`` must be ``content``'s),
    signed by ``sign(manifest bytes) -> 64-byte Ed25519 signature``."""
    if hashlib.sha256(content).hexdigest() != manifest.content_sha256:
        raise ValueError("manifest.content_sha256 is not the SHA-256 of the content")
    data = manifest_bytes(manifest)
    signature = {
        "algorithm": SIGNATURE_ALGORITHM,
        "key_id": manifest.signer_key_id,
        "signature": base64.b64encode(sign(data)).decode("ascii"),
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, payload, method in (
            (MANIFEST_ENTRY, data, zipfile.ZIP_STORED),
            (SIGNATURE_ENTRY, json.dumps(signature, sort_keys=True).encode(), zipfile.ZIP_STORED),
            (CONTENT_ENTRY, content, zipfile.ZIP_DEFLATED),
        ):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = method
            zf.writestr(info, payload, compresslevel=9 if method == zipfile.ZIP_DEFLATED else None)
    return out.getvalue()


def read_artefact(data: bytes, *, max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES) -> Artefact:
    """Parse and check an artefact file's structure and digests (not its signature).

    Raises ``ArtefactError``: ``not_zip`` (truncated or not a zip), ``bad_entry`` (entries other
    than the three, or one twice), ``too_large`` (an entry above its limit),
    ``bad_manifest``, ``bad_signature`` (malformed signature entry), ``digest_mismatch``
    (content SHA-256 differs from the manifest's).
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ArtefactError(
            f"not a SparseFleet artefact (truncated or not a zip: {exc})", reason="not_zip"
        ) from None
    with zf:
        names = zf.namelist()
        if sorted(names) != sorted(ENTRIES):
            raise ArtefactError(
                f"artefact entries {names} are not {list(ENTRIES)}", reason="bad_entry"
            )
        manifest_data = _entry(zf, MANIFEST_ENTRY, MAX_MANIFEST_BYTES)
        signature_data = _entry(zf, SIGNATURE_ENTRY, MAX_SIGNATURE_BYTES)
        content = _entry(zf, CONTENT_ENTRY, max_content_bytes)
    try:
        parsed = json.loads(manifest_data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtefactError(f"manifest.json is not JSON: {exc}", reason="bad_manifest") from None
    manifest = Manifest.from_json(parsed)
    if manifest_bytes(manifest) != manifest_data:
        raise ArtefactError(
            "manifest.json is not in canonical form (or has unknown fields)", reason="bad_manifest"
        )
    key_id, signature = _signature(signature_data, manifest)
    if hashlib.sha256(content).hexdigest() != manifest.content_sha256:
        raise ArtefactError(
            "model.pb does not match the manifest's content_sha256 (tampered or corrupt)",
            reason="digest_mismatch",
        )
    return Artefact(
        manifest=manifest,
        manifest_data=manifest_data,
        key_id=key_id,
        signature=signature,
        content=content,
        sha256=hashlib.sha256(data).digest(),
        size=len(data),
    )


def _entry(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise ArtefactError(
            f"{name} is {info.file_size} bytes (at most {limit})", reason="too_large"
        )
    try:
        with zf.open(info) as handle:
            payload = handle.read(limit + 1)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as exc:
        raise ArtefactError(f"{name} cannot be read: {exc}", reason="not_zip") from None
    if len(payload) > limit:
        raise ArtefactError(f"{name} is larger than {limit} bytes", reason="too_large")
    return payload


def _signature(data: bytes, manifest: Manifest) -> tuple[str, bytes]:
    try:
        parsed = json.loads(data.decode("utf-8"))
        if not isinstance(parsed, dict) or parsed.get("algorithm") != SIGNATURE_ALGORITHM:
            raise ValueError(f"algorithm must be {SIGNATURE_ALGORITHM!r}")
        key_id = parsed["key_id"]
        signature = base64.b64decode(parsed["signature"], validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ArtefactError(f"signature.json is malformed: {exc}", reason="bad_signature") from None
    if key_id != manifest.signer_key_id or len(signature) != 64:
        raise ArtefactError(
            "signature.json names another key than the manifest, or is not 64 bytes",
            reason="bad_signature",
        )
    return str(key_id), signature
