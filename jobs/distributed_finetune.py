"""CML Job: distributed QLoRA fine-tuning on NUM_GPU_WORKERS workers, by running
notebooks/04_distributed_training.ipynb headless.

    NUM_GPU_WORKERS=2 python jobs/distributed_finetune.py --set max_steps=50     # on CML: GPU workers
    NUM_GPU_WORKERS=2 python jobs/distributed_finetune.py --set max_steps=3 --set backend=local  # CPU, this host
    python jobs/distributed_finetune.py --set num_workers=2 --set task=detox

Rank 0 trains here, the other ranks on CML Workers (local processes outside CML). Writes a new
folder under runs/ (named distributed-<task>-<date>-<time>) with the executed notebook, the
adapter, the run record (world size, rank shares), every worker's log, metrics and plots; exits
non-zero when any worker or cell fails. Details: jobs/run_notebook.py.
"""

import sys

from run_notebook import run_job

if __name__ == "__main__":
    sys.exit(run_job("04_distributed_training.ipynb", sys.argv[1:], label="distributed"))
