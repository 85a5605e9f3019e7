"""``sopvit submit``: a pre-training run as a Slurm job (through submitit) that outlives its time limit.

A ViT pre-train runs for days; Slurm jobs get hours and may be preempted. The job asks Slurm for a signal
``--signal-delay`` seconds before its limit, the run saves at the next step and requeues itself, and the
requeued job resumes the same run directory (``sopvit.launch.job``). For that the run directory is fixed
here, at submission, and the recipe is loaded here too: a typo fails on the login node, not after the queue.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sopvit.checkpoints.run_dir import latest_checkpoint
from sopvit.config import load_config
from sopvit.launch.options import (
    EXAMPLE,
    USAGE,
    SubmitError,
    add_submit_arguments,
    check_numbers,
    check_words,
    format_minutes,
    parse_sopvit_command,
    parse_time,
)
from sopvit.recipe.config import pretrain_config_type

if TYPE_CHECKING:
    from submitit import SlurmExecutor

    from sopvit.launch.job import PretrainJob

# Set by the submission itself: a requeued job must resume the run directory fixed here.
_PINNED = ("run.output_dir", "run.resume", "run.stop_signals")


@dataclass(frozen=True)
class Plan:
    """Everything ``sopvit submit`` resolved: what the dry run prints and the submission sends."""

    nodes: int
    gpus_per_node: int
    time_min: int
    signal_delay_s: int
    max_requeues: int
    run_dir: Path
    folder: Path
    job_name: str
    sbatch_extra: dict[str, Any]  # partition, account, qos, constraint, mem, cpus_per_task: those given
    job: PretrainJob

    def parameters(self) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters: one task per GPU, and the job requeueable by Slurm itself."""
        return {
            "job_name": self.job_name,
            "nodes": self.nodes,
            "ntasks_per_node": self.gpus_per_node,
            "gpus_per_node": self.gpus_per_node,
            "time": self.time_min,
            "signal_delay_s": self.signal_delay_s,
            # Slurm's own preemption requeue (PreemptMode=REQUEUE) needs it where JobRequeue=0 is the default.
            "additional_parameters": {"requeue": True},
            **self.sbatch_extra,
        }


def add_submit_parser(sub: argparse._SubParsersAction[Any], debug_flag: argparse.ArgumentParser) -> None:
    """``sopvit submit``, as a subcommand of the ``sopvit`` parser."""
    p = sub.add_parser(
        "submit",
        parents=[debug_flag],
        usage=USAGE,
        help="pre-train on Slurm: one task per GPU, requeued on time limit and preemption",
        description="Submit `sopvit pretrain` as a Slurm job (through submitit), one task per GPU.\n"
        "Before the time limit, or on preemption, the run saves at a step boundary and the job\n"
        "requeues itself; the requeued job resumes the same run directory. See docs/slurm.md.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_submit_arguments(p)
    p.set_defaults(func=submit)


def plan(args: argparse.Namespace) -> Plan:
    """Check every flag and load the recipe with its overrides; raise SubmitError / ConfigError otherwise."""
    from sopvit.launch.job import PretrainJob, requeue_signal, stop_signals_with

    time_min = parse_time(args.time)
    check_numbers(args, time_min)
    check_words(args)
    config, overrides = parse_sopvit_command(args.sopvit_args)
    if config is not None:
        config = str(Path(config).expanduser().resolve())
    cfg = load_config(pretrain_config_type(), config, overrides)  # ConfigError: one line, before the queue
    run_dir = Path(cfg.run.output_dir).expanduser().resolve()
    if not cfg.run.resume and latest_checkpoint(run_dir) is not None:
        raise SubmitError(
            f"{run_dir} already holds a run and run.resume=false: choose another run.output_dir, or drop "
            "run.resume=false to continue it (a submitted run always resumes after a requeue)"
        )
    signal_name = requeue_signal()
    signals = stop_signals_with(cfg.run.stop_signals, signal_name)
    pinned = [f"run.output_dir={run_dir}", "run.resume=true", f"run.stop_signals=[{','.join(signals)}]"]
    kept = [o for o in overrides if o.partition("=")[0].strip() not in _PINNED]
    job = PretrainJob(config, (*kept, *pinned), args.max_requeues, signal_name)
    extra = {
        key: getattr(args, key)
        for key in ("partition", "account", "qos", "constraint", "mem", "cpus_per_task")
        if getattr(args, key) is not None
    }
    return Plan(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time_min=time_min,
        signal_delay_s=args.signal_delay,
        max_requeues=args.max_requeues,
        run_dir=run_dir,
        folder=Path(args.folder).expanduser().resolve() if args.folder else run_dir / "slurm",
        job_name=args.job_name or f"sopvit-{run_dir.name}",
        sbatch_extra={k: v.upper() if k == "mem" else v for k, v in extra.items()},
        job=job,
    )


def executor(p: Plan, offline: bool = False) -> SlurmExecutor:
    """submitit's SlurmExecutor for ``p``; ``offline`` renders its script where Slurm is not installed."""
    from submitit import SlurmExecutor

    class OfflineSlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # SlurmExecutor refuses to exist without srun; a dry run needs none
            return 2

    if not offline and shutil.which("srun") is None:
        raise SubmitError(
            "srun is not on PATH: run sopvit submit on a Slurm login node (or --dry-run to see the script)"
        )
    cls = OfflineSlurmExecutor if offline else SlurmExecutor
    ex = cls(folder=p.folder, max_num_timeout=p.max_requeues)
    ex.update_parameters(**p.parameters())
    return ex


def sbatch_script(p: Plan) -> str:
    """The script ``sbatch`` would get, as submitit writes it."""
    ex = executor(p, offline=True)
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def describe(p: Plan) -> str:
    """The resolved settings, one per line."""
    tasks = p.nodes * p.gpus_per_node
    signal = p.job.requeue_signal
    rows = [
        ("nodes", f"{p.nodes}"),
        ("tasks per node", f"{p.gpus_per_node} (one per GPU; {tasks} in all)"),
        ("gpus per node", f"{p.gpus_per_node}"),
        ("time limit", f"{format_minutes(p.time_min)} ({p.time_min} min) per job"),
        ("signal", f"{signal} {p.signal_delay_s} s before the time limit: save at the next step, requeue"),
        ("requeues", f"at most {p.max_requeues}"),
        *((key.replace("_", " "), str(value)) for key, value in p.sbatch_extra.items()),
        ("run dir", str(p.run_dir)),
        ("logs", str(p.folder / "%j_%t_log.out") + " and .err"),
        ("command", "sopvit " + shlex.join(p.job.argv)),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in rows)


def submit(args: argparse.Namespace) -> int:
    """``sopvit submit``: check, then print the plan (``--dry-run``) or submit it."""
    p = plan(args)
    if args.dry_run:
        print(describe(p))
        print("\n# sbatch script (--dry-run: nothing was submitted)")
        print(sbatch_script(p))
        return 0
    from submitit.core.utils import FailedJobError, FailedSubmissionError
    from submitit.helpers import clean_env

    ex = executor(p)
    try:
        with clean_env():  # a submission from inside a job must not hand it that job's Slurm variables
            job = ex.submit(p.job)
    except (FailedJobError, FailedSubmissionError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), "no output")
        raise SubmitError(f"sbatch refused the job: {first.strip()}") from err
    print(describe(p))
    print(f"submitted job {job.job_id}; follow it with: tail -f {job.paths.stdout} {job.paths.stderr}")
    return 0
