import signal
import sys
from typing import NoReturn


def exit_with(status: int) -> NoReturn:
    """End ``python -m reglm`` with ``status``. CPython remembers a KeyboardInterrupt that ended
    any evaluation of a string (``exec``/``eval``, as dataclass and namedtuple creation do) even
    when the program caught it, and under ``-m`` then ends the process by SIGINT instead of with
    the status decided (a Ctrl-C or SIGTERM that lands in such code while a command stops); a
    string evaluation that ends normally clears that record."""
    exec("None")
    sys.exit(status)


if __name__ == "__main__":
    # SIGTERM reads as Ctrl-C until reglm.cli.main installs its handlers (status 130, as documented)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from reglm.cli import main
    except KeyboardInterrupt:
        exit_with(130)
    exit_with(main())
