"""How a run names its model: a registered name or a factory, with keyword arguments.

A :class:`ModelRef` is one of

* a **registered name**: a built-in (``mlp``, ``mnist_cnn``, ...) or a name that an installed
  package registers in the entry-point group ``sparsefleet.models`` (``device.model_registry``);
* a **factory**: ``"package.module:callable"``, any importable callable returning a
  ``torch.nn.Module``;

plus the ``kwargs`` the factory is called with (JSON values only: they travel in run files,
the store and every ``ModelSnapshot``), and optionally the shape of one example and the number
of classes (for checks against a dataset; not part of the model's identity).

Text form (``ModelRef.text``, ``ModelRef.parse``): the name or factory, followed by the
canonical JSON of the kwargs when there are any, e.g. ``mlp`` or
``my_pkg.models:build{"width":64}``. It is lossless for the identity (source and kwargs) and
is what ``model_name`` holds wherever a model is named by one string (``RunSpec``,
``GlobalModel``, ``ModelSnapshot``, the store), so each of those can rebuild the model.

This module imports neither torch nor the registry: it is the plain value that messages, run
files and the device config share. Building a model is ``device.models``; its architecture
digest is ``device.model_id``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from device.config import SettingError

__all__ = [
    "ARCHITECTURE_DIGEST_BYTES",
    "ModelOffer",
    "ModelRef",
    "canonical_json",
]

#: Length of an architecture digest (SHA-256) in bytes.
ARCHITECTURE_DIGEST_BYTES = 32

#: A registered name: letters, digits, ``_ . + -``, not starting with a punctuation mark.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
#: A factory: ``module.path:attribute.path`` (Python identifiers).
FACTORY_PATTERN = re.compile(rf"{_DOTTED}:{_DOTTED}")


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value``: keys sorted, no spaces, UTF-8 kept, no NaN/inf.

    Two values that compare equal as JSON give the same text in every process (Python's float
    ``repr`` is the shortest round-tripping form), which is what digests are computed over.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (tuples become lists); ``ValueError`` naming ``where`` for
    anything JSON cannot hold faithfully (non-string keys, NaN, objects)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


@dataclass(frozen=True)
class ModelRef:
    """A model as a run names it (module docstring). Exactly one of ``name`` and ``factory``.

    Attributes:
        name: a registered name (``device.model_registry.model_names()``), or "".
        factory: ``"package.module:callable"``, or "".
        kwargs: keyword arguments of the factory; JSON data (normalised: tuples become lists).
        input_shape: one example's shape without the batch dimension, each dimension >= 1;
            None when not declared.
        num_classes: logits per example, >= 1; None when not declared.

    Identity (equality of ``text``) is the source and the kwargs; ``input_shape`` and
    ``num_classes`` describe the data the model reads and are not part of it.
    """

    name: str = ""
    factory: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if bool(self.name) == bool(self.factory):
            raise SettingError(
                "factory" if self.factory else "name",
                "give exactly one of name (a registered model) and factory "
                "('package.module:callable')",
            )
        if self.name and not NAME_PATTERN.fullmatch(self.name):
            raise SettingError(
                "name",
                f"{self.name!r} is not a model name (letters, digits and _ . + -; a factory is "
                "written 'package.module:callable')",
            )
        if self.factory and not FACTORY_PATTERN.fullmatch(self.factory):
            raise SettingError(
                "factory",
                f"{self.factory!r} is not 'package.module:callable' (dotted Python names)",
            )
        if not isinstance(self.kwargs, Mapping):
            raise SettingError("kwargs", f"expected a mapping, got {type(self.kwargs).__name__}")
        try:
            plain = _plain(self.kwargs, "kwargs")
        except ValueError as exc:
            raise SettingError("kwargs", str(exc).removeprefix("kwargs: ")) from None
        object.__setattr__(self, "kwargs", plain)
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape
            ):
                raise SettingError(
                    "input_shape",
                    f"expected a non-empty list of dimensions >= 1, got {list(shape)}",
                )
            object.__setattr__(self, "input_shape", shape)
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 1
        ):
            raise SettingError("num_classes", f"must be an integer >= 1, got {self.num_classes!r}")

    def __hash__(self) -> int:
        return hash(self.text)

    @property
    def source(self) -> str:
        """The registered name or the factory: what a device must have to build the model."""
        return self.name or self.factory

    @property
    def is_factory(self) -> bool:
        return bool(self.factory)

    @property
    def text(self) -> str:
        """The lossless one-string form of the identity (module docstring)."""
        return self.source + (canonical_json(self.kwargs) if self.kwargs else "")

    def same_model(self, other: ModelRef) -> bool:
        """Whether both name the same model (source and kwargs; shapes are not compared)."""
        return self.text == other.text

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """The reference written as ``text`` (``ModelRef.text``): ``name``,
        ``package.module:callable``, either followed by a JSON object of kwargs.

        Raises:
            ValueError: not of that form (the message quotes ``text``).
        """
        stripped = text.strip()
        source, brace, rest = stripped.partition("{")
        source = source.strip()
        kwargs: Any = {}
        if brace:
            try:
                kwargs = json.loads(brace + rest)
            except json.JSONDecodeError as exc:
                raise ValueError(f"model {text!r}: its kwargs are not JSON ({exc.msg})") from None
            if not isinstance(kwargs, dict):
                raise ValueError(f"model {text!r}: its kwargs must be a JSON object")
        try:
            if ":" in source:
                return cls(factory=source, kwargs=kwargs)
            return cls(name=source, kwargs=kwargs)
        except SettingError as exc:
            raise ValueError(f"model {text!r}: {exc.reason}") from None

    @classmethod
    def of(cls, value: str | ModelRef) -> ModelRef:
        """``value`` itself, or the reference a string names (``parse``)."""
        return value if isinstance(value, ModelRef) else cls.parse(value)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (inverse: ``from_json``); undeclared fields are left out."""
        data: dict[str, Any] = {"name": self.name} if self.name else {"factory": self.factory}
        if self.kwargs:
            data["kwargs"] = dict(self.kwargs)
        if self.input_shape is not None:
            data["input_shape"] = list(self.input_shape)
        if self.num_classes is not None:
            data["num_classes"] = self.num_classes
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> ModelRef:
        """Rebuild a reference stored by ``to_json`` (or written as text); ``ValueError`` if
        malformed."""
        if isinstance(data, str):
            return cls.parse(data)
        known = {"name", "factory", "kwargs", "input_shape", "num_classes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model reference has unknown fields {unknown}")
        shape = data.get("input_shape")
        try:
            return cls(
                name=str(data.get("name", "")),
                factory=str(data.get("factory", "")),
                kwargs=data.get("kwargs") or {},
                input_shape=None if shape is None else tuple(shape),
                num_classes=data.get("num_classes"),
            )
        except SettingError as exc:
            raise ValueError(f"model reference {dict(data)!r}: {exc}") from None


@dataclass(frozen=True)
class ModelOffer:
    """A model a device can build, announced in its status message.

    ``architecture_digest`` is ``device.model_id.architecture_digest`` of the model the device
    builds for ``model`` (32 bytes), or empty when the device did not compute it.
    """

    model: ModelRef
    architecture_digest: bytes = b""

    def __post_init__(self) -> None:
        if self.architecture_digest and len(self.architecture_digest) != ARCHITECTURE_DIGEST_BYTES:
            raise ValueError(
                f"architecture digest of {self.model.text!r} must be "
                f"{ARCHITECTURE_DIGEST_BYTES} bytes, got {len(self.architecture_digest)}"
            )

    def to_json(self) -> dict[str, Any]:
        """JSON-able form, the digest in hex (inverse: ``from_json``)."""
        return {
            "model": self.model.to_json(),
            "architecture_digest": self.architecture_digest.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelOffer:
        """Rebuild an offer stored by ``to_json``; ``ValueError`` if malformed."""
        try:
            return cls(
                ModelRef.from_json(data["model"]),
                bytes.fromhex(str(data.get("architecture_digest", ""))),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"stored model offer is malformed: {exc!r}") from None


def offers_text(offers: Sequence[ModelOffer]) -> str:
    """``"mlp, my_pkg.models:build"``: the offered models, for one line of a table."""
    return ", ".join(offer.model.text for offer in offers)
