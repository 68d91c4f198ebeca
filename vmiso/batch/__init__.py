"""``vmiso batch``: one job over many inputs, each input a task of its own in its own disposable VM.

The flow, one module a step:

    plan.py     the request -> tasks: each an input, its name, and the argv of one
                ``vmiso run`` (this vmiso, ``--json`` into the task's own record,
                ``-o DIR/NAME``); the output directory's layout; the default ``-j``
    record.py   ``DIR/batch.json``: what each task gave, written atomically after
                each one; whether a finished task may be skipped when the batch runs again
    engines.py  where tasks run, behind one interface (``Engine``): this host, N at a time
    runner.py   the batch from start to end: resume, the engine's rounds, retries of
                vmiso's own failures, an interruption, the exit status

Each task is a whole ``vmiso run`` process, so every guarantee of a run (limits,
timeout, output checks, cleanup, the watchdog) holds per task, wherever it runs.
"""
