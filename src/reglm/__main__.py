import signal
import sys

# SIGTERM reads as Ctrl-C until reglm.cli.main installs its handlers (status 130, as documented)
signal.signal(signal.SIGTERM, signal.default_int_handler)
try:
    from reglm.cli import main
except KeyboardInterrupt:
    sys.exit(130)

sys.exit(main())
