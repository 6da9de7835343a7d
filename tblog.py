"""Write a run folder's metrics.jsonl as TensorBoard scalars (``training/tensorboard.py``):

    python tblog.py runs/demo [--logdir runs/demo/tensorboard]
    tensorboard --logdir runs/demo/tensorboard
"""
import os

from common import ArgumentParser, run_cli
from training.tensorboard import convert


def main(argv=None):
    p = ArgumentParser(description="Write a run folder's metrics.jsonl as TensorBoard scalars.")
    p.add_argument("run", help="run folder, e.g. runs/demo")
    p.add_argument("--logdir", help="where to write the event files (default: RUN/tensorboard)")
    a = p.parse_args(argv)
    logdir = a.logdir or os.path.join(a.run, "tensorboard")
    n = convert(a.run, logdir)
    print(f"{n} rows of {os.path.join(a.run, 'metrics.jsonl')} -> {logdir}; view with: tensorboard --logdir {logdir}")


if __name__ == "__main__":
    run_cli(main)
