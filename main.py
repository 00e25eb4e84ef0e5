"""Launches a batching-lab config or experiment.

python main.py --config=configs/mlp.py --workdir=runs/mlp
python main.py --config=experiments/mlp_widths.py --workdir=runs/widths
"""

import logging as py_logging
import sys

from absl import app, flags
from ml_collections import config_flags

from batching import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for results, TensorBoard events and plots.")
config_flags.DEFINE_config_file("config", None, "Config or experiment file.", lock_config=True)


def main(argv):
    del argv
    # Imported after the flags are parsed: a mistake on the command line is reported
    # before JAX and the plotting libraries load.
    from batching import app as lab
    from batching.outputs.results import WorkdirError
    from batching.setup import distributed
    from batching.setup.runs import ConfigError

    try:
        lab.run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, WorkdirError) as e:
        cli.fail(str(e))
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        # JAX's shutdown barrier would wait for the process that is gone.
        distributed.exit_now(1)
    except lab.PointsFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except lab.Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    # JAX reports at INFO that it found no TPU; an error line must stand alone.
    py_logging.getLogger("jax._src.xla_bridge").setLevel(py_logging.WARNING)
    rest = cli.parse_flags(sys.argv, FLAGS, __doc__)
    app.run(main, argv=sys.argv, flags_parser=lambda argv: rest)
