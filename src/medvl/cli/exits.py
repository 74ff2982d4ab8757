"""The command line's exit codes (standard library only: the console script's launcher reads them too)."""

EXIT_FAILED = 1  # the work failed, not for its input (another torchrun process of the group stopped)
EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3  # part of the work failed and the rest was done (a pull with series the PACS would not send)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped
EXIT_TERMINATED = 143  # 128 + SIGTERM
