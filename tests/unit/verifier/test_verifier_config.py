"""VerifierConfig: defaults are valid, inputs are normalised and validated, instances are frozen."""

import dataclasses

import pytest

from efedllm.dht.quorum import QuorumRule
from efedllm.verifier.config import VerifierConfig
from efedllm.verifier.trust import RobustPolicy


def test_defaults_are_valid_and_robust(tmp_path):
    config = VerifierConfig(ledger_path=tmp_path / "ledger.sqlite")
    assert config.policy == "robust" and isinstance(config.make_policy(), RobustPolicy)
    assert config.weight("anyone") == 1.0
    hash(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.theta = 0.1


def test_weights_keys_and_quorum_are_normalised(tmp_path):
    config = VerifierConfig(
        weights={"b": 0.5, "a": 2}, trusted_verifier_keys=["k1", "k2", "k3"], quorum="2", ledger_path=str(tmp_path / "l")
    )
    assert config.weights == (("a", 2.0), ("b", 0.5))
    assert config.weight("b") == 0.5 and config.weight("c") == 1.0
    assert config.quorum == QuorumRule(2) and config.trusted_verifier_keys == frozenset({"k1", "k2", "k3"})
    assert config.make_policy().theta == config.theta


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"theta": 0.0}, "theta"),
        ({"theta": 1.2}, "theta"),
        ({"policy": "strict"}, "policy"),
        ({"window": 0}, "window"),
        ({"confidence": 0.3}, "confidence"),
        ({"probe_interval_s": 0}, "probe_interval_s"),
        ({"epoch_seconds": float("inf")}, "epoch_seconds"),
        ({"reward_per_epoch": -1.0}, "reward_per_epoch"),
        ({"weights": {"a": -1.0}}, "weight of a"),
        ({"quorum": "most"}, "quorum"),
        ({"quorum": 3, "trusted_verifier_keys": ["k1", "k2"]}, "exceeds"),
        ({"trusted_verifier_keys": [""]}, "trusted_verifier_keys"),
        ({"tolerances": 0.05}, "tolerances"),
    ],
)
def test_bad_values_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        VerifierConfig(**fields)
