import logging
import os
import sys

from sopvit.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank of a distributed run has left its process group (cli.main) and closed its files. It exits
    # without interpreter finalization: C++ threads still alive then (an FSDP run leaves autograd
    # device threads running) are the usual source of a SIGABRT after the work is done, which torchrun
    # would report as a failed run (tests/gloo.py).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
