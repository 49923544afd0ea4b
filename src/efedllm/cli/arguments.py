"""Arguments that several commands share, each checked when it is parsed (before any I/O).

A bad value ends the command with one line, ``efedllm COMMAND: error: ...`` (:class:`~efedllm.cli.parser.Parser`).
``--initial-peers`` takes one multiaddr (or several joined by commas) and may be repeated, so it
never swallows a positional argument such as ``generate``'s prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr

from efedllm.cli.parser import positive_int
from efedllm.common.dtypes import DTYPE_NAMES
from efedllm.common.peers import parse_peer_id
from efedllm.compression.apply import CompressionConfig
from efedllm.compression.perplexity import default_text_path
from efedllm.dht.quorum import QuorumRule
from efedllm.models.quantization import QUANTIZATIONS


def peer_multiaddrs(text: str) -> list[str]:
    """``/ip4/HOST/tcp/PORT/p2p/PEER_ID`` (or several, comma-separated), checked; the argparse type of ``--initial-peers``."""
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("expected a multiaddr such as /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID")
    for address in addresses:
        try:
            parse_peer_id(Multiaddr(address).value_for_protocol("p2p"))
        except Exception as error:
            raise argparse.ArgumentTypeError(
                f"{address!r} is not a peer's multiaddr /ip4/HOST/tcp/PORT/p2p/PEER_ID (as `efedllm dht` prints): {error}"
            ) from None
    return addresses


def quorum(text: str) -> str:
    try:
        QuorumRule.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_initial_peers(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--initial-peers", type=peer_multiaddrs, action="extend", default=[], required=required,
                        metavar="ADDR", help="multiaddr of a swarm peer (repeat, or join with commas, for more)")


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="alias, .gguf path or HF directory (default %(default)s)")


def add_dtype(parser: argparse.ArgumentParser, quant: bool = False) -> None:
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES), help="compute dtype (default %(default)s)")
    if quant:
        parser.add_argument("--quant", default=None, choices=list(QUANTIZATIONS),
                            help="weight-only quantisation of the blocks' projections (default: none)")


def verifier_keys(text: str) -> list[str]:
    """One verifier key in hex (or several, comma-separated); the argparse type of ``--trusted-verifiers``."""
    keys = [part.strip() for part in text.split(",") if part.strip()]
    for key in keys or [text]:
        try:
            bytes.fromhex(key)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key!r} is not a verifier key (hex, as `efedllm verify` prints)") from None
    return keys


def add_trusted_verifiers(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--trusted-verifiers", type=verifier_keys, action="extend", default=[], metavar="KEY",
                        help=f"a verifier key (hex, as `efedllm verify` prints) whose verdicts {what} "
                             "(repeat, or join with commas, for more)")
    parser.add_argument("--verifier-quorum", type=quorum, default="majority", help="any, majority, all or a number")


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SVD compression (paper §4.2)")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--svd-ratio", type=float, metavar="C", help="compression ratio C in (0, 1] of the span's projections (eq. 10)")
    choice.add_argument("--svd-energy", type=float, metavar="E", help="keep each matrix's retained energy E in (0, 1] (eq. 12)")
    group.add_argument(
        "--svd-method", choices=("plain", "whitened"), default="whitened", help="plain SVD or activation-whitened SVD (default)"
    )
    group.add_argument(
        "--svd-allocation", choices=("global", "loss", "uniform"), default=None,
        help="with --svd-ratio: one parameter budget over the span, matrices weighed by measured loss sensitivity "
        "(loss: the default for whitened, best perplexity; one backward pass through the dense model, which is loaded "
        "for it) or by relative output error (global: the default for plain), or eq. 15 per matrix (uniform)",
    )
    group.add_argument(
        "--svd-form", choices=("interpolative", "svd"), default="interpolative",
        help="how a truncated matrix is stored: k of its rows and the rest as their combinations, k(m+n-k) numbers "
        "(default), or eq. 9's U, S, V^T, k(m+n+1) numbers",
    )
    group.add_argument("--svd-algorithm", choices=("exact", "randomized"), default="exact")
    group.add_argument("--calibration-text", type=Path, help="text for whitening calibration (default: ../shared/data/wikitext2-test.raw)")
    group.add_argument("--calibration-samples", type=positive_int, default=32, help="calibration windows (default 32)")
    group.add_argument("--calibration-length", type=positive_int, default=512, help="tokens per calibration window (default 512)")


def compression_config_from_args(args: argparse.Namespace) -> CompressionConfig | None:
    """The CompressionConfig the arguments ask for, or None when no compression was asked."""
    if args.svd_ratio is None and args.svd_energy is None:
        return None
    text = args.calibration_text
    if text is not None and not text.is_file():
        raise ValueError(f"--calibration-text {text} is not a file")
    config = CompressionConfig(
        ratio=args.svd_ratio,
        energy=args.svd_energy,
        method=args.svd_method,
        allocation=args.svd_allocation,
        factor_form=args.svd_form,
        algorithm=args.svd_algorithm,
        calibration_text=args.calibration_text,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
    )
    if config.needs_calibration and text is None and default_text_path() is None:
        raise ValueError("whitened compression needs calibration text: pass --calibration-text FILE "
                         "(or provide ../shared/data/wikitext2-test.raw)")
    return config


def add_identity(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument("--identity", type=identity_file, default=None, metavar="PATH",
                        help=f"{who}'s key file (peer id and signing key), created on first start: "
                             "keeps the same identity across restarts (default: a new one each start)")


def identity_file(text: str) -> Path:
    """A key file path whose folder exists (the file itself is created on first start)."""
    path = Path(text)
    if path.is_dir() or not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: not a file path in an existing folder")
    return path

