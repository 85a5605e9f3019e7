"""``sopvit submit``'s flags, and the checks that turn a user's mistake into one line on the login node.

A job that waits hours in the queue and then dies on a typo costs the wait; so every value is checked here,
before anything is submitted. Only argparse and the standard library: ``sopvit --help`` builds this parser.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence

DEFAULT_MAX_REQUEUES = 10
# Long enough for a slow step plus a checkpoint write to a shared file system before Slurm's SIGTERM/SIGKILL.
DEFAULT_SIGNAL_DELAY_S = 120
SLURM_MAX_SIGNAL_DELAY_S = 65535  # sbatch --signal=SIG@DELAY takes at most 0xffff seconds

USAGE = "sopvit submit [options] -- pretrain [--config RECIPE] key=value ..."
EXAMPLE = (
    "example: sopvit submit --nodes 2 --gpus-per-node 8 --time 72:00:00 --partition gpu -- \\\n"
    "           pretrain --config configs/pretrain/vit_small_in1k.yaml data.path=/data/imagenet"
)


class SubmitError(ValueError):
    """A submission that cannot go ahead; the message names the problem and the fix."""


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node; one task per GPU (default 1)")
    p.add_argument("--time", required=True, help="time limit per job, in Slurm's format, e.g. 72:00:00, 3-00")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--qos", help="sbatch --qos")
    p.add_argument("--constraint", help="sbatch --constraint, e.g. a100")
    p.add_argument("--mem", help="memory per node, e.g. 480G (sbatch --mem; 0: all of it)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task, i.e. per GPU (data loading workers)")
    p.add_argument("--job-name", help="default: sopvit-<run directory name>")
    p.add_argument(
        "--max-requeues",
        type=int,
        default=DEFAULT_MAX_REQUEUES,
        help=f"requeues on time limit or preemption before the job gives up (default {DEFAULT_MAX_REQUEUES})",
    )
    p.add_argument(
        "--signal-delay",
        type=int,
        default=DEFAULT_SIGNAL_DELAY_S,
        help="seconds before the time limit at which Slurm signals the run to save and requeue "
        f"(default {DEFAULT_SIGNAL_DELAY_S})",
    )
    p.add_argument("--folder", help="where Slurm logs and submitit's files go (default: RUN_DIR/slurm)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and settings; submit nothing"
    )
    p.add_argument(
        "sopvit_args", nargs=argparse.REMAINDER, metavar="-- pretrain ...", help="the command the job runs"
    )


def parse_time(text: str) -> int:
    """A Slurm time limit ("minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
    "days-hours:minutes", "days-hours:minutes:seconds") -> whole minutes, seconds rounded up."""
    fix = "use Slurm's format, e.g. 72:00:00 (hours:minutes:seconds), 3-00 (days-hours) or 90 (minutes)"
    days = re.fullmatch(r"([0-9]+)-([0-9]+)(?::([0-9]+))?(?::([0-9]+))?", text)
    if days:
        d, h, m, s = (int(part or 0) for part in days.groups())
    elif re.fullmatch(r"[0-9]+(:[0-9]+){0,2}", text):
        parts = [int(part) for part in text.split(":")]
        d, h, m, s = 0, 0, parts[0], 0  # "minutes"
        if len(parts) == 2:  # "minutes:seconds"
            m, s = parts
        elif len(parts) == 3:  # "hours:minutes:seconds"
            h, m, s = parts
    else:
        raise SubmitError(f"--time {text!r} is not a time limit: {fix}")
    minutes = math.ceil((((d * 24 + h) * 60 + m) * 60 + s) / 60)
    if minutes < 1:
        raise SubmitError(f"--time {text!r} is zero: {fix}")
    return minutes


def format_minutes(minutes: int) -> str:
    """4320 -> "3-00:00:00" (Slurm's days-hours:minutes:seconds)."""
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00" if days else f"{rest // 60:02d}:{rest % 60:02d}:00"


def check_numbers(args: argparse.Namespace, time_min: int) -> None:
    """The integer flags, each against its own bound."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise SubmitError(f"{flag} {value}: must be >= 1")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise SubmitError(f"--cpus-per-task {args.cpus_per_task}: must be >= 1 (or left out)")
    if args.max_requeues < 0:
        raise SubmitError(f"--max-requeues {args.max_requeues}: must be >= 0 (0: never requeue)")
    delay = args.signal_delay
    if not 1 <= delay <= SLURM_MAX_SIGNAL_DELAY_S:
        raise SubmitError(f"--signal-delay {delay}: must be between 1 and {SLURM_MAX_SIGNAL_DELAY_S} seconds")
    if delay >= time_min * 60:
        raise SubmitError(
            f"--signal-delay {delay} s is not shorter than --time {args.time} ({time_min * 60} s): "
            "the run would be told to stop as it starts; lengthen --time or shorten --signal-delay"
        )


def check_words(args: argparse.Namespace) -> None:
    """Names and sizes that go verbatim into ``#SBATCH`` lines."""
    for flag in ("partition", "account", "qos", "constraint", "job_name"):
        value = getattr(args, flag)
        if value is not None and (not value or any(c.isspace() for c in value)):
            name = "--" + flag.replace("_", "-")
            raise SubmitError(f"{name} {value!r}: must be a non-empty word without spaces")
    if args.mem is not None and not re.fullmatch(r"[0-9]+[KMGTkmgt]?", args.mem):
        raise SubmitError(
            f"--mem {args.mem!r}: use a size such as 480G, 512000M or 0 (all of the node's memory)"
        )


def parse_sopvit_command(words: Sequence[str]) -> tuple[str | None, list[str]]:
    """``["--", "pretrain", "--config", "R", "a=b"]`` -> ``("R", ["a=b"])``; anything else is refused."""
    words = list(words[1:] if words[:1] == ["--"] else words)
    if not words:
        raise SubmitError(f"nothing to submit: end the command with -- pretrain ... ({USAGE})")
    if words[0] != "pretrain":
        raise SubmitError(f"sopvit submit runs only `pretrain`, not {words[0]!r} ({USAGE})")
    inner = argparse.ArgumentParser(prog="sopvit submit -- pretrain", add_help=False, exit_on_error=False)
    inner.add_argument("--config")
    inner.add_argument("overrides", nargs="*")
    try:
        known, extra = inner.parse_known_args(words[1:])
    except argparse.ArgumentError as err:
        raise SubmitError(f"the submitted command: {err} ({USAGE})") from None
    stray = [w for w in (*extra, *known.overrides) if w.startswith("-") or "=" not in w]
    if stray:
        raise SubmitError(
            f"the submitted pretrain command does not take {' '.join(stray)}: "
            f"it takes --config RECIPE and key=value overrides ({USAGE})"
        )
    return known.config, [*known.overrides, *extra]
