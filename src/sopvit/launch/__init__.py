"""Launching runs on a cluster: ``sopvit submit`` sends ``sopvit pretrain`` to Slurm through submitit.

A layer of its own beside ``demo`` and ``bench``: it drives the trainer, and nothing below it knows about
Slurm (the trainer only stops on a signal; ``distributed`` only reads Slurm's task variables). submitit is
imported when a job is planned or run, not when ``sopvit --help`` builds its parser.
"""

from sopvit.launch.options import SubmitError
from sopvit.launch.slurm import add_submit_parser, submit

__all__ = ["SubmitError", "add_submit_parser", "submit"]
