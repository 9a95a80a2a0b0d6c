"""`python -m mixtral.eval.harness ARGS`: lm-eval's own CLI, in a process where model `mixtral`
is registered (importing the package did it) and, unless the arguments name one, our offline
tasks folder is the include path."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mixtral.eval.harness.running import TASKS_DIR, go_offline


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    subcommands = {"run", "ls", "validate"}
    if "--include_path" not in args and len(args) >= 2 and (
            args[0] in subcommands or args[0].startswith("-")):
        args += ["--include_path", str(TASKS_DIR)]
    go_offline(force=False)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    cli_evaluate()


if __name__ == "__main__":
    main()
