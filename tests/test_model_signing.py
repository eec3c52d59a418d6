"""Every model a device installs is signed by the server; anything else is refused.

The server seals each deployed version (Ed25519 over the weights' digest and
the version number); the seal travels in the poll and is recorded as registry
tags. A device checks it before installing a model and again when it loads its
deployed model from its store: a model altered in flight or in the store,
signed by another key, or sent without a seal is refused, counted, reported,
and the device keeps the model it had.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from inprocess_helpers import fed_device, run_captured
from signing_helpers import deploy_signed, trusting

from clients.store import DeviceStore
from fedge.contracts import model as nets
from fedge.contracts import protocol as p
from fedge.contracts.config_load import load_config
from fedge.contracts.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    REFUSAL_CODES,
    SHA256_TAG,
    SIGNATURE_TAG,
    SIGNING_KEY_TAG,
    ModelSeal,
    ModelSigner,
    SigningKeyError,
    server_signer,
    weights_digest,
)
from fedge.contracts.wire import from_arrays, to_arrays
from fedge.engines.inprocess import InProcessGrid

CFG = load_config(
    None,
    ["scenario.clients=2", "scenario.ticks=6", "scenario.schedule.at=4", "scenario.bad_row_fraction=0.0"],
)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    model = nets.build_model(2, 2, CFG.model.hidden, CFG.model.layers)
    nets.initial_weights(model, seed)
    return nets.get_weights(model)


# -- the seal ------------------------------------------------------------------------------------
def test_the_digest_names_every_byte_dtype_and_shape_but_not_the_order() -> None:
    w = _weights()
    digest = weights_digest(w)
    assert weights_digest(dict(reversed(list(w.items())))) == digest
    name = next(iter(w))
    flipped = {k: v.copy() for k, v in w.items()}
    flipped[name].reshape(-1).view(np.uint8)[0] ^= 1
    assert weights_digest(flipped) != digest, "one flipped bit changes the digest"
    assert weights_digest({**w, name: w[name].astype(np.float64)}) != digest
    assert weights_digest({**w, name: w[name].reshape(-1)}) != digest
    assert weights_digest({**w, "extra": np.zeros(0, dtype=np.float32)}) != digest


def test_a_seal_verifies_only_for_its_weights_version_and_key() -> None:
    signer, other = ModelSigner.generate(), ModelSigner.generate()
    verifier, w = signer.verifier(), _weights()
    seal = signer.seal(3, w)
    assert verifier.check(3, w, seal) is None
    assert verifier.check(4, w, seal) == "bad-signature", "relabelled as another version"
    assert verifier.check(3, _weights(1), seal) == "digest-mismatch"
    assert verifier.check(3, w, None) == "unsigned"
    assert verifier.check(3, w, other.seal(3, w)) == "unknown-key"
    forged = ModelSeal(seal.sha256, other.seal(3, w).signature, seal.key)
    assert verifier.check(3, w, forged) == "bad-signature", "another key's signature, our fingerprint"
    assert verifier.check(3, w, ModelSeal("zz", seal.signature, seal.key)) == "malformed"


def test_the_server_key_is_owner_only_reused_and_its_public_half_published(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = server_signer(state)
    assert stat.S_IMODE((state / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / PUBLIC_KEY_FILE).stat().st_mode) == 0o644
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    again = ModelSigner.load(state)
    assert again.fingerprint == first.fingerprint, "a restarted server keeps the key devices trust"
    os.chmod(state / PRIVATE_KEY_FILE, 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        ModelSigner.load(state)


# -- the device ----------------------------------------------------------------------------------
def test_a_device_refuses_unsigned_and_foreign_models_and_keeps_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    device = fed_device(cfg, 0, tmp_path / "d.sqlite")
    good = _weights(0)
    assert deploy_signed(device, signer, 1, good)
    caplog.set_level(logging.WARNING, logger="fedge.device")
    assert not device.deploy(2, _weights(1)), "no seal"
    assert not device.deploy(2, _weights(1), seal=ModelSigner.generate().seal(2, _weights(1)))
    assert device.version == 1
    assert all(np.array_equal(a, good[k]) for k, a in nets.get_weights(device._model).items())
    report = device.report_for(0)
    assert report.model_version == 1
    assert report.models_refused == 2
    assert report.model_refusal == REFUSAL_CODES["unknown-key"]
    assert sum("refused model v2" in r.getMessage() for r in caplog.records) == 2
    device.close()
    device = fed_device(cfg, 0, tmp_path / "d.sqlite")
    assert device.version == 1, "the refusals did not touch the stored model"
    assert device.report_for(1).models_refused == 2, "the count survives a restart"


def test_a_device_without_the_server_key_installs_nothing(tmp_path: Path) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    (tmp_path / "signing" / PUBLIC_KEY_FILE).unlink()
    device = fed_device(cfg, 0, tmp_path / "d.sqlite")
    assert not deploy_signed(device, signer, 1, _weights())
    assert device.version == 0
    assert device.report_for(0).model_refusal == REFUSAL_CODES["no-public-key"]


def test_a_model_tampered_in_the_store_is_refused_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, signer = trusting(CFG, tmp_path)
    path = tmp_path / "d.sqlite"
    device = fed_device(cfg, 0, path)
    weights = _weights()
    assert deploy_signed(device, signer, 1, weights)
    device.close()
    with DeviceStore(path) as store:  # someone edits the model on the device's disk
        version, stored = store.get_model()  # type: ignore[misc]
        name = next(iter(stored))
        stored[name] = stored[name] + 0.5
        store.put_model(version, stored)
    caplog.set_level(logging.WARNING, logger="fedge.device")
    device = fed_device(cfg, 0, path)
    assert device.version == 0, "the tampered model is not used"
    assert not np.array_equal(nets.get_weights(device._model)[name], stored[name])
    device.sync()
    device._load()  # another process reloads the same store: counted once
    report = device.report_for(0)
    assert report.model_version == 0 and report.n_errors == 0
    assert report.models_refused == 1
    assert report.model_refusal == REFUSAL_CODES["digest-mismatch"]
    assert sum("from its store" in r.getMessage() for r in caplog.records) == 1
    # The server's next poll brings the signed model back.
    assert deploy_signed(device, signer, 1, weights) and device.version == 1


# -- end to end ----------------------------------------------------------------------------------
def _overrides(tmp_path: Path, clients: int) -> list[str]:
    return [
        f'run.output_dir="{tmp_path}"',
        f"scenario.clients={clients}",
        "scenario.ticks=5",
        "scenario.schedule.at=3",
        "scenario.bad_row_fraction=0.0",
        "campaign.rounds=1",
        "campaign.initial_rounds=2",
        'trigger.policy="always"',
        "trigger.cooldown=0",
        "campaign.min_improvement=-1.0",
    ]


def _reports(crossed: list[tuple[Message, Message]]) -> dict[int, list[p.DriftReport]]:
    out: dict[int, list[p.DriftReport]] = {}
    for request, reply in crossed:
        if request.metadata.message_type == "query" and not reply.has_error():
            report = p.DriftReport.from_dict(reply.content[p.REPORT])
            out.setdefault(report.device, []).append(report)
    return out


def _carries_model(msg: Message) -> bool:
    return msg.metadata.message_type == "query" and p.ARRAYS in msg.content.array_records


def test_signed_models_are_promoted_deployed_and_tagged(tmp_path: Path) -> None:
    summary, crossed = run_captured(_overrides(tmp_path, 2), tmp_path / "run")
    assert summary["model_refusals"] == {}
    versions = {int(v["version"]): v["tags"] for v in summary["versions"]}
    assert len(versions) >= 2, "campaigns registered versions"
    signer = ModelSigner.load(tmp_path / "state")
    verifier = signer.verifier()
    sent = [q for q, _ in crossed if _carries_model(q)]
    assert sent, "the server deployed models"
    for q in sent:
        config = q.content.config_records[p.CONFIG]
        version = int(config[p.CHAMPION_VERSION])
        weights = from_arrays(q.content.array_records[p.ARRAYS])
        seal = ModelSeal(
            str(config[p.MODEL_SHA256]), str(config[p.MODEL_SIGNATURE]), str(config[p.MODEL_SIGNING_KEY])
        )
        assert verifier.check(version, weights, seal) is None
        tags = versions[version]
        assert (tags[SHA256_TAG], tags[SIGNATURE_TAG], tags[SIGNING_KEY_TAG]) == (
            seal.sha256,
            seal.signature,
            signer.fingerprint,
        ), "the registry records the seal the devices got"
    latest = max(int(q.content.config_records[p.CONFIG][p.CHAMPION_VERSION]) for q in sent)
    for device, reports in _reports(crossed).items():
        assert reports[-1].model_version == latest, f"device {device} runs the latest model"
        assert reports[-1].models_refused == 0


def _resealed_by_another_key(msg: Message) -> None:
    config = msg.content.config_records[p.CONFIG]
    weights = from_arrays(msg.content.array_records[p.ARRAYS])
    seal = ModelSigner.generate().seal(int(config[p.CHAMPION_VERSION]), weights)
    config[p.MODEL_SHA256], config[p.MODEL_SIGNATURE] = seal.sha256, seal.signature
    config[p.MODEL_SIGNING_KEY] = seal.key


def _weight_flipped(msg: Message) -> None:
    weights = {k: v.copy() for k, v in from_arrays(msg.content.array_records[p.ARRAYS]).items()}
    first = next(iter(weights))
    weights[first].reshape(-1)[0] += 1.0
    # A record of its own: the server shares one record among the nodes it sends a version to.
    msg.content[p.ARRAYS] = to_arrays(weights)


def _signature_flipped(msg: Message) -> None:
    config = msg.content.config_records[p.CONFIG]
    sig = bytearray.fromhex(str(config[p.MODEL_SIGNATURE]))
    sig[5] ^= 0x01
    config[p.MODEL_SIGNATURE] = sig.hex()


def _stripped(msg: Message) -> None:
    config = msg.content.config_records[p.CONFIG]
    for key in (p.MODEL_SHA256, p.MODEL_SIGNATURE, p.MODEL_SIGNING_KEY):
        del config[key]


#: Device -> how its polls are attacked after its first model; device 4 is left alone.
ATTACKS = {
    0: (_weight_flipped, "digest-mismatch"),
    1: (_signature_flipped, "bad-signature"),
    2: (_resealed_by_another_key, "unknown-key"),
    3: (_stripped, "unsigned"),
}


def test_models_altered_in_flight_are_refused_and_the_previous_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    push = InProcessGrid.push_messages
    installed: dict[int, int] = {}
    attacked: dict[int, list[int]] = {}

    def tamper(grid: InProcessGrid, messages: Any) -> Any:
        messages = list(messages)
        for msg in messages:
            device = msg.metadata.dst_node_id - 1000
            if not _carries_model(msg) or device not in ATTACKS:
                continue
            version = int(msg.content.config_records[p.CONFIG][p.CHAMPION_VERSION])
            if device not in installed:
                installed[device] = version  # the first model arrives intact
                continue
            ATTACKS[device][0](msg)
            attacked.setdefault(device, []).append(version)
        return push(grid, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", tamper)
    caplog.set_level(logging.WARNING)
    summary, crossed = run_captured(_overrides(tmp_path, 5), tmp_path / "run")

    reports = _reports(crossed)
    latest = reports[4][-1].model_version
    assert latest > 1 and reports[4][-1].models_refused == 0, "the untouched device follows along"
    assert set(attacked) == set(ATTACKS), "every attacked device was offered a later model"
    refusals = summary["model_refusals"]
    assert set(refusals) == {str(d) for d in ATTACKS}
    for device, (_, reason) in ATTACKS.items():
        last = reports[device][-1]
        assert last.model_version == installed[device] < latest, f"device {device} kept its model"
        assert last.models_refused == len(attacked[device])
        assert last.model_refusal == REFUSAL_CODES[reason]
        assert refusals[str(device)]["reason"] == reason
        assert refusals[str(device)]["kept_version"] == installed[device]
    server_lines = [r.getMessage() for r in caplog.records if r.name == "fedge.server"]
    for device in ATTACKS:
        said = [line for line in server_lines if f"device {device} refused" in line]
        # One line per version refused, not one per poll that re-offered it.
        assert len(said) == len(set(attacked[device])), said
    # The reports saying so passed the egress policy (a blocked reply arrives as an error).
    for request, reply in crossed:
        if request.metadata.message_type == "query":
            assert not reply.has_error(), reply.error
