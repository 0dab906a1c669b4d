"""Importing lib has no side effects: no environment change, no files, no device chosen, no download."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IMPORT_EVERY_MODULE = """
import importlib, json, os, pkgutil, sys
import transformers.trainer_utils  # torch's inductor, imported by transformers' trainer, sets KMP_* and
                                   # TORCHINDUCTOR_CACHE_DIR itself: what lib's own imports change is the question
before = dict(os.environ)
import lib
names = [module.name for module in pkgutil.walk_packages(lib.__path__, "lib.")]
for name in names:
    importlib.import_module(name)
torch = sys.modules.get("torch")
print(json.dumps({"modules": names, "environment_unchanged": dict(os.environ) == before,
                  "cuda_initialized": bool(torch and torch.cuda.is_initialized())}))
"""


def test_importing_every_lib_module_changes_nothing(tmp_path):
    work, home, cache = tmp_path / "work", tmp_path / "home", tmp_path / "cache"
    work.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home), "QLORA_AMP_CACHE": str(cache),
                   "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=work, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert {"lib.config", "lib.fine_tuner", "lib.launcher", "lib.widgets", "lib.tasks.sql"} <= set(report["modules"])
    assert report["environment_unchanged"] and not report["cuda_initialized"]
    assert list(work.iterdir()) == []  # nothing written where it ran
    assert not cache.exists() and not (tmp_path / "hf").exists()  # no model converted, nothing downloaded


def test_known_noise_is_filtered_and_other_lines_are_not(caplog):
    """lib/__init__.py drops two misleading library log lines (bitsandbytes' optional kernels, liger-kernel's
    optional backends), and only those."""
    import logging

    import lib  # noqa: F401

    for name, noise in (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
                        ("liger_kernel.backends.registry", "Backend impl 'x' for op 'rope' could not be imported: E")):
        with caplog.at_level(logging.WARNING, logger=name):
            logging.getLogger(name).warning(noise)
            logging.getLogger(name).warning("a real problem")
        assert [record.getMessage() for record in caplog.records] == ["a real problem"]
        caplog.clear()
