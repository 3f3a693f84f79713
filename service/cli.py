"""``glow``: the project's one command line: train, export, calibrate, evaluate, serve and score.

Each command is the ``main`` of its module, imported only when it runs, so ``glow --help``
is instant and a command whose optional dependency is missing says in one line which
extra installs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module

PROG = "glow"
COMMANDS = {
    "serve": ("service.__main__", "serve checkpoints over HTTP (python -m service)"),
    "train": ("model.train", "train a Glow on a folder of images, an IDX or an .npz file"),
    "export": ("model.export", "turn a training run into a servable checkpoint with its model card"),
    "calibrate": ("model.calibrate", "recalibrate a checkpoint's anomaly score on its validation split"),
    "evaluate": ("model.evaluate", "bits/dim and the out-of-distribution table of a checkpoint"),
    "score": ("service.score", "score a folder, IDX or .npz file to CSV or JSONL, in-process or against a server"),
}
EXTRAS = {"matplotlib": "train", "sklearn": "eval"}  # optional imports -> the extra that installs them


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "", "Glow normalizing flows: train, export, serve and score.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"{PROG} COMMAND --help describes each command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{PROG}: unknown command {command!r}; one of: {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    try:
        module = import_module(module_name)
        return int(module.main(rest) or 0)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"{PROG} {command}: needs {top}, which is not installed: pip install 'glow-service[{EXTRAS[top]}]'",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
