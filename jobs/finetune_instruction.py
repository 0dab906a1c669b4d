"""CML Job: fine-tune the instruction-following adapter by running notebooks/01_instruction_following.ipynb headless.

    python jobs/finetune_instruction.py                          # the task recipe defaults
    python jobs/finetune_instruction.py --set max_steps=20 --run-name instruction-quick
    QLORA_MAX_STEPS=20 python jobs/finetune_instruction.py       # how a CML Job passes settings
    python jobs/finetune_instruction.py --help                   # every parameter with its default and meaning

Writes a new folder under runs/ with the executed notebook, the adapter, the run record, metrics
and plots; exits non-zero with the failing cell's error. Details: jobs/run_notebook.py.
Rendered by tools/render_notebooks.py: edit the template there, not this file.
"""

import sys

from run_notebook import run_job

if __name__ == "__main__":
    sys.exit(run_job("01_instruction_following.ipynb", sys.argv[1:]))
