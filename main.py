"""Launches a batching-lab config or experiment.

python main.py --config=configs/mlp.py --workdir=/tmp/mlp
python main.py --config=experiments/mlp_widths.py --workdir=/tmp/widths
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from batching import app as lab
from batching import distributed
from batching.results import WorkdirError
from batching.runs import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for results, TensorBoard events and plots.")
config_flags.DEFINE_config_file("config", None, "Config or experiment file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        lab.run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, WorkdirError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
    if problem := lab.check_config_file(sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
