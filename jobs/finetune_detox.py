"""CML Job: fine-tune the detoxification adapter by running notebooks/03_detoxify_text.ipynb headless.

    python jobs/finetune_detox.py                          # the task recipe defaults
    python jobs/finetune_detox.py --set max_steps=20 --run-name detox-quick
    QLORA_MAX_STEPS=20 python jobs/finetune_detox.py       # how a CML Job passes settings
    python jobs/finetune_detox.py --help                   # every parameter with its default and meaning

Writes a new folder under runs/ with the executed notebook, the adapter, the run record, metrics
and plots; exits non-zero with the failing cell's error. Details: jobs/run_notebook.py.
Rendered by tools/render_notebooks.py: edit the template there, not this file.
"""

import sys

from run_notebook import run_job

if __name__ == "__main__":
    sys.exit(run_job("03_detoxify_text.ipynb", sys.argv[1:]))
