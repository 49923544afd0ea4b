"""``efedllm finetune``: LoRA or (deep) prompt tuning through a swarm (or ``--local``), saved as safetensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from efedllm.cli import arguments
from efedllm.cli.arguments import add_initial_peers, add_model
from efedllm.cli.parser import fraction, positive_float, positive_int
from efedllm.client.config import RemoteClientConfig
from efedllm.client.finetune import perplexity, read_texts, save_adapter, token_chunks, train_loop
from efedllm.client.local import LocalModelForCausalLM
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.models.adapters import LORA_TARGETS, METHODS, AdapterSpec


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune LoRA adapters or soft prompts through a swarm")
    add_model(parser)
    add_initial_peers(parser)
    parser.add_argument("--local", action="store_true", help="run every block in this process")
    parser.add_argument("--data", type=Path, required=True, help="training text: .txt, or .jsonl with \"text\"")
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--targets", default=",".join(LORA_TARGETS), help="LoRA projections, comma-separated")
    parser.add_argument("--prompts", type=positive_int, default=16, help="soft prompt tokens (ptune, deep-ptune)")
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-file", type=Path, help="held-out text whose perplexity is measured before and after")
    parser.add_argument("--eval-every", type=int, default=0, help="also measure it every K steps")
    parser.add_argument("--eval-chunks", type=positive_int, default=16, help="held-out sequences measured (default 16)")
    parser.add_argument("--save", type=Path, required=True, help="the adapter file to write (.safetensors)")
    parser.add_argument("--plot", type=Path, help="the loss curve PNG (default: beside --save)")
    arguments.add_trusted_verifiers(parser, "prove lies in training answers and route around the liars")
    parser.add_argument("--train-audit-fraction", type=fraction, default=RemoteClientConfig().train_audit_fraction,
                        metavar="P", help="with --trusted-verifiers: every training answer carries a signed receipt "
                                          "and this share is recomputed by a verifier before it is used")
    parser.set_defaults(func=run_finetune)


def adapter_spec(args: argparse.Namespace) -> AdapterSpec:
    if args.method == "lora":
        targets = tuple(target.strip() for target in args.targets.split(",") if target.strip())
        return AdapterSpec("lora", args.rank, args.alpha or 2.0 * args.rank, targets)
    return AdapterSpec(args.method, prompts=args.prompts)


def _check(args: argparse.Namespace) -> None:
    if args.local == bool(args.initial_peers):
        raise ValueError("give --initial-peers of a swarm, or --local to run every block here")
    for path in (args.data, args.eval_file):
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
    if args.save.suffix != ".safetensors":
        raise ValueError(f"--save must name a .safetensors file, got {args.save}")
    if args.eval_every < 0 or (args.eval_every and args.eval_file is None):
        raise ValueError("--eval-every needs --eval-file and must be >= 0")


def run_finetune(args: argparse.Namespace) -> int:
    _check(args)
    spec = adapter_spec(args)
    config = RemoteClientConfig(trusted_verifier_keys=tuple(args.trusted_verifiers), verifier_quorum=args.verifier_quorum,
                                train_audit_fraction=args.train_audit_fraction)
    host = LocalModelForCausalLM.load(args.model) if args.local else \
        DistributedModelForCausalLM.from_pretrained(args.model, args.initial_peers, config)
    try:
        record = finetune(host, spec, args)
    finally:
        if not args.local:
            host.shutdown()
    print(json.dumps(record))
    return 0


def finetune(host, spec: AdapterSpec, args: argparse.Namespace) -> dict:
    tokenizer = host.parts.tokenizer
    chunks = token_chunks(tokenizer(read_texts(args.data))["input_ids"], args.seq_len)
    eval_chunks = None
    if args.eval_file is not None:
        eval_chunks = token_chunks(tokenizer(read_texts(args.eval_file))["input_ids"], args.seq_len)[:args.eval_chunks]
    model = host.trainable(spec, seed=args.seed)
    before = perplexity(model, eval_chunks, args.batch) if eval_chunks is not None else None
    with Progress(TextColumn("finetune"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=True) as progress:
        task = progress.add_task("steps", total=args.steps, loss="-")
        log = train_loop(model, chunks, args.steps, args.batch, args.lr, args.seed, eval_chunks=eval_chunks,
                         eval_every=args.eval_every,
                         on_step=lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.3f}"))
    after = perplexity(model, eval_chunks, args.batch) if eval_chunks is not None else None
    args.save.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(args.save, model, args.model)
    plot = args.plot or args.save.with_suffix(".loss.png")
    plot_losses(plot, log.losses, log.evals)
    return {"model": args.model, "method": spec.method, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
            "trainable_parameters": sum(parameter.numel() for parameter in model.parameters()),
            "first_loss": round(log.losses[0], 4), "last_loss": round(log.losses[-1], 4),
            "tokens_per_s": round(log.tokens_per_s, 2), "eval_perplexity_before": before and round(before, 3),
            "eval_perplexity_after": after and round(after, 3),
            "evals": [[step, round(value, 3)] for step, value in log.evals], "adapter": str(args.save),
            "loss_curve": str(plot), "through": "local" if args.local else "swarm", **_audits(model)}


def _audits(model) -> dict:
    """What the training audits saw (through a swarm with trusted verifiers)."""
    auditors = {id(runner.auditor): runner.auditor for runner in model.runners if getattr(runner, "auditor", None)}
    if not auditors:
        return {}
    auditor = next(iter(auditors.values()))
    return {"training_answers_audited": auditor.audited, "proven_lies": auditor.lies, "audits_unanswered": auditor.unanswered,
            "replays": sum(runner.replays for runner in model.runners)}


def plot_losses(path: Path, losses: list[float], evals: list[tuple[int, float]]) -> None:
    figure = Figure(figsize=(6, 3.5))  # a figure of its own, drawn by the Agg canvas: no pyplot state
    axis = figure.subplots()
    axis.plot(range(1, len(losses) + 1), losses, label="training loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    lines = axis.get_lines()
    if evals:
        twin = axis.twinx()
        twin.plot([step for step, _ in evals], [value for _, value in evals], "o-", color="tab:orange",
                  label="held-out perplexity")
        twin.set_ylabel("held-out perplexity")
        lines = [*lines, *twin.get_lines()]
    axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
