import sys

from reglm.cli import main

sys.exit(main())
