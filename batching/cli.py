"""The command line of main.py: help that exits 0, and every mistake as one line with exit 2.

absl parses `--config` (an ml_collections config file) and its `--config.<field>=<value>`
overrides; its own errors are tracebacks (an unknown field ends with ml_collections' "Did
you mean"), its help exits 1 and shows the config flag's default as 'None'. Here the flags
are parsed before absl's app.run, and what goes wrong is said in one line naming the flag,
the field and the value, with nothing written.
"""

import difflib
import glob
import os
import re
import sys
from typing import NoReturn

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")

USAGE = """\
usage: python main.py --config=<file>[:<arg>] --workdir=<dir> [--config.<field>=<value> ...]

  --config=<file>[:<arg>]   a config (configs/) or an experiment (experiments/); <arg> is
                            handed to its get_config, e.g. configs/resnet.py:18,
                            configs/mlp.py:width=2048,depth=4
  --workdir=<dir>           where rows, samples, TensorBoard events, plots and the report
                            go; rerunning the same command resumes there
  --config.<field>=<value>  override any field of the config, e.g.
                              --config.model.width=2048
                              --config.sweep.batch_sizes='(1,8,64,512)'
                              --config.model.dtype=bfloat16 --config.timing.run_budget_s=60
                            every field, with its default and a comment, is in
                            configs/default.py; README.md, "Configs and overrides",
                            says what each one means

configs:     {configs}
experiments: {experiments}

--helpfull lists every flag, absl's included. Exit codes: 0 done, 1 some points failed,
2 bad input (one line, nothing written), 130/143 interrupted (the same command resumes).
"""


def fail(message: str) -> NoReturn:
    """One line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def usage(doc: str) -> str:
    """The help text: `doc` (main.py's docstring), then USAGE naming the launchable configs and
    experiments."""

    def names(folder: str) -> str:
        """The folder's launchable files: those with a get_config, the defaults aside."""
        found = []
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
            with open(path) as f:
                if "def get_config(" in f.read() and not path.endswith("default.py"):
                    found.append(os.path.relpath(path, ROOT))
        return ", ".join(found)

    return (
        doc.strip()
        + "\n\n"
        + USAGE.format(configs=names("configs"), experiments=names("experiments"))
    )


def parse_flags(argv: list[str], FLAGS: flags.FlagValues, doc: str) -> list[str]:
    """Parses argv into FLAGS; returns what is left (the program name). Help prints and exits
    0; a missing flag, an unreadable config file, an unknown field or a bad value exits 2
    with one line."""
    args = argv[1:]
    if any(a in HELP_FLAGS for a in args):
        print(usage(doc))
        if "--helpfull" in args:
            # absl shows an unset required flag's default as 'None'.
            print(FLAGS.get_help().replace("(default: 'None')", "(required)"))
        sys.exit(0)
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config is None:
        fail("--config is required: a config or experiment file, e.g. --config=configs/mlp.py")
    if problem := check_config_file(config):
        fail(problem)
    try:
        rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many types here
        fail(explain(e, args))
    if not FLAGS["workdir"].value:
        fail("--workdir is required: where results go, e.g. --workdir=runs/mlp")
    return rest


def check_config_file(config: str) -> str | None:
    """One line if --config names a missing file or one Python cannot parse, else None: the
    file is read while absl parses flags, where its errors are tracebacks."""
    path = config.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"config file not found: {path!r}"
    try:
        with open(path) as f:
            compile(f.read(), path, "exec")
    except SyntaxError as e:
        return f"config file {path!r} line {e.lineno}: {e.msg}"
    except (OSError, ValueError) as e:
        return f"config file {path!r} is unreadable: {e}"
    return None


def explain(e: Exception, args: list[str]) -> str:
    """absl's or ml_collections' parsing error as one line naming the flag and the value."""
    text = str(e)
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if suggestion:
        right, wrong = suggestion.groups()
        flag = next(
            (
                a.split("=", 1)[0]
                for a in args
                if a.startswith("--config.") and wrong in a.split("=", 1)[0].split(".")
            ),
            f"--config...{wrong}",
        )
        return (
            f"{flag}: no config field {wrong!r} (did you mean {right!r}?); every field is "
            "listed in configs/default.py"
        )
    if "Error whilst parsing config file" in text:
        # The config's get_config raised: its own message is the last line of the traceback.
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        flag = next(a for a in args if a.startswith("--config="))
        return f"{flag}: {re.sub(r'^[A-Za-z]*Error: ', '', last.strip())}"
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    line = re.sub(r"^flag (--\S+?)=(\S*): invalid literal for int\(\) with base 10: .*",
                  r"\1 must be an int, got '\2'", line)  # fmt: skip
    line = re.sub(r"^flag (--\S+?)=(\S*): could not convert string to float: .*",
                  r"\1 must be a number, got '\2'", line)  # fmt: skip
    line = re.sub(r"^Missing value for flag (--\S+)", r"\1 needs a value: \1=<value>", line)
    unknown = re.match(r"Unknown command line flag '([^']+)'", line)
    if unknown and not unknown.group(1).startswith("config."):
        close = difflib.get_close_matches(unknown.group(1), ["config", "workdir"], n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        return f"--{unknown.group(1)}: no such flag{hint}; see --help"
    return line
