"""A verifier on a real swarm: faulty servers are deactivated, honest ones never; clients route around them.

Own swarm (not the package's 3-server one): honest float32 servers on 0:10, 10:20, 20:30, an
honest bfloat16 server, and one server per fault mode, every one hosting 10 blocks.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from playwright.sync_api import sync_playwright

from efedllm.api.app import ApiServer
from efedllm.api.config import ApiConfig
from efedllm.client.config import RemoteClientConfig
from efedllm.client.local import LocalModelForCausalLM
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.sampling import GenerationConfig
from efedllm.common.spans import Span
from efedllm.dht.records import TrustVerdict
from efedllm.dht.identity import peer_id_of_owner
from efedllm.dht.signed import owner_key
from efedllm.dht.verdicts import deactivated_peers_in_dht, fetch_verdicts, verdict_key
from efedllm.server.swarm import LocalSwarm, peer_id_of
from efedllm.verifier.config import VerifierConfig
from efedllm.verifier.ledger import epoch_of
from efedllm.verifier.node import Verifier, VerifierNodeConfig, reference_trace

pytestmark = pytest.mark.swarm
MODEL = "smollm2-135m"
HONEST = {"honest-0": ("0:10", []), "honest-1": ("10:20", []), "honest-2": ("20:30", []),
          "honest-bf16": ("10:20", ["--dtype", "bfloat16"])}
# noise:0.01 sits on 0:10, where 1% noise is as small as honest bfloat16 rounding: it is caught because
# it announces float32 and is held to float32 agreement (the bfloat16 server announces bfloat16)
FAULTY = {"noise": ("0:10", ["--fault", "noise:0.01"]), "zeros": ("10:20", ["--fault", "zeros"]),
          "skip-blocks": ("20:30", ["--fault", "skip-blocks"]), "wrong-model": ("0:10", ["--fault", "wrong-model"]),
          "intermittent": ("20:30", ["--fault", "intermittent:0.1"])}
MAX_ROUNDS = 25
DECODE_STEPS = 8  # 9 steps a probe: an intermittent:0.1 server fails a probe with probability 1 - 0.9**9 = 0.61


@pytest.fixture(scope="module")
def verified_swarm(tmp_path_factory):
    """The swarm, a started verifier, and the round each faulty server was first seen inactive."""
    with LocalSwarm(MODEL) as swarm:
        swarm.start_bootstrap()
        names = {}
        for name, (blocks, extra) in {**HONEST, **FAULTY}.items():
            names[name] = swarm.start_server(blocks, extra=["--no-rebalance", *extra])
        swarm.wait_until_online(len(names), timeout=300)
        peers = {name: peer_id_of(server) for name, server in names.items()}
        decisions = VerifierConfig(ledger_path=tmp_path_factory.mktemp("ledger") / "ledger.sqlite", epoch_seconds=5.0)
        verifier = Verifier(VerifierNodeConfig(MODEL, tuple(swarm.initial_peers), rounds=MAX_ROUNDS,
                                               decode_steps=DECODE_STEPS, jitter_s=0.05, seed=0, decisions=decisions))
        try:
            verifier.start()
            yield swarm, verifier, peers, _run_until_faulty_inactive(verifier, peers)
        finally:
            verifier.shutdown()


def _run_until_faulty_inactive(verifier, peers) -> dict[str, int]:
    honest, faulty = {peers[name] for name in HONEST}, {peers[name] for name in FAULTY}
    detected: dict[str, int] = {}
    for _ in range(MAX_ROUNDS):
        report = verifier.run_round()
        assert len(report.outcomes) == len(peers), report.to_json()
        assert not report.inactive & honest, f"honest server deactivated in round {report.round}: {report.to_json()}"
        for peer in report.inactive & faulty:
            detected.setdefault(peer, report.round)
        if faulty <= report.inactive:
            break
    return detected


def test_every_faulty_server_deactivated_no_honest_one(verified_swarm):
    _, verifier, peers, detected = verified_swarm
    names = {peer: name for name, peer in peers.items()}
    assert {names[peer] for peer in detected} == set(FAULTY)
    for name in ("noise", "zeros", "skip-blocks", "wrong-model"):
        assert detected[peers[name]] <= 3, (name, detected)  # robust policy: two failed probes of two suffice
    assert detected[peers["intermittent"]] <= MAX_ROUNDS
    assert all(verifier.active[peers[name]] for name in HONEST)


def test_verdicts_in_dht_and_client_routes_around(verified_swarm):
    swarm, verifier, peers, _ = verified_swarm
    faulty = {peers[name] for name in FAULTY}
    assert deactivated_peers_in_dht(swarm.dht, MODEL, peers.values(), {verifier.key}) == faulty
    assert deactivated_peers_in_dht(swarm.dht, MODEL, peers.values(), {"00" + verifier.key}) == set()
    assert deactivated_peers_in_dht(swarm.dht, MODEL, peers.values(), ()) == set()

    local = LocalModelForCausalLM(verifier.parts, [verifier.reference])
    greedy = GenerationConfig(max_new_tokens=16, greedy=True, stop_on_eos=False)
    input_ids = local.encode_prompt("Name three colours of the rainbow.")
    expected = local.generate(input_ids, greedy).token_ids
    client = DistributedModelForCausalLM.from_pretrained(
        MODEL, swarm.initial_peers, RemoteClientConfig(trusted_verifier_keys=(verifier.key,)))
    try:
        assert client.view.deactivated_peers() == faulty
        for _ in range(5):  # routes tie on cost, so several draws; none may touch a faulty server
            assert not {hop.peer_id for hop in client.view.find_route(set())} & faulty
        assert client.generate(input_ids, greedy).token_ids == expected
    finally:
        client.shutdown()


def test_ledger_pays_only_active_servers(verified_swarm):
    """Every epoch pays only servers active at its close; once faults are found, only honest ones."""
    _, verifier, peers, _ = verified_swarm
    seconds = verifier.config.decisions.epoch_seconds
    detected_epoch = epoch_of(time.time(), seconds)  # every later epoch starts after all faults were found
    paid_after: set[str] = set()
    for _ in range(30):  # a round can outlast a 5-s epoch on a loaded machine: go on until a later epoch pays
        verifier.run_round()
        verifier.close_finished_epochs()
        credits = verifier.ledger.credits()
        paid_after = {credit.peer_id for credit in credits if credit.epoch > detected_epoch and credit.amount > 0}
        if paid_after:
            break
    assert all(credit.active for credit in credits if credit.amount > 0)
    assert paid_after and paid_after <= {peers[name] for name in HONEST}


def test_verdict_cannot_be_overwritten_by_another_key(verified_swarm):
    swarm, verifier, peers, _ = verified_swarm
    target = peers["zeros"]
    key = verdict_key(MODEL, target)
    original = swarm.dht.get(key, latest=True).value[verifier.validator.local_public_key]
    assert original.value["active"] is False
    attacker_validator = RSASignatureValidator(RSAPrivateKey())
    attacker = DHT(initial_peers=swarm.initial_peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                   record_validators=[attacker_validator])
    try:
        forged = {**original.value, "active": True, "score": 1.0, "timestamp": original.value["timestamp"] + 1}
        expiration = original.expiration_time + 600
        attacker.store(key, forged, expiration, subkey=verifier.validator.local_public_key)
        # a verdict signed by the attacker's own key that claims to speak for the verifier is dropped on read
        impostor = TrustVerdict.from_wire({**forged, "verifier_key": verifier.key})
        attacker.store(key, impostor.to_wire(), expiration, subkey=attacker_validator.local_public_key)
        assert owner_key(attacker_validator) != verifier.key
        for reader in (swarm.dht, attacker):
            entry = reader.get(key, latest=True).value[verifier.validator.local_public_key]
            assert entry.value == original.value and entry.expiration_time == original.expiration_time
            verdicts = fetch_verdicts(reader, MODEL, [target])
            assert [v.active for v in verdicts if v.verifier_key == verifier.key] == [False]
    finally:
        attacker.shutdown()


def test_reference_trace_matches_a_whole_span_forward(verified_swarm):
    _, verifier, _, _ = verified_swarm
    token_ids = torch.arange(100, 140).unsqueeze(0)  # [1, 40]
    trace = reference_trace(verifier.parts, verifier.reference, token_ids, decode_steps=3)
    with torch.inference_mode():
        whole = verifier.reference(verifier.parts.embed(token_ids), blocks=Span(0, 20))  # no cache: one causal pass
    assert trace.tokens == 40 and len(trace.steps) == 4
    torch.testing.assert_close(trace.expected(Span(10, 20)), whole, rtol=1e-4, atol=1e-3)


def test_api_monitor_shows_verdicts_deactivations_and_balances(verified_swarm, tmp_path):
    """The API's swarm monitor over this swarm, in a real Chromium: the verifier's verdicts (trusted), its
    deactivations in red and the ledger's balances; a screenshot is saved under the test's temporary folder."""
    swarm, verifier, peers, _ = verified_swarm
    faulty = {peers[name] for name in FAULTY}
    config = ApiConfig(model=MODEL, initial_peers=tuple(swarm.initial_peers), port=0, probe_interval=0,
                       ledger_path=str(verifier.config.decisions.ledger_path),
                       client=RemoteClientConfig(trusted_verifier_keys=(verifier.key,)))
    api = ApiServer(config).start()
    try:
        snapshot = httpx.get(api.url + "/api/swarm", timeout=60).json()
        rows = {row["peer_id"]: row for row in snapshot["servers"]}
        assert set(rows) == set(peers.values()) and snapshot["ledger"]
        assert {peer for peer, row in rows.items() if row["state"] == "deactivated"} == faulty
        for peer, row in rows.items():
            (verdict,) = [v for v in row["verdicts"] if v["verifier"] == peer_id_of_owner(verifier.key)]
            assert verdict["trusted"] and verdict["active"] == (peer not in faulty)
        assert all(rows[peers[name]]["balance"] > 0 for name in HONEST)  # paid by the ledger test before this one
        chromium = shutil.which("chromium")
        assert chromium, "Debian's chromium is not installed (make test installs it with apt)"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 800})
            page.goto(api.url + "/#monitor")
            page.wait_for_function(f"() => document.querySelectorAll('#servers tbody tr').length === {len(peers)}",
                                   timeout=60_000)
            assert page.locator("#servers td.state-deactivated").count() == len(faulty)
            page.screenshot(path=str(tmp_path / "monitor-verified.png"), full_page=True)
            browser.close()
        print(f"monitor screenshot: {tmp_path / 'monitor-verified.png'}")
    finally:
        api.shutdown()
