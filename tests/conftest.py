"""Shared test settings: tiny runs of the real training path (embedded model, few rows, few steps)."""

import pytest

from lib.config import RunConfig

TINY = dict(train_rows=16, eval_rows=2, max_steps=2, max_seq_length=128, batch_size=2, logging_steps=1, save_steps=1,
            tracking="off")  # MLflow tracking has its own tests (tests/test_cml_native.py); the jobs keep it on


@pytest.fixture
def tiny_config(tmp_path):
    """A factory of tiny RunConfigs writing under this test's temporary folder."""

    def make(**overrides) -> RunConfig:
        return RunConfig.from_dict({**TINY, "output_dir": str(tmp_path / "runs"), **overrides})

    return make


@pytest.fixture(autouse=True)
def free_rendezvous_port(monkeypatch):
    """Launches in tests use a port free now, not the fixed default (29500): test runs here, or of another
    worktree, may overlap. Subprocesses (jobs, python -m lib.launcher) inherit it."""
    from lib.launcher import PORT_VARIABLE, free_port

    monkeypatch.setenv(PORT_VARIABLE, str(free_port()))
