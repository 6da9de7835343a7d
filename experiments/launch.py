"""Where a sweep's cells run (``sweep.py --launcher``):

    local            threads of the driver, ``parallel`` cells at once, each a chain of subprocesses
                     (the default: two at a time on a 2-core machine)
    submitit-local   each cell a submitit job on this machine (tests the cluster path without one)
    slurm            each cell a SLURM job through submitit, with ``--slurm KEY=VALUE`` parameters
                     (``slurm_partition=gpu``, ``timeout_min=240``, ``gpus_per_node=1``, ...)

submitit (facebookincubator/submitit) is the well-kept library for this: it writes the sbatch
script, pickles the call, requeues on pre-emption and brings back the result or the traceback.

A cell is never run twice at once: a submitted job's id is kept in ``<out>/jobs/<cell>.json``, and
a driver started again waits for a job that is still pending or running instead of submitting the
cell again; a job that was lost (a node failure, ``scancel``) is submitted again, and its stages
continue from their checkpoints (``--resume``). The run-folder lock (``rundir.RunFolder.locked``)
refuses a second process in a cell's folder in any case.
"""
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

HERE = os.path.dirname(os.path.abspath(__file__))
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


class Local:
    """``parallel`` cells at once in threads of the driver."""
    name = "local"

    def __init__(self, parallel, out=None, params=None):
        self.parallel = parallel
        self.pool = ThreadPoolExecutor(parallel)

    def submit(self, fn, cell):
        return self.pool.submit(fn, cell)

    def attach(self, cell):
        """A job of an earlier driver still running ``cell``: none, threads die with their driver."""
        return None

    def wait(self, running):
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        return finished

    def close(self):
        self.pool.shutdown()


class Submitit:
    """Each cell one submitit job; at most ``parallel`` submitted at once. ``cluster``: ``slurm``
    or ``local``; ``params``: ``executor.update_parameters`` keywords."""
    POLL_S = 2.0

    def __init__(self, parallel, out, params=None, cluster="slurm"):
        try:
            import submitit
        except ImportError:
            raise ImportError("--launcher slurm / submitit-local need submitit: pip install submitit") from None
        self.submitit, self.parallel, self.cluster = submitit, parallel, cluster
        self.name = "slurm" if cluster == "slurm" else "submitit-local"
        self.folder = os.path.join(out, "jobs")
        os.makedirs(self.folder, exist_ok=True)
        self.executor = submitit.AutoExecutor(folder=os.path.join(self.folder, "%j"), cluster=cluster)
        self.executor.update_parameters(**{"timeout_min": 24 * 60, **(params or {})})
        # A job unpickles the cell's call: it imports the project's modules (and this folder's).
        path = [os.path.dirname(HERE), HERE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))

    def _record(self, cell):
        return os.path.join(self.folder, f"{cell['id']}.json")

    def submit(self, fn, cell):
        job = self.executor.submit(fn, cell)
        tmp = self._record(cell) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"job_id": job.job_id, "launcher": self.name}, f)
        os.replace(tmp, self._record(cell))
        return job

    def attach(self, cell):
        """The job an earlier driver submitted for ``cell`` if it is still pending or running
        (SLURM only: local jobs end with their driver), else None."""
        if self.cluster != "slurm" or not os.path.isfile(self._record(cell)):
            return None
        with open(self._record(cell)) as f:
            rec = json.load(f)
        job = self.submitit.SlurmJob(folder=os.path.join(self.folder, "%j"), job_id=rec["job_id"])
        return job if job.state.split()[0] in ACTIVE else None

    def wait(self, running):
        while True:
            finished = {job for job in running if job.done()}
            if finished:
                return finished
            time.sleep(self.POLL_S)

    def close(self):
        pass


def make_launcher(name, parallel, out, params=None):
    """The launcher called ``name`` (local, submitit-local, slurm)."""
    if name == "local":
        return Local(parallel)
    if name in ("submitit-local", "slurm"):
        return Submitit(parallel, out, params, "local" if name == "submitit-local" else "slurm")
    raise ValueError(f"--launcher {name}: choose local, submitit-local or slurm")
