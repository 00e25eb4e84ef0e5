"""The command line of main.py: help exits 0, and a mistake is one line with exit 2.

absl parses `--config`, an ml_collections config file. It also parses the
`--config.<field>=<value>` overrides. Left alone, absl reports a mistake as a traceback.
Its help exits 1. It shows the required config flag's default as 'None'. So this module
checks the command line before absl's app.run sees it. It loads the config itself. It walks
each override down the config. Each mistake becomes one line naming the flag and the value.
The errors absl still raises are caught by type, never by their text. Nothing is written
before these checks pass.
"""

import difflib
import glob
import importlib.util
import os
import re
import sys
from typing import NoReturn

from absl import flags
from ml_collections import config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")

USAGE = """\
usage: python main.py --config=<file>[:<arg>] --workdir=<dir> [--config.<field>=<value> ...]

  --config=<file>[:<arg>]   a config (configs/) or an experiment (experiments/); <arg>
                            picks a variant where the file has some, e.g.
                            configs/resnet.py:18 (the depth)
  --workdir=<dir>           where rows, samples, TensorBoard events, plots and the report
                            go; rerunning the same command resumes there
  --config.<field>=<value>  override any field of the config, e.g.
                              --config.model.width=2048
                              --config.sweep.batch_sizes='(1,8,64,512)'
                              --config.model.dtype=bfloat16 --config.timing.run_budget_s=60
                            every field, with its default and a comment, is in
                            configs/default.py; docs/configs.md
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
    """The help text: `doc` (main.py's docstring), then USAGE.

    USAGE names the launchable configs and experiments.
    """

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
    """Parses argv into FLAGS and returns what is left (the program name).

    Help prints and exits 0. A mistake prints one line and exits 2. A flag or value may be
    missing. The config file may be unreadable, or reject its argument. A field or flag may
    be unknown. A value may have the wrong type.
    """
    args = argv[1:]
    if any(a in HELP_FLAGS for a in args):
        print(usage(doc))
        if "--helpfull" in args:
            # absl shows an unset required flag's default as 'None'.
            print(FLAGS.get_help().replace("(default: 'None')", "(required)"))
        sys.exit(0)
    check_values_given(args, FLAGS)
    config_arg = next((a for a in args if a.startswith("--config=")), None)
    if config_arg is None:
        fail("--config is required: a config or experiment file, e.g. --config=configs/mlp.py")
    config = config_arg.split("=", 1)[1]
    if problem := check_config_file(config):
        fail(problem)
    try:
        loaded = load_config(config)
    except ValueError as e:
        # A config rejects a bad argument with a ValueError that says why.
        fail(f"{config_arg}: {e}")
    if problem := check_overrides(args, loaded):
        fail(problem)
    try:
        rest = FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        fail(unknown_flag(e.flagname))
    except flags.Error as e:
        # A mistake the checks above missed. absl's own first line is all there is.
        fail(first_line(e))
    if not FLAGS["workdir"].value:
        fail("--workdir is required: where results go, e.g. --workdir=runs/mlp")
    return rest


def check_config_file(config: str) -> str | None:
    """One line if --config names a missing or unparsable file, else None.

    absl would read the file while parsing flags. There its errors are tracebacks.
    """
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


def load_config(config: str) -> config_dict.ConfigDict:
    """Runs the file's get_config, as ml_collections does.

    The text after ':' is its argument. A ValueError from get_config propagates. That is how
    a config rejects its argument.
    """
    path, *arg = config.split(":", 1)
    spec = importlib.util.spec_from_file_location("batching_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*arg)


# An override: --config.<path>, -config.<path> or --noconfig.<path> (a bool set false).
OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(=?)")
# What absl parses a field's value with, by the field's type.
PARSERS = {
    int: (flags.IntegerParser(), "an int"),
    float: (flags.FloatParser(), "a number"),
    bool: (flags.BooleanParser(), "true or false"),
}


def check_overrides(args: list[str], config: config_dict.ConfigDict) -> str | None:
    """One line for the first bad override, else None.

    An override is bad if it names no field. It is also bad if its value does not fit the
    field. Each `--config.a.b=v` is walked down the config, one name at a time. An unknown
    name gets difflib's closest field as a suggestion. An int, float or bool value goes
    through the parser absl would use.
    """
    for i, arg in enumerate(args):
        if arg == "--":
            break
        match = OVERRIDE.match(arg)
        if not match:
            continue
        negated, path, has_value = match.groups()
        flag = arg.split("=", 1)[0]
        node = config
        names = path.split(".")
        for depth, name in enumerate(names):
            if not isinstance(node, config_dict.ConfigDict):
                where = ".".join(names[:depth]) or "config"
                return f"{flag}: config field {where!r} has no fields; it holds {node!r}"
            if name not in node:
                close = difflib.get_close_matches(name, list(node.keys()), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                if names[:depth] == ["model"]:  # a family's own fields, the factory's included
                    return (
                        f"{flag}: no model field {name!r}{hint}; model "
                        f"{node.get('name')!r} has {', '.join(sorted(node.keys()))}"
                    )
                return (
                    f"{flag}: no config field {name!r}{hint}; every field is listed in "
                    "configs/default.py"
                )
            parent, node = node, node[name]
        kind = parent.get_type(names[-1])
        if negated or (not has_value and kind is bool):
            continue  # a bool flag without a value: absl sets it
        if has_value:
            value = arg.split("=", 1)[1]
        elif i + 1 < len(args):
            value = args[i + 1]  # absl takes the next argument as the value
        else:
            return f"{flag} needs a value: {flag}=<value>"
        if kind in PARSERS:
            parser, what = PARSERS[kind]
            try:
                parser.parse(value)
            except ValueError:
                return f"{flag} must be {what}, got {value!r}"
    return None


def check_values_given(args: list[str], FLAGS: flags.FlagValues) -> None:
    """Exits with one line if the last argument is a flag lacking its value.

    absl takes the next argument as a non-bool flag's value. So only the last can lack one.
    check_overrides handles overrides, as it knows their fields' types.
    """
    if not args or "--" in args:
        return
    name, has_value = args[-1].lstrip("-"), "=" in args[-1]
    if args[-1].startswith("-") and not has_value and name in FLAGS and not FLAGS[name].boolean:
        fail(f"--{name} needs a value: --{name}=<value>")


def unknown_flag(name: str) -> str:
    """One line for a flag absl does not know.

    The closest of our flags is the suggestion.
    """
    close = difflib.get_close_matches(name, ["config", "workdir"], n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"--{name}: no such flag{hint}; see --help"


def first_line(e: Exception) -> str:
    """An exception's first line of text, else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
