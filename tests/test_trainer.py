"""lib.trainer.QLoRATrainer: the same logged numbers as TRL's SFTTrainer, without reading the GPU back on
every pass; lib.stopping's per-step agreement through a CPU process group.

Run: python -m pytest tests/test_trainer.py   (about 1.5 minutes on 2 CPU cores; four tiny training runs)
"""

import gc
import json
import os
import sys

import pytest
import torch

from transformers import TrainerCallback

from lib import trainer as trainer_module
from lib.config import RunConfig
from lib.fine_tuner import FineTuner

TRAINER_FILES = (os.path.join("trl", "trainer", "sft_trainer.py"), os.path.join("transformers", "trainer.py"),
                 os.path.join("lib", "trainer.py"))
LOGGED = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "num_input_tokens_seen", "grad_norm")


class FrozenObjects(TrainerCallback):
    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(gc.get_freeze_count())


def count_reads(trainer) -> dict:
    """Counts the device-to-host reads (item, tolist, bool) made inside the per-pass methods."""
    reads = {"count": 0}
    inside = {"depth": 0}

    def per_pass(method):
        def wrapped(*args, **kwargs):
            inside["depth"] += 1
            try:
                return method(*args, **kwargs)
            finally:
                inside["depth"] -= 1
        return wrapped

    for name in ("compute_loss", "_track_num_input_tokens"):
        setattr(trainer, name, per_pass(getattr(trainer, name)))
    return reads, inside


@pytest.fixture
def reads_counted(monkeypatch):
    """Patches Tensor.item/tolist/__bool__ to count the calls that the trainers' own code makes while a
    per-pass method runs (the model's forward may read too, e.g. transformers' padding-mask check; both
    trainers share that)."""
    state = {"counters": []}

    def counting(original):
        def wrapped(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            for reads, inside in state["counters"]:
                if inside["depth"] and caller.endswith(TRAINER_FILES):
                    reads["count"] += 1
            return original(self, *args, **kwargs)
        return wrapped

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    return state


@pytest.mark.parametrize("task,packing", [("sql", False), ("detox", True)])
def test_same_logged_numbers_as_trl_without_per_pass_reads(tmp_path, monkeypatch, reads_counted, task, packing):
    history, (reads, inside), record, walks = _run(tmp_path / "ours", task, packing, reads_counted)
    assert reads["count"] == 0, "QLoRATrainer read the device back inside a training pass"
    # the per-step walks over the whole model: its parameter count read once; clipping given the adapter's only
    assert walks["num_parameters"] == 1 and set(walks["clipped"]) == {walks["trainable"]}
    assert record["train_tokens"] == history[-2]["num_input_tokens_seen"] == history[-1]["checkpoint tokens"] > 0
    assert len(history) == 4 and all(entry["entropy"] > 0 for entry in history[:-1])  # logs at steps 1, 2, 3

    from trl import SFTTrainer

    monkeypatch.setattr(trainer_module, "QLoRATrainer", SFTTrainer)  # TRL's own, for the reference
    reference, (reference_reads, _), _, reference_walks = _run(tmp_path / "trl", task, packing, reads_counted)
    assert reference_reads["count"] > 0  # the check can see reads: TRL's compute_loss makes them
    assert reference_walks["num_parameters"] == 6 and set(reference_walks["clipped"]) == {reference_walks["all"]}
    assert [entry.keys() for entry in history] == [entry.keys() for entry in reference]
    for got, expected in zip(history, reference):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _run(tmp_path, task, packing, reads_counted):
    # two passes a step (accumulated), a log every 2 steps (and the first, and the last), a checkpoint at 3
    config = RunConfig.for_task(task, "cpu", train_rows=24, eval_rows=1, max_steps=3, logging_steps=2,
                                save_steps=3, batch_size=2, micro_batch_size=1, max_seq_length=128,
                                packing=packing, tracking="off", output_dir=str(tmp_path), run_name=task)
    tuner = FineTuner(config).setup()
    model = tuner.trainer.model
    walks = {"num_parameters": 0, "clipped": [], "all": len(list(model.parameters())),
             "trainable": sum(1 for p in model.parameters() if p.requires_grad)}
    count_parameters = model.num_parameters

    def num_parameters(*args, **kwargs):
        walks["num_parameters"] += 1
        return count_parameters(*args, **kwargs)

    model.num_parameters = num_parameters
    clip = tuner.trainer.accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters, *args, **kwargs):
        parameters = list(parameters)
        walks["clipped"].append(len(parameters))
        return clip(parameters, *args, **kwargs)

    tuner.trainer.accelerator.clip_grad_norm_ = clip_grad_norm_
    counter = count_reads(tuner.trainer)
    reads_counted["counters"].append(counter)
    frozen = FrozenObjects()
    tuner.trainer.add_callback(frozen)
    result = tuner.train()
    assert min(frozen.counts) > 0 and gc.get_freeze_count() == 0  # gc.freeze() while training, undone after
    history = [{key: entry[key] for key in LOGGED if key in entry}
               for entry in tuner.trainer.state.log_history if "loss" in entry]
    checkpoint = json.loads((result.run_dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    history.append({"checkpoint tokens": checkpoint["num_input_tokens_seen"],
                    "total_flos": tuner.trainer.state.total_flos})  # the FLOPs count, same formula
    return history, counter, result.record, walks


def _agree(rank: int, world: int, port: int, asked_rank: int, results) -> None:
    import torch.distributed as dist
    from types import SimpleNamespace

    from lib.stopping import StopOnSignal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stop = StopOnSignal()
        real_backend = dist.get_backend
        dist.get_backend = lambda *args: "nccl"  # as on GPUs: the stop flag gets a CPU group of its own
        stop.on_train_begin(None, None, None)
        dist.get_backend = real_backend
        assert stop._group is not None
        first = stop._any_rank_asked(SimpleNamespace())
        stop.signal_name = "SIGTERM" if rank == asked_rank else None
        second = stop._any_rank_asked(SimpleNamespace())
        stop.on_train_end(None, None, None)  # the group is destroyed with training
        assert stop._group is None
        results.put((rank, first, second))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_stop_through_a_cpu_group():
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_agree, args=(rank, 2, port, 1, results)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    got = sorted(results.get(timeout=5) for _ in processes)
    assert got == [(0, False, True), (1, False, True)]  # rank 1 got the signal; both stop


def test_progress_lines_count_tokens_up_to_the_last_log(monkeypatch):
    """lib.progress.ProgressLines: the trainer reads its token count at logs only, so tokens/s is measured up
    to the last log; before the first log it says "-"; the last step's line comes after its log, once."""
    import io
    from types import SimpleNamespace

    from lib import progress

    clock = {"now": 100.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["now"])
    stream = io.StringIO()
    lines = progress.ProgressLines(interval=0, stream=stream)
    state = SimpleNamespace(global_step=0, max_steps=3, num_input_tokens_seen=0, is_world_process_zero=True)
    lines.on_train_begin(None, state, None)
    clock["now"], state.global_step = 101.0, 1
    lines.on_step_end(None, state, None)
    state.num_input_tokens_seen = 500
    lines.on_log(None, state, None, logs={"loss": 2.0})  # at 101 s: 500 tokens in 1 s
    clock["now"], state.global_step, state.num_input_tokens_seen = 103.0, 2, 900  # not read back yet
    lines.on_step_end(None, state, None)
    clock["now"], state.global_step = 104.0, 3
    lines.on_step_end(None, state, None)  # the last step: its line waits for its log
    state.num_input_tokens_seen = 2000
    lines.on_log(None, state, None, logs={"loss": 1.5})
    lines.on_log(None, state, None, logs={"train_runtime": 4.0})  # the trainer's closing log: no second line
    printed = stream.getvalue().splitlines()
    assert len(printed) == 3
    assert printed[0].startswith("step 1/3 (33%) · loss - · - tokens/s")
    assert printed[1].startswith("step 2/3 (67%) · loss 2.0000 · 500 tokens/s")
    assert printed[2].startswith("step 3/3 (100%) · loss 1.5000 · 500 tokens/s")  # 2000 tokens in 4 s
