"""Value precision per direction, a run option every strategy shares.

``upload_values``: how devices encode the deltas they upload; ``download_values``: how the global
model's values travel to devices. Each is a ``ValueDType`` ("fp32", "fp16", "bf16", "int8",
"int4"); int8/int4 are symmetric per-tensor quantisation, uploads with error feedback on the
device (``device.feedback``). The server aggregates in fp32 whatever travels.

``upload_dtype`` is the older name of ``upload_values`` and stays accepted: give either (or both
with the same value).
"""

from __future__ import annotations

from typing import Any

from device.errors import ConfigError
from device.wire.messages import ValueDType

__all__ = ["coerce_precision", "resolve_precisions"]


def coerce_precision(strategy: str, option: str, value: object) -> ValueDType:
    """``value`` (a ``ValueDType`` or its name) as a ``ValueDType``; ``ConfigError`` naming the
    strategy, the option and the known precisions otherwise."""
    if isinstance(value, ValueDType):
        return value
    if isinstance(value, str):
        try:
            return ValueDType(value)
        except ValueError:
            pass
    known = ", ".join(member.value for member in ValueDType)
    raise ConfigError(f"{strategy}: {option} must be one of {known}, got {value!r}")


def resolve_precisions(options: Any, strategy: str) -> None:
    """Check and settle a frozen options dataclass's ``upload_dtype``, ``upload_values`` and
    ``download_values`` in place: afterwards both upload fields hold the same ``ValueDType``
    and ``download_values`` is a ``ValueDType``. Call first in ``__post_init__``."""
    alias = coerce_precision(strategy, "upload_dtype", options.upload_dtype)
    upload = options.upload_values
    if upload is None:
        upload = alias
    else:
        upload = coerce_precision(strategy, "upload_values", upload)
        if alias is not ValueDType.FP32 and alias is not upload:
            raise ConfigError(
                f"{strategy}: upload_dtype {alias.value!r} and upload_values {upload.value!r} "
                "disagree (upload_dtype is the older name of upload_values: give one)"
            )
    download = coerce_precision(strategy, "download_values", options.download_values)
    object.__setattr__(options, "upload_values", upload)
    object.__setattr__(options, "upload_dtype", upload)
    object.__setattr__(options, "download_values", download)
