"""Entry point of a rank process: ``python -m parallelformers._worker``.

The launcher starts every rank as the interpreter that called ``parallelize``, with this module,
so that no separate binary has to be on ``PATH`` (a Jupyter kernel included). Ctrl-C belongs to
the main process, which stops a generation cleanly; the ranks ignore it and end when the main
process closes the model or exits.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

from parallelformers._native import worker_main  # noqa: E402

worker_main()
raise SystemExit("parallelformers._worker runs only as a rank started by parallelize()")
