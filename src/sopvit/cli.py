"""Command line: ``sopvit [--debug] COMMAND``, one of pretrain, submit, bench, export, embed, search, dedup,
prototypes, visualize, report, shards, eval, demo.

Parses arguments and dispatches; the work is elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from sopvit.checkpoints.checkpoint import CheckpointError
from sopvit.config import ConfigError, load_config
from sopvit.recipe.config import pretrain_config_type
from sopvit.train.step import NonFiniteLossError
from sopvit.train.stop import EXIT_STOPPED


def _pretrain(args: argparse.Namespace) -> int:
    from sopvit import distributed
    from sopvit.train.trainer import Trainer

    cfg = load_config(pretrain_config_type(), args.config, args.overrides)
    trainer = Trainer(cfg)
    row = trainer.fit()
    if trainer.stopped_by is not None:
        if distributed.is_main_process():
            print(
                f"stopped at step {trainer.step} on {trainer.stopped_by}; checkpoint saved; "
                "run the same command to continue",
                file=sys.stderr,
            )
        return EXIT_STOPPED
    print({k: round(v, 5) for k, v in row.items()})
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sopvit.demo import run_demo

    run_demo(args.overrides)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from sopvit.bench import format_table, run_benchmark, run_one_step, save_json

    if args.memory or args.markdown or args.measure or args.measure_child:  # all imply --memory
        from sopvit.bench_memory import memory_command

        return memory_command(args, run_one_step)
    with tempfile.TemporaryDirectory() as scratch:
        # Without data.path, image-folder recipes time decoding on synthetic JPEGs written here.
        given = any(o.startswith("data.path=") for o in args.overrides)
        dataset = load_config(
            pretrain_config_type(), args.config, ["data.path=-", *args.overrides]
        ).data.dataset
        jpegs = [] if given or dataset not in ("folder", "imagenet") else [f"data.path={scratch}/jpegs"]
        overrides = ["run.tensorboard=false", "run.progress=false", *jpegs, *args.overrides]
        cfg = load_config(pretrain_config_type(), args.config, overrides)
        result = run_benchmark(
            cfg, args.warmup, args.steps, args.input_batches, args.peak_tflops, Path(scratch)
        )
    print(format_table(result))
    if args.json:
        save_json(result, Path(args.json))
    print(json.dumps(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sopvit.export import export

    written = export(args.checkpoint, args.format, Path(args.out), include_head=args.include_head)
    print(f"wrote {written}")
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sopvit.visualize import prototype_gallery, save_attention_figure

    if args.what == "attention":
        if not args.image:
            raise ValueError("visualize attention needs --image PATH")
        written = save_attention_figure(args.checkpoint, args.image, Path(args.out or "attention.png"))
    else:
        written = prototype_gallery(args.checkpoint, Path(args.out or "prototypes.png"), data_path=args.data)
    print(f"wrote {written}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from sopvit.visualize import write_report

    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from sopvit.data.shard_writer import write_shards

    r = write_shards(args.src, args.out, per_shard=args.per_shard, prefix=args.prefix)
    print(
        f"packed {r.images} images in {r.shards} shards under {r.out_dir} ({r.written} written, "
        f"{r.reused} already complete); read them with data.dataset=shards data.path={r.pattern}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sopvit import distributed
    from sopvit.device import resolve_device
    from sopvit.eval import get_evaluator, load_protocols
    from sopvit.export import load_pretrained, load_reference_checkpoint
    from sopvit.export.load import load_teacher_encoder
    from sopvit.models import Backbone, Encoder

    load_protocols()
    evaluator = get_evaluator(args.name)
    cfg: Any = load_config(evaluator.config, args.config, args.overrides)
    model: Backbone | Encoder
    if evaluator.needs_head:  # the protocol trains part of the projection head: only a run holds it
        model = load_teacher_encoder(args.checkpoint, f"sopvit eval {evaluator.name}")
    elif args.arch:  # a bare state dict (timm, SOP/iBOT/DINO reference code) does not name its architecture
        model = load_reference_checkpoint(args.checkpoint, args.arch).requires_grad_(True)
    else:
        model = load_pretrained(args.checkpoint)
    # Under torchrun every rank extracts its shard of the images; one process needs no group.
    distributed.init_distributed(resolve_device(getattr(cfg, "device", "auto")).type)
    result = evaluator.run(model, cfg)
    if not distributed.is_main_process():
        return 0
    width = max(len(k) for k in result)
    print(f"{evaluator.name}: {evaluator.summary}")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value:.6g}")
    line = {"eval": evaluator.name, "checkpoint": str(args.checkpoint), **result}
    print(json.dumps(line))
    if args.json:
        # the resolved settings travel with the numbers, so a result file alone says how it was made
        record = {**line, "config": dataclasses.asdict(cfg)}
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


def _lost_contact(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective failing (a dead rank, a broken network) rather than a bug."""
    import torch.distributed as dist

    text = str(err).lower()
    signs = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer")
    return isinstance(err, dist.DistError) or any(s in text for s in signs)


def _version() -> str:
    try:
        return importlib.metadata.version("sopvit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        import sopvit

        return str(getattr(sopvit, "__version__", "unknown"))


def _debug_from_env() -> bool:
    return os.environ.get("SOPVIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _protocols_epilog(names: list[str]) -> str:
    from sopvit.eval import get_evaluator

    width = max(len(n) for n in names)
    rows = [f"  {n:<{width}}  {get_evaluator(n).summary}" for n in names]
    example = "example: sopvit eval knn --checkpoint runs/fashion_mnist_cpu ks=[20]"
    return "\n".join(["protocols:", *rows, "", example])


def build_parser() -> argparse.ArgumentParser:
    from sopvit.eval import load_protocols

    # The protocols list themselves in `sopvit eval --help`; importing them all costs ~0.05 s.
    protocols = sorted(load_protocols())
    debug_help = "on an error, show the full traceback behind the one-line message (or set SOPVIT_DEBUG=1)"
    parser = argparse.ArgumentParser(prog="sopvit", description="SOP self-supervised pre-training for ViTs")
    parser.add_argument("--version", action="version", version=f"sopvit {_version()}")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the subcommand, where newcomers put it; SUPPRESS keeps a global --debug intact.
    debug_flag = argparse.ArgumentParser(add_help=False)
    debug_flag.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", parents=[debug_flag], help="pre-train a backbone with SOP")
    p.add_argument("--config", help="YAML recipe (see configs/pretrain/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=100 data.path=/data")
    p.set_defaults(func=_pretrain)
    b = sub.add_parser(
        "bench",
        parents=[debug_flag],
        help="time the training step with and without SOP, and the input pipeline",
    )
    b.add_argument("--config", help="YAML recipe giving architecture, crops, batch, precision, compile")
    b.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument(
        "--input-batches", type=int, default=10, help="batches for the input-pipeline timing; 0 skips"
    )
    b.add_argument(
        "--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (known GPUs: auto)"
    )
    b.add_argument("--json", help="also write the result here")
    b.add_argument("--memory", action="store_true", help="per-rank memory, DDP/FSDP, 1..64 ranks (no run)")
    b.add_argument("--markdown", action="store_true", help="--memory: a markdown table (1, 8, 64 ranks)")
    b.add_argument("--arch", action="append", help="--memory: this arch (repeatable; default ViT-S..g)")
    b.add_argument("--world-sizes", help="--memory: comma-separated rank counts (default 1,2,4,...,64)")
    b.add_argument(
        "--precision", choices=["fp32", "bf16"], help="--memory: FSDP's gathered dtype; --measure runs in it"
    )
    b.add_argument("--measure", action="store_true", help="--memory: measure one step's peak (first --arch)")
    b.add_argument("--batch-size", type=int, help="--memory --measure: per-rank batch (default: recipe's)")
    b.add_argument("--measure-child", action="store_true", help=argparse.SUPPRESS)
    b.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64 train.compile=true"
    )
    b.set_defaults(func=_bench)
    e = sub.add_parser(
        "export",
        parents=[debug_flag],
        help="export the teacher backbone (timm, safetensors, Hugging Face folder, ONNX)",
    )
    e.add_argument(
        "--checkpoint", required=True, help="run directory, its checkpoint.pt or checkpoint-NNNNNN directory"
    )
    e.add_argument("--format", required=True, choices=["timm", "safetensors", "hf", "onnx"])
    e.add_argument("--out", required=True, help="output folder (or .pth / .onnx file)")
    e.add_argument("--include-head", action="store_true", help="also export the projection head")
    e.set_defaults(func=_export)
    v = sub.add_parser(
        "visualize",
        parents=[debug_flag],
        help="last-layer [CLS] attention maps, or the learned prototypes as images",
    )
    v.add_argument("what", choices=["attention", "prototypes"])
    v.add_argument(
        "--checkpoint", required=True, help="run directory, its checkpoint.pt or checkpoint-NNNNNN directory"
    )
    v.add_argument("--image", help="image for the attention maps")
    v.add_argument("--data", help="data set path for prototype images (default: the run's data.path)")
    v.add_argument("--out", help="PNG to write (default: attention.png / prototypes.png)")
    v.set_defaults(func=_visualize)
    r = sub.add_parser("report", parents=[debug_flag], help="one self-contained HTML report of a run")
    r.add_argument("run", help="run directory")
    r.add_argument("--out", help="HTML file (default: RUN/report.html)")
    r.set_defaults(func=_report)
    sh = sub.add_parser(
        "shards", parents=[debug_flag], help="pack an image folder into tar shards (data.dataset=shards)"
    )
    shards_sub = sh.add_subparsers(dest="action", required=True)
    sw = shards_sub.add_parser(
        "write",
        parents=[debug_flag],
        help="write SRC's images, in data-set order, as OUT/PREFIX-000000.tar ... (resumable)",
    )
    sw.add_argument("src", help="image folder (class subfolders give labels), e.g. an ImageNet train/")
    sw.add_argument("out", help="folder for the shards, their indexes and shards.json")
    sw.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")
    sw.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    sw.set_defaults(func=_shards)
    ev = sub.add_parser(
        "eval",
        parents=[debug_flag],
        help=f"evaluate a backbone: {', '.join(protocols)}",
        description="Evaluate a pre-trained backbone with one protocol of the paper.",
        epilog=_protocols_epilog(protocols),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("name", metavar="PROTOCOL", help=f"one of {', '.join(protocols)} (see below)")
    ev.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, its checkpoint.pt or checkpoint-NNNNNN directory, or an export",
    )
    ev.add_argument(
        "--arch", help="architecture of a bare state dict (timm or SOP/iBOT/DINO reference checkpoint)"
    )
    ev.add_argument("--config", help="YAML with the protocol's settings (see configs/eval/)")
    ev.add_argument("--json", help="also write the result and the resolved settings to this file")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dataset=fashion_mnist ks=[20]")
    ev.set_defaults(func=_eval)
    d = sub.add_parser(
        "demo",
        parents=[debug_flag],
        help="pre-train on Fashion-MNIST on the CPU and report k-NN before/after",
    )
    d.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe")
    d.set_defaults(func=_demo)
    from sopvit.explore.commands import add_explore_parsers
    from sopvit.launch import add_submit_parser

    add_explore_parsers(sub, debug_flag)
    add_submit_parser(sub, debug_flag)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`eval knn --checkpoint RUN ks=[20]`), which argparse leaves unparsed.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    code = 1
    try:
        code = _dispatch(args)
        return code
    finally:
        # Under torchrun every rank leaves the process group itself, after all agree they are done.
        from sopvit import distributed

        distributed.shutdown(clean=code in (0, EXIT_STOPPED))


def _explain(message: str, debug: bool) -> None:
    """Print the one-line ``message``; under ``--debug`` the traceback of the error being handled first."""
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    debug = bool(getattr(args, "debug", False)) or _debug_from_env()
    try:
        return int(args.func(args))
    except ConfigError as err:
        _explain(f"sopvit: config error: {err}", debug)
        return 2
    except (FileNotFoundError, ValueError) as err:
        _explain(f"sopvit: error: {err}", debug)
        return 2
    except (CheckpointError, NonFiniteLossError) as err:
        _explain(f"sopvit: {err}", debug)
        return 1
    except RuntimeError as err:
        from sopvit import distributed

        if not distributed.is_distributed() or not _lost_contact(err):
            raise
        # A collective failed: another rank died or the network broke. Say so instead of a gloo/NCCL trace.
        _explain(
            f"sopvit: rank {distributed.rank()} lost contact with the other ranks "
            f"({str(err).splitlines()[0]}). "
            "The last checkpoint is intact: rerun the same command, or launch with torchrun --max-restarts "
            "to resume automatically.",
            debug,
        )
        return 1
    except KeyboardInterrupt:
        _explain("sopvit: interrupted; resume with the same command (the last checkpoint is kept)", debug)
        return 130


if __name__ == "__main__":
    sys.exit(main())
