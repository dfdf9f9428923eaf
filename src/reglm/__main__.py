import sys

try:
    from reglm.cli import main
except KeyboardInterrupt:
    sys.exit(130)

sys.exit(main())
