"""The exported artefact: what it holds, that it comes back bit for bit in its precision, and
that a device refuses one that was tampered with, truncated or signed by someone else."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from device.model_id import digest_of
from device.trust import TrustedKeys
from device.wire.artefact import (
    ArtefactError,
    Manifest,
    build_artefact,
    encode_content,
    manifest_bytes,
    read_artefact,
)
from device.wire.precision import decode_values, encode_values
from fleet.deploy.export import export_dense
from fleet.deploy.signing import generate_key
from tests.deploy.helpers import RUN, make_fleet, pruned_weights


def _rezip(data: bytes, replace: dict[str, bytes]) -> bytes:
    """The artefact with some entries' bytes replaced (same names and order)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info)))
    return out.getvalue()


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_export_then_import_is_bit_identical_in_the_chosen_precision(
    tmp_path: Path, values: str
) -> None:
    """A device must run exactly the quantised model the manifest's digest names: every value
    decodes to what the codec makes of the checkpoint's value, bit for bit, masks unchanged."""
    fleet = make_fleet(tmp_path)
    exported = fleet.export(values=values)
    checkpoint = fleet.store.load_checkpoint(RUN)
    decoded = exported.artefact.model()
    assert decoded.pruned == set(checkpoint.masks)
    for name, weight in checkpoint.weights.items():
        tensor = decoded.tensors[name]
        mask = checkpoint.masks.get(name, np.ones(weight.shape, dtype=bool))
        assert np.array_equal(tensor.mask, mask)
        kept = weight[mask].astype(np.float32)
        raw, scale = encode_values(kept, values, "nearest", None)
        expected = decode_values(bytes(raw), values, kept.size, scale, name)
        assert tensor.values.tobytes() == expected.tobytes(), name
        if values == "fp32":
            assert tensor.values.tobytes() == kept.tobytes()
    assert decoded.computed_digest() == decoded.digest


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_an_imported_model_exports_to_the_same_bytes(tmp_path: Path, values: str) -> None:
    """Round trip the other way: the decoded model, encoded again in its precision, gives the
    same tensor bytes (nothing drifts when an artefact is re-exported)."""
    fleet = make_fleet(tmp_path)
    decoded = fleet.export(values=values).artefact.model()
    content = read_artefact(fleet.export(values=values).data).content
    again, digest = encode_content(
        model_name=decoded.model_name,
        model_version=decoded.version,
        mask_version=decoded.version,
        weights={n: decoded.dense(n) for n in decoded.tensors},
        masks=decoded.masks(),
        values=values,
        run_id=RUN,
        round_=1,
    )
    assert digest == decoded.digest
    assert again == content


def test_exporting_twice_gives_the_same_file(tmp_path: Path) -> None:
    """Zip dates are fixed and Ed25519 is deterministic: the same export is the same bytes."""
    fleet = make_fleet(tmp_path)
    assert fleet.export(now=1.0).data == fleet.export(now=1.0).data


def test_the_manifest_says_what_the_model_is_and_where_it_came_from(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, versions=3)
    manifest = fleet.export(round_=2, values="int8").manifest
    assert manifest.version == "lab-r2-int8"
    assert manifest.model == "mlp"
    assert manifest.architecture_digest == digest_of("mlp").hex()
    assert manifest.classes == tuple(str(i) for i in range(10))
    assert manifest.input_shape == (1, 8, 8)
    assert manifest.preprocess == {"mean": [0.3053], "std": [0.376]}
    assert dict(manifest.source) == {
        "run": RUN,
        "round": 2,
        "model_version": 2,
        "strategy": "feddst",
    }
    assert manifest.metrics == {"accuracy": pytest.approx(0.52), "federated_accuracy": 0.4}
    assert manifest.sizes["parameters"] == 4810
    assert manifest.sizes["density"] == pytest.approx(0.3, abs=0.01)
    assert manifest.signer_key_id == fleet.key.key_id
    assert manifest.source_model_digest == fleet.store.checkpoint_record(RUN, 2).digest


def test_an_unknown_round_or_run_is_a_clear_error(tmp_path: Path) -> None:
    from device.errors import NotFoundError

    fleet = make_fleet(tmp_path)
    with pytest.raises(NotFoundError, match="round 7"):
        fleet.export(round_=7)
    with pytest.raises(NotFoundError, match="nope"):
        from fleet.deploy.export import export_run

        export_run(fleet.store, "nope", fleet.key)


def test_a_valid_artefact_verifies(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    artefact = read_artefact(fleet.export().data)
    fleet.trusted().verify(artefact)  # no exception


def test_tampered_tensors_are_refused_by_their_digest(tmp_path: Path) -> None:
    """Changing one byte of the tensors (the manifest and its signature untouched) is caught."""
    fleet = make_fleet(tmp_path)
    data = fleet.export().data
    content = bytearray(read_artefact(data).content)
    content[-1] ^= 0x01
    with pytest.raises(ArtefactError) as info:
        read_artefact(_rezip(data, {"model.pb": bytes(content)}))
    assert info.value.reason == "digest_mismatch"


def test_a_tampered_manifest_fails_its_signature(tmp_path: Path) -> None:
    """A manifest edited to name other classes (still canonical JSON) no longer verifies."""
    fleet = make_fleet(tmp_path)
    data = fleet.export().data
    artefact = read_artefact(data)
    edited = Manifest.from_json(
        {**artefact.manifest.to_json(), "classes": [f"c{i}" for i in range(10)]}
    )
    tampered = read_artefact(_rezip(data, {"manifest.json": manifest_bytes(edited)}))
    with pytest.raises(ArtefactError) as info:
        fleet.trusted().verify(tampered)
    assert info.value.reason == "bad_signature"


def test_a_truncated_artefact_is_refused(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    data = fleet.export().data
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(ArtefactError) as info:
            read_artefact(data[:cut])
        assert info.value.reason == "not_zip"


def test_another_fleets_key_is_not_trusted(tmp_path: Path) -> None:
    """Signed by a key the device does not trust: refused, naming the key."""
    fleet = make_fleet(tmp_path)
    stranger = generate_key(tmp_path / "other-pki")
    artefact = read_artefact(fleet.export().data)
    with pytest.raises(ArtefactError) as info:
        TrustedKeys([stranger.public_raw]).verify(artefact)
    assert info.value.reason == "untrusted_key"
    assert fleet.key.key_id in str(info.value)


def test_a_signature_by_another_key_under_our_key_id_is_refused(tmp_path: Path) -> None:
    """Forging the key id does not help: the signature is checked with the trusted key."""
    fleet = make_fleet(tmp_path)
    stranger = generate_key(tmp_path / "other-pki")
    artefact = read_artefact(fleet.export().data)
    forged = read_artefact(
        build_artefact(artefact.manifest, artefact.content, stranger.sign)  # our key id inside
    )
    with pytest.raises(ArtefactError) as info:
        fleet.trusted().verify(forged)
    assert info.value.reason == "bad_signature"


def test_entries_are_bounded_and_exactly_the_three(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    data = fleet.export().data
    with pytest.raises(ArtefactError) as info:
        read_artefact(data, max_content_bytes=100)
    assert info.value.reason == "too_large"
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info_ in src.infolist():
            dst.writestr(info_, src.read(info_))
        dst.writestr("extra.txt", b"hello")
    with pytest.raises(ArtefactError) as info:
        read_artefact(out.getvalue())
    assert info.value.reason == "bad_entry"


def test_a_manifest_with_unknown_or_missing_fields_is_refused(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    data = fleet.export().data
    parsed = json.loads(read_artefact(data).manifest_data)
    for broken in (
        {**parsed, "format": "other/1"},
        {k: v for k, v in parsed.items() if k != "classes"},
    ):
        text = json.dumps(broken, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(ArtefactError) as info:
            read_artefact(_rezip(data, {"manifest.json": text}))
        assert info.value.reason == "bad_manifest"
    extra = json.dumps({**parsed, "surprise": 1}, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ArtefactError, match="canonical"):
        read_artefact(_rezip(data, {"manifest.json": extra}))


def test_int8_artefact_of_femnist_at_density_0_1_is_at_most_1_25_of_the_dense_file(
    tmp_path: Path,
) -> None:
    """The size target of docs/benchmarks.md, on seeded weights (bench/deploy.py measures a
    trained model): int8 values plus entropy-coded positions, deflated."""
    import torch

    from device.models import create_model

    fleet = make_fleet(tmp_path, model="femnist_cnn", versions=1, density=0.1)
    data = fleet.export(dataset="mnist").data
    buffer = io.BytesIO()
    torch.save(create_model("femnist_cnn", seed=0).state_dict(), buffer)
    assert len(data) * 25 <= len(buffer.getvalue())


def test_a_dense_torchscript_export_computes_what_the_artefact_does(tmp_path: Path) -> None:
    import torch

    from device.inference import build

    fleet = make_fleet(tmp_path)
    artefact = read_artefact(fleet.export(values="int8").data)
    path = export_dense(artefact, tmp_path / "model.pt", "torchscript")
    with warnings.catch_warnings():  # torch.jit is deprecated, still what libtorch loads
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path))
    x = torch.randn(4, 1, 8, 8)
    model, _ = build(artefact, plan="dense")
    assert np.allclose(scripted(x).detach().numpy(), model.logits(x.numpy()), atol=1e-5)


def test_weights_helper_prunes_to_the_density() -> None:
    weights, masks = pruned_weights(density=0.25)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.size for m in masks.values())
    assert kept / total == pytest.approx(0.25, abs=0.01)
    for name, mask in masks.items():
        assert not weights[name][~mask].any()
