"""CML Job (and AMP setup task): check this machine by running notebooks/00_environment_check.ipynb headless.

    python jobs/environment_check.py                       # report only: fails if the base model cannot be resolved
    python jobs/environment_check.py --set require_gpu=true --set require_4bit=true   # on a GPU runtime
    QLORA_REQUIRE_GPU=true python jobs/environment_check.py

Shows Python and library versions, CPU/GPU and memory, whether bitsandbytes 4-bit works, whether
the Hub is reachable and which base model the notebooks will use; the executed notebook goes to a
new folder under runs/. Details: jobs/run_notebook.py.
"""

import sys

from run_notebook import run_job

if __name__ == "__main__":
    sys.exit(run_job("00_environment_check.ipynb", sys.argv[1:]))
