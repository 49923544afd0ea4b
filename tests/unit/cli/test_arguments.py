"""The CLI as a newcomer meets it: arguments are checked before any I/O and bad ones are named in one line."""

from __future__ import annotations

import json

import pytest

from efedllm.cli import build_parser, main
from efedllm.cli.generate import read_prompts

PEER = "QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"
ADDR = f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER}"
OTHER = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"


def one_line_error(argv: list[str], capsys) -> str:
    """Runs ``efedllm argv``; it must fail with exit code 2 and exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as raised:
        exit_code = main(argv)
        raise SystemExit(exit_code)
    captured = capsys.readouterr()
    assert raised.value.code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"efedllm {argv[0]}"), captured.err
    return lines[0]


def test_initial_peers_and_verifier_keys_do_not_swallow_the_prompt():
    args = build_parser("generate").parse_args(["generate", "--initial-peers", ADDR, "Hello"])
    assert args.prompt == "Hello" and args.initial_peers == [ADDR]
    args = build_parser("generate").parse_args(["generate", "--trusted-verifiers", "ab12", "Hello"])
    assert args.prompt == "Hello" and args.trusted_verifiers == ["ab12"]
    args = build_parser("generate").parse_args(["generate", "--trusted-verifiers", "ab,cd", "--trusted-verifiers", "ef", "Hi"])
    assert args.prompt == "Hi" and args.trusted_verifiers == ["ab", "cd", "ef"]
    args = build_parser("generate").parse_args(["generate", "Hello", "--initial-peers", f"{ADDR},{OTHER}", "--initial-peers", ADDR])
    assert args.prompt == "Hello" and args.initial_peers == [ADDR, OTHER, ADDR]


@pytest.mark.parametrize("command", [["generate", "Hello"], ["serve", "--blocks", "0:10"], ["verify"]])
@pytest.mark.parametrize("address", ["ADDR", "/ip4/127.0.0.1/tcp/4000", "/ip4/1.2.3/tcp/1/p2p/" + PEER,
                                     "/ip4/127.0.0.1/tcp/4000/p2p/not-a-peer-id"])
def test_a_malformed_multiaddr_is_named_before_anything_starts(command, address, capsys):
    line = one_line_error([*command, "--initial-peers", address], capsys)
    assert "--initial-peers" in line and repr(address) in line


@pytest.mark.parametrize("argv, message", [
    (["serve", "--blocks", "0:10", "--fault", "bogus"], "unknown mode 'bogus'"),
    (["serve", "--blocks", "0:99"], "exceeds the model's 30 blocks"),
    (["serve", "--blocks", "10-20"], "must look like START:END"),
    (["serve", "--num-blocks", "0"], "positive integer"),
    (["serve", "--blocks", "0:10", "--host", "localhost"], "IPv4 address"),
    (["serve", "--blocks", "0:10", "--port", "70000"], "0..65535"),
    (["serve", "--blocks", "0:10", "--announce-maddrs", "/ip4/1.2.3.4/tcp/0"], "explicit port"),
    (["serve", "--blocks", "0:10", "--announce-maddrs", "1.2.3.4:80"], "is not a multiaddr"),
    (["serve", "--blocks", "0:10", "--announce-maddrs", "/ip4/1.2.3.4/udp/80"], "must be /ip4|ip6|dns/HOST/tcp/PORT"),
    (["serve", "--blocks", "0:10", "--weights-from", "nobody"], "peer id"),
    (["serve", "--blocks", "0:10", "--trusted-verifiers", "a1", "--verifier-quorum", "2"], "exceeds the 1 trusted"),
    (["serve", "--blocks", "0:10", "--trusted-verifiers", "KEY"], "is not a verifier key"),
    (["serve", "--blocks", "0:10", "--verifier-quorum", "most"], "quorum must be one of"),
    (["serve", "--blocks", "0:10", "--svd-ratio", "1.5"], "ratio must be in (0, 1]"),
    (["serve", "--model", "no-such-model", "--blocks", "0:10"], "no-such-model"),
    (["generate", "Hello"], "give --initial-peers of a swarm, or --local"),
    (["generate", "Hello", "--max-new-tokens", "0"], "positive integer"),
    (["generate", "Hello", "--local", "--temperature", "0"], "temperature must be > 0"),
    (["generate", "Hello", "--local", "--spans", "0:10,10:20"], "do not cover blocks 0:30"),
    (["generate", "Hello", "--initial-peers", ADDR, "--verify-fraction", "2"], "--verify-fraction: expected a number between 0 and 1"),
    (["generate", "Hello", "--initial-peers", ADDR, "--audit-fraction", "-1"], "--audit-fraction: expected a number between 0 and 1"),
    (["generate", "Hello", "--initial-peers", ADDR, "--spans", "0:30"], "go with --local"),
    (["generate", "--local"], "give a prompt or --prompts-file, not both"),
    (["generate", "Hello", "--prompts-file", "/no/such/file", "--local"], "give a prompt or --prompts-file, not both"),
    (["generate", "--prompts-file", "/no/such/file", "--local"], "--prompts-file /no/such/file: no such file"),
    (["generate", "Hello", "--local", "--stream"], "--stream goes with --prompts-file"),
    (["verify", "--initial-peers", ADDR, "--theta", "2"], "theta"),
    (["eval-ppl", "--text", "/no/such/file"], "no text"),
    (["demo", "--servers", "31"], "exceeds the model's 30 blocks"),
    (["ledger", "--epochs", "-1"], "positive integer"),
    (["api"], "give --initial-peers of a swarm"),
    (["api", "--initial-peers", ADDR, "--host", "localhost"], "--host must be an IP address"),
    (["api", "--initial-peers", ADDR, "--port", "70000"], "a port must be in 0..65535"),
    (["api", "--initial-peers", ADDR, "--api-key", "two words"], "--api-key must be non-empty and hold no whitespace"),
    (["api", "--initial-peers", ADDR, "--max-rows", "0"], "positive integer"),
    (["swarm", "up", "--api", "--host", "nohost"], "--host must be an IP address"),
    (["serve", "--blocks", "0:10", "--metrics-port", "-1"], "a port must be in 0..65535"),
])
def test_bad_arguments_are_named_in_one_line(argv, message, capsys):
    assert message in one_line_error(argv, capsys)


def test_prompts_files_are_read_as_lines_or_jsonl_and_bad_ones_named(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("Say hi.\n\nName a colour.\n")
    assert read_prompts(plain) == ["Say hi.", "Name a colour."]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "Say hi."}\n"Name a colour."\n')
    assert read_prompts(jsonl) == ["Say hi.", "Name a colour."]
    jsonl.write_text('{"prompt": "Say hi."}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2: needs a non-empty"):
        read_prompts(jsonl)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_generate_prints_one_json_line_per_prompt_of_a_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nWhat is two plus two?\n")
    assert main(["generate", "--local", "--prompts-file", str(prompts), "--greedy", "--max-new-tokens", "6", "--stream"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    finals = [line for line in lines if "text" in line]
    assert [line["index"] for line in finals] == [0, 1] and finals[1]["prompt"] == "What is two plus two?"
    for final in finals:
        deltas = "".join(line["delta"] for line in lines if "delta" in line and line["index"] == final["index"])
        assert deltas == final["text"] and 1 <= final["new_tokens"] <= 6
