import sys

from eval.harness.cli import main

sys.exit(main())
