"""Tests of lib.launcher: accelerate config templates, NUM_GPU_WORKERS, and real distributed runs on this host.

Run: python -m pytest tests/test_launcher.py

The distributed tests start real `accelerate launch` process trees: two machine ranks on
127.0.0.1 over gloo, training the embedded model for a few steps (about a minute each on two
cores); one successful run is shared by several tests. The CML test talks to a local stand-in
of `cml.workers_v1` (tests/cml_standin) that starts real worker processes.
"""

import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from accelerate.commands.config.config_args import load_config_from_file

from lib import launcher
from lib.config import ConfigError, RunConfig
from lib.fine_tuner import use_one_gpu  # imported before tests fake a GPU: transformers probes CUDA on import
from lib.launcher import (DEFAULT_MAIN_PORT, LaunchError, accelerate_templates, free_port, launch, main_port_from_env,
                          render_accelerate_config, topology_template, worker_values, workers_from_env)
from lib.workers import REPO_ROOT, CmlWorkers, LocalProcess, LocalWorkers, WorkerResources, worker_backend

TINY = dict(task="sql", max_steps=3, train_rows=32, eval_rows=4, max_seq_length=128, batch_size=2)
SECRET = "hf_launcher_test_secret_value"
STANDIN = Path(__file__).parent / "cml_standin"
FAILURE_BOUND_S = 120  # a failed run must be over (every process gone) within this


def run_processes(folder: Path) -> list[psutil.Process]:
    """Processes started for runs under `folder` (their command lines name its files), wherever they were reparented."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


# ---- one successful two-worker run, shared ----------------------------------------------------

@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", SECRET)
        started = time.monotonic()
        result = launch(RunConfig(**TINY, output_dir=str(output_dir)), num_workers=2, backend="local",
                        join_timeout_s=120, main_port=free_port(), echo=False)
    return result, time.monotonic() - started


def test_two_local_workers_train_one_adapter_with_world_size_two(two_worker_run):
    result, seconds = two_worker_run
    record = result.record
    assert record["world_size"] == 2
    assert [share["rank"] for share in record["rank_shares"]] == [0, 1]
    assert all(share["batches_per_epoch"] > 0 for share in record["rank_shares"])
    assert record["global_step"] == 3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert sorted(result.logs) == [0, 1] and all(log.stat().st_size > 0 for log in result.logs.values())
    assert {log.parent for log in result.logs.values()} == {result.run_dir / "logs" / "attempt-1"}
    print(f"two-worker run: {seconds:.0f} s")


def test_only_rank_zero_writes_outputs(two_worker_run):
    result, _ = two_worker_run
    adapters = [path for path in result.run_dir.rglob("adapter_config.json") if "checkpoints" not in path.parts]
    assert adapters == [result.adapter_dir / "adapter_config.json"]
    assert "trained sql adapter" in result.logs[0].read_text()
    assert "trained sql adapter" not in result.logs[1].read_text()


def test_every_worker_is_its_own_machine_rank_on_loopback(two_worker_run):
    result, _ = two_worker_run
    configs = [load_config_from_file(str(result.run_dir / "launch" / f"accelerate-{rank}.yaml")) for rank in (0, 1)]
    assert [config.machine_rank for config in configs] == [0, 1]
    assert {(config.num_machines, config.num_processes, config.main_process_ip, config.rdzv_backend)
            for config in configs} == {(2, 2, "127.0.0.1", "static")}
    assert len({config.main_process_port for config in configs}) == 1


def test_secrets_stay_out_of_the_run_folder(two_worker_run):
    result, _ = two_worker_run
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_the_adapter_loads_and_evaluates(two_worker_run):
    from lib.data import load_splits
    from lib.evaluation import Evaluator
    from lib.models import resolve_base_model
    from lib.tasks import get_task

    result, _ = two_worker_run
    config = RunConfig.from_dict(result.record["config"])
    evaluator = Evaluator(resolve_base_model(config.base_model), config.load_in_4bit)
    evaluator.attach("sql", result.adapter_dir)
    task, rows = get_task("sql"), load_splits(config)[1][:2]
    # The adapter's answers only: the base model's would double the time and test nothing of the launch.
    answers = evaluator.answers(evaluator.adapter_format(task, "sql"), rows, adapter="sql", progress=False)
    scores = task.score(answers, rows)
    assert len(answers) == 2 and task.headline_metric in scores


# ---- failures ---------------------------------------------------------------------------------

def test_a_killed_worker_ends_the_run_and_leaves_no_process(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    outcome = {}

    def run():
        try:
            launch(RunConfig(**TINY, output_dir=str(tmp_path)), 2, "local", join_timeout_s=120, echo=False)
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    victim = None
    while victim is None and thread.is_alive() and time.monotonic() - started < FAILURE_BOUND_S:
        victim = next((process for process in run_processes(tmp_path) if _is_rank_one_trainer(process)), None)
        time.sleep(0.2)
    assert victim is not None, "rank 1's training process never appeared"
    assert all(SECRET not in " ".join(process.info["cmdline"] or []) for process in psutil.process_iter(["cmdline"]))
    environment = victim.environ()  # the environment is passed through, threads shared out among the workers
    assert environment["HF_TOKEN"] == SECRET
    assert environment["OMP_NUM_THREADS"] == str(max(1, len(psutil.Process().cpu_affinity()) // 2))
    victim.kill()
    thread.join(FAILURE_BOUND_S)
    seconds = time.monotonic() - started

    assert not thread.is_alive(), "launch did not return after a worker was killed"
    error = outcome["error"]
    assert isinstance(error, LaunchError) and error.rank == 1
    assert "worker rank 1" in str(error) and "worker-1.log" in str(error)
    assert "SIGKILL" in str(error)  # the end of rank 1's log: torchrun's report of the killed process
    assert seconds < FAILURE_BOUND_S
    assert run_processes(tmp_path) == []
    assert psutil.Process().children(recursive=True) == []
    print(f"killed-worker run over after {seconds:.0f} s")


def _is_rank_one_trainer(process: psutil.Process) -> bool:
    try:
        return "lib.train" in process.cmdline() and "accelerate-1.yaml" in " ".join(process.parent().cmdline())
    except (psutil.NoSuchProcess, AttributeError):
        return False


class NeverJoins(LocalWorkers):
    """Ranks 1.. start a process that never joins the rendezvous."""

    def start(self, rank, argv, env, log_path, **_):
        return LocalProcess(rank, ["-c", "import time; time.sleep(600)"], env, log_path)


def test_a_worker_that_never_joins_ends_the_run_after_the_join_timeout(tmp_path):
    started = time.monotonic()
    with pytest.raises(LaunchError) as error:
        launch(RunConfig(**TINY, output_dir=str(tmp_path)), 2, NeverJoins(), join_timeout_s=3, echo=False)
    assert error.value.rank == 0 and "waiting for clients" in str(error.value)
    assert time.monotonic() - started < 60
    assert run_processes(tmp_path) == [] and psutil.Process().children(recursive=True) == []


def test_bad_settings_fail_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        launch(RunConfig(**{**TINY, "batch_size": 0}, output_dir=str(tmp_path)), 2, "local")
    with pytest.raises(ConfigError, match="backend"):
        launch(RunConfig(**TINY, output_dir=str(tmp_path)), 2, "slurm")
    with pytest.raises(ConfigError, match="num_workers"):
        launch(RunConfig(**TINY, output_dir=str(tmp_path)), 0, "local")
    assert list(tmp_path.iterdir()) == []


class FailingRankZero:
    """start_local's stand-in: rank 0 prints a line and exits with 3, at once."""

    def __init__(self, line: str):
        self.line = line

    def __call__(self, rank, argv, env, log_path):
        return LocalProcess(rank, ["-c", f"print({self.line!r}); raise SystemExit(3)"], env, log_path)


def test_a_relaunch_keeps_the_logs_of_the_attempt_before(tmp_path, monkeypatch):
    config = RunConfig(**TINY, output_dir=str(tmp_path), run_name="again")
    for attempt in (1, 2):
        monkeypatch.setattr(launcher, "start_local", FailingRankZero(f"attempt {attempt} failed"))
        with pytest.raises(LaunchError) as error:
            launch(config, 1, "local", echo=False)
        assert error.value.log_path == tmp_path / "again" / "logs" / f"attempt-{attempt}" / "worker-0.log"
        assert f"attempt {attempt} failed" in str(error.value)  # the error shows this attempt's log
    first = tmp_path / "again" / "logs" / "attempt-1" / "worker-0.log"
    assert first.read_text().strip() == "attempt 1 failed"


# ---- the rendezvous port ----------------------------------------------------------------------

def test_main_port_is_fixed_by_default_and_read_from_the_setting_or_the_environment(monkeypatch):
    monkeypatch.delenv("QLORA_MAIN_PORT")
    assert main_port_from_env() == DEFAULT_MAIN_PORT == 29500
    monkeypatch.setenv("QLORA_MAIN_PORT", " 29400 ")
    assert main_port_from_env() == 29400
    assert main_port_from_env(29600) == 29600  # the launch's own setting wins


@pytest.mark.parametrize("value", ["abc", "0", "65536", "-1", "29500.5"])
def test_a_bad_port_in_the_environment_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("QLORA_MAIN_PORT", value)
    with pytest.raises(ConfigError, match="QLORA_MAIN_PORT") as error:
        main_port_from_env()
    assert repr(value) in str(error.value) and "1 to 65535" in str(error.value)


@pytest.mark.parametrize("value", [0, 70000, True, 2.5, "port"])
def test_a_bad_main_port_names_the_setting(value):
    with pytest.raises(ConfigError, match="'main_port'"):
        main_port_from_env(value)


def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="main_port") as error:
            launch(RunConfig(**TINY, output_dir=str(tmp_path)), 2, "local", main_port=port)
    assert str(port) in str(error.value) and "QLORA_MAIN_PORT" in str(error.value)
    assert list(tmp_path.iterdir()) == []


# ---- the CML backend, against a stand-in for the service --------------------------------------

@pytest.fixture
def cml_standin(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.chdir(REPO_ROOT)  # the stand-in resolves scripts against the project root, like CML
    monkeypatch.setenv("CDSW_IP_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two "machines" share this host's cores
    import cml.workers_v1

    yield cml.workers_v1
    for name in ("cml.workers_v1", "cml"):
        sys.modules.pop(name, None)


def test_cml_backend_starts_the_other_ranks_as_cml_workers(cml_standin, tmp_path):
    backend = worker_backend("auto")
    assert isinstance(backend, CmlWorkers)
    result = launch(RunConfig(**{**TINY, "max_steps": 1}, output_dir=str(tmp_path)), 2, backend,
                    join_timeout_s=120, echo=False)
    assert result.record["world_size"] == 2 and result.adapter_dir.is_dir()
    launched = cml_standin.stop_workers()  # every worker the launcher asked for, now finished
    assert [(worker["script"], worker["status"], worker["nvidia_gpu"]) for worker in launched] == [
        ("lib/worker_entry.py", "succeeded", 0)]
    assert "Packing train dataset" in result.logs[1].read_text()  # written by worker_entry on the "worker"
    assert run_processes(tmp_path) == []


def test_worker_resources_reach_launch_workers(cml_standin, tmp_path):
    resources = WorkerResources(cpu=8, memory_gib=64.5, gpus=2, accelerator_label_id=3)
    backend = worker_backend("cml", resources)
    backend.start(1, ["-c", "print('worker up')"], {}, tmp_path / "worker-1.log", join_timeout_s=30, gpus=1).stop()
    (launched,) = cml_standin.stop_workers()
    assert (launched["cpu"], launched["memory"], launched["nvidia_gpu"], launched["accelerator_label_id"]) == (
        8, 64.5, 2, 3)


def test_worker_resources_come_from_the_environment_else_the_defaults(cml_standin, monkeypatch, tmp_path):
    backend = worker_backend("cml")
    backend.start(1, ["-c", "pass"], {}, tmp_path / "a.log", join_timeout_s=30, gpus=1).stop()
    monkeypatch.setenv("QLORA_WORKER_CPU", "2.5")
    monkeypatch.setenv("QLORA_WORKER_MEMORY_GIB", "32")
    monkeypatch.setenv("QLORA_WORKER_GPUS", "4")
    monkeypatch.setenv("QLORA_ACCELERATOR_LABEL_ID", "7")
    backend = worker_backend("cml", {"cpu": 6})  # a setting given wins over its variable
    backend.start(1, ["-c", "pass"], {}, tmp_path / "b.log", join_timeout_s=30, gpus=1).stop()
    default, from_env = cml_standin.stop_workers()
    assert (default["cpu"], default["memory"], default["nvidia_gpu"], default["accelerator_label_id"]) == (
        4, 16, 1, None)  # no label asked: the workspace's default GPU type
    assert (from_env["cpu"], from_env["memory"], from_env["nvidia_gpu"], from_env["accelerator_label_id"]) == (
        6, 32, 4, 7)


@pytest.mark.parametrize("variable, value", [("QLORA_WORKER_CPU", "0"), ("QLORA_WORKER_CPU", "four"),
                                             ("QLORA_WORKER_MEMORY_GIB", "-16"), ("QLORA_WORKER_GPUS", "1.5"),
                                             ("QLORA_ACCELERATOR_LABEL_ID", "0"), ("QLORA_ACCELERATOR_LABEL_ID", "gpu")])
def test_bad_worker_resources_fail_before_anything_starts(variable, value, monkeypatch, tmp_path):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as error:
        launch(RunConfig(**TINY, output_dir=str(tmp_path)), 2, "local")
    assert repr(value) in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_worker_resources_given_to_the_launch_name_the_setting():
    with pytest.raises(ConfigError, match=r"resources\.gpus.*-1"):
        worker_backend("local", {"gpus": -1})
    with pytest.raises(ConfigError, match=r"resources\.cpu"):
        worker_backend("cml", WorkerResources(cpu=float("nan")))
    with pytest.raises(ConfigError, match="'disk'.*one of"):
        worker_backend("local", {"disk": 100})


def test_cml_backend_needs_this_engines_address(cml_standin, monkeypatch, tmp_path):
    monkeypatch.delenv("CDSW_IP_ADDRESS")
    with pytest.raises(ConfigError, match="CDSW_IP_ADDRESS"):
        launch(RunConfig(**TINY, output_dir=str(tmp_path)), 2, "cml")


# ---- accelerate config templates --------------------------------------------------------------

SHAPES = [(1, 1, False, False), (1, 2, False, False), (2, 1, False, False), (1, 1, True, False),
          (1, 2, True, False), (2, 2, True, False), (2, 2, True, True), (1, 2, True, True)]


def test_every_template_serves_a_run_shape():
    assert {topology_template(*shape) for shape in SHAPES} == set(accelerate_templates())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "workers={}-processes={}-gpu={}-sharded={}".format(*shape))
def test_every_template_renders_to_a_config_accelerate_loads(shape, tmp_path):
    num_workers, processes_per_worker, use_gpu, _ = shape
    template = topology_template(*shape)
    assert (REPO_ROOT / "accelerate_configs" / f"{template}.yaml").read_text().startswith("# ")
    rank = num_workers - 1
    values = worker_values(template, rank, num_workers, processes_per_worker, "10.0.0.5", 29555, use_gpu,
                           shares_host=True, layer_class="LlamaDecoderLayer")
    config = load_config_from_file(str(render_accelerate_config(template, tmp_path / "rendered.yaml", **values)))
    assert config.num_processes == num_workers * processes_per_worker
    assert config.use_cpu is (not use_gpu)
    if num_workers > 1:
        assert (config.machine_rank, config.num_machines, config.main_process_ip, config.main_process_port) == (
            rank, num_workers, "10.0.0.5", 29555)
    if template in ("multi_machine", "fsdp"):
        assert config.gpu_ids == ("2,3" if rank == 1 else "0,1")  # this rank's two GPUs when workers share a host


def test_the_fsdp_config_gives_accelerate_fsdp2_sharding_by_decoder_layer(tmp_path, monkeypatch):
    """Rendered for one host with two GPUs, read by accelerate launch as it would (the environment it gives
    each process), and turned into the FSDP plugin the trainer's Accelerator builds from that environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    values = worker_values("fsdp", 0, 1, 2, "127.0.0.1", 29500, True, shares_host=True,
                           layer_class="LlamaDecoderLayer")
    path = render_accelerate_config("fsdp", tmp_path / "accelerate-0.yaml", **values)
    config = load_config_from_file(str(path))
    assert (config.distributed_type, config.num_processes, config.gpu_ids, config.use_cpu) == ("FSDP", 2, "0,1", False)
    assert config.fsdp_config == {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": False, "fsdp_activation_checkpointing": False}
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    environment = prepare_multi_gpu_env(args)
    assert environment["ACCELERATE_USE_FSDP"] == "true"  # what lib.plan reads in each process: sharded
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert (plugin.fsdp_version, plugin.transformer_cls_names_to_wrap, plugin.reshard_after_forward,
            plugin.cpu_ram_efficient_loading, plugin.state_dict_type.name) == (
        2, ["LlamaDecoderLayer"], True, True, "SHARDED_STATE_DICT")


def test_the_launch_renders_the_fsdp_template_when_the_plan_shards(tmp_path):
    from lib.models import resolve_base_model

    model_path = resolve_base_model("embedded")
    fsdp = RunConfig(distributed="fsdp", memory_budget_gib=100)  # the budget a GPU would give, unknown on this CPU
    assert launcher.sharding(fsdp, model_path, 2, use_gpu=True) == (True, "LlamaDecoderLayer")
    assert launcher.sharding(fsdp.replace(distributed="auto"), model_path, 2, use_gpu=True)[0] is False  # fits whole
    assert launcher.sharding(fsdp, model_path, 1, use_gpu=True)[0] is False  # one process: nothing to shard over
    assert topology_template(2, 1, True, sharded=True) == "fsdp"


def test_fsdp_on_cpus_is_refused_before_anything_starts(tmp_path):
    """accelerate shards over GPU processes only: on CPUs an FSDP config trains plain DDP over gloo (tried: two
    local processes of the embedded model trained unsharded), so the setting is refused rather than ignored."""
    with pytest.raises(ConfigError, match="'distributed'.*'fsdp'.*GPU processes only"):
        launch(RunConfig(**TINY, output_dir=str(tmp_path), distributed="fsdp"), 1, "local", processes_per_worker=2)
    assert list(tmp_path.iterdir()) == []


def test_rendered_values_stay_values(tmp_path):
    values = worker_values("multi_cpu", 0, 2, 1, "10.0.0.5\nuse_cpu: false", 29555, False, True)
    config = load_config_from_file(str(render_accelerate_config("multi_cpu", tmp_path / "x.yaml", **values)))
    assert config.main_process_ip == "10.0.0.5\nuse_cpu: false" and config.use_cpu is True


def test_rendering_names_what_is_missing_or_unknown(tmp_path):
    with pytest.raises(ConfigError, match="main_process_port"):
        render_accelerate_config("multi_gpu", tmp_path / "x.yaml", num_processes=2)
    with pytest.raises(ConfigError, match="single_process"):
        render_accelerate_config("no_such_topology", tmp_path / "x.yaml")


# ---- one process per GPU ---------------------------------------------------------------------

@pytest.fixture
def two_gpus(monkeypatch):
    """This CPU host made to look like one with two GPUs, outside any distributed launch."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "QLORA_GPUS"):
        monkeypatch.delenv(name, raising=False)


def test_one_training_command_on_two_gpus_becomes_one_process_per_gpu(two_gpus, monkeypatch, tmp_path):
    from lib import train

    assert train.training_processes() == 2
    launched = []
    monkeypatch.setattr(launcher, "main", lambda argv: launched.append(argv) or 0)
    assert train.main(["--task", "sql", "--gpus", "auto", "--set", "max_steps=2"]) == 0
    assert launched == [["--workers", "1", "--backend", "local", "--processes-per-worker", "2",
                         "--task", "sql", "--set", "max_steps=2"]]
    # what that launch renders: one worker of two processes, one per GPU
    assert launcher.default_processes_per_worker(1, shares_host=True) == 2
    template = topology_template(1, 2, use_gpu=True)
    values = worker_values(template, 0, 1, 2, "127.0.0.1", 29500, True, shares_host=True)
    config = load_config_from_file(str(render_accelerate_config(template, tmp_path / "a.yaml", **values)))
    assert (template, config.distributed_type, config.num_processes, config.use_cpu) == ("multi_gpu", "MULTI_GPU", 2,
                                                                                         False)


def test_launcher_defaults_to_one_process_per_visible_gpu(two_gpus):
    assert launcher.default_processes_per_worker(1, shares_host=True) == 2
    assert launcher.default_processes_per_worker(2, shares_host=True) == 1  # two local workers share the two GPUs
    assert launcher.default_processes_per_worker(2, shares_host=False) == 2  # CML Workers have GPUs of their own
    assert launcher._local_env(1)["QLORA_GPUS"] == "1"  # a single-process worker does not start processes itself


def test_asking_for_one_gpu_keeps_one_process_on_the_first(two_gpus, monkeypatch, capsys):
    from types import SimpleNamespace

    from lib import train

    monkeypatch.setenv("QLORA_GPUS", "1")
    assert train.training_processes() == 1
    assert train.training_processes("2") == 2  # --gpus wins over the variable
    args = SimpleNamespace(n_gpu=2, _n_gpu=2)  # the trainer arguments of one process that sees both GPUs
    use_one_gpu(args)
    assert args._n_gpu == 1 and "training on the first only" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.training_processes("auto") == 1  # inside a launch each process is one of its processes


@pytest.mark.parametrize("value", ["0", "3", "two", "-1"])
def test_a_bad_gpu_count_names_the_setting(two_gpus, monkeypatch, value):
    from lib import train

    with pytest.raises(ConfigError, match="'--gpus'.*2 visible"):
        train.training_processes(value)
    monkeypatch.setenv("QLORA_GPUS", value)
    assert train.main(["--task", "sql"]) == 2


# ---- NUM_GPU_WORKERS --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "abc", "0", "-1", "1.5", ""])
def test_workers_from_env_rejects_anything_but_a_positive_whole_number(value, monkeypatch):
    monkeypatch.delenv("NUM_GPU_WORKERS", raising=False)
    if value is not None:
        monkeypatch.setenv("NUM_GPU_WORKERS", value)
    with pytest.raises(ConfigError) as error:
        workers_from_env()
    message = str(error.value)
    assert "NUM_GPU_WORKERS" in message and repr(value) in message and "1 or more" in message
    if value is None:
        assert "not set" in message


def test_workers_from_env_reads_the_variable_or_a_given_value(monkeypatch):
    monkeypatch.setenv("NUM_GPU_WORKERS", "2")
    assert workers_from_env() == 2
    assert workers_from_env(" 3 ") == 3


def test_data_and_eval_data_reach_the_workers_as_absolute_paths(tmp_path, monkeypatch):
    """Workers start in the repository root: a relative held-out file must resolve where the caller is, as the
    training file does (eval_data was left relative once)."""
    from lib.config import RunConfig
    from lib.launcher import _with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = RunConfig.from_dict({"task": "sql", "data": "train.jsonl", "eval_data": "dev.jsonl", "output_dir": "out"})
    absolute = _with_absolute_paths(config)
    assert absolute.data == str(tmp_path / "train.jsonl") and absolute.eval_data == str(tmp_path / "dev.jsonl")
    assert absolute.output_dir == str(tmp_path / "out")
    assert _with_absolute_paths(config.replace(eval_data="")).eval_data == ""
