"""Library behind the notebooks and jobs: config, models, tasks, data, FineTuner, launcher, evaluation.

Importing it has no side effects: nothing is downloaded, no device is chosen, no
environment variable is changed.
"""
