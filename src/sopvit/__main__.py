import sys

from sopvit.cli import main

sys.exit(main())
