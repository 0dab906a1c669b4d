"""The benchmark job end to end on CPU (tiny random llama, a few steps), and its arithmetic and report."""

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import benchmark_core as benchmark
from lib.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "rows.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--arch", "tiny-llama",
               "--configs", "default,unsloth-b8", "--steps", "2", "--warmup", "1", "--seq-len", "64",
               "--model-dir", str(folder / "model"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-3000:]  # unsloth-b8 is skipped without --unsloth-path
    return json.loads(out.read_text())


def test_job_writes_a_row_per_configuration_with_the_required_keys(rows):
    assert [row["config"] for row in rows] == ["default", "unsloth-b8"]
    for row in rows:
        assert set(benchmark.REQUIRED_KEYS) <= set(row)
        # the keys, written out here so the job and its list cannot drop one together
        assert {"card", "date", "arch", "config", "gpus", "seq_len", "tokens_per_s", "peak_mem_gib", "mfu"} <= set(row)
        assert row["card"] and datetime.date.fromisoformat(row["date"][:10])
        assert (row["arch"], row["gpus"], row["seq_len"]) == ("tiny-llama", 1, 64)


def test_trained_row_has_numbers(rows):
    trained = rows[0]
    assert trained["status"] == "ok" and trained["engine"] == "project"
    assert trained["tokens_per_s"] > 0 and trained["peak_mem_gib"] > 0 and trained["s_per_step"] > 0
    assert trained["steps_measured"] == 2 and trained["tokens_per_step"] == 64 * trained["batch_size"]
    assert trained["mfu"] is None  # no GPU peak to divide by on CPU
    assert trained["lora_weights"] > 0 and trained["matmul_weights"] > trained["lora_weights"]
    check = trained["packing_check"]  # packed rows: the trained model's packed losses checked against one by one
    assert check["ok"] and check["loss_max_diff"] < 1e-3 and check["crossed_logits_max_diff"] > 0


def test_packing_check_tells_kept_apart_from_attending_across(tmp_path):
    """benchmark_core.packing_check passes bloom with lib/alibi.py's flex attention and fails bloom's own
    attention, which attends across the packed examples."""
    from lib import models

    model_dir = benchmark.build_random_model("tiny-bloom", tmp_path / "bloom")
    flex = models.load_base_model(str(model_dir), load_in_4bit=False, attention="flex", precision="fp32")
    check = benchmark.packing_check(flex, benchmark.vocab_size(model_dir))
    assert check["ok"] and check["logits_max_diff"] < 1e-4 and check["lengths"] == [211, 64, 389]
    own = models.load_base_model(str(model_dir), load_in_4bit=False, attention="eager", precision="fp32")
    assert benchmark.packing_check(own, benchmark.vocab_size(model_dir))["ok"] is False


def test_skipped_configuration_says_why(rows):
    assert rows[1]["status"] == "skipped" and rows[1]["tokens_per_s"] is None and "unsloth" in rows[1]["log_tail"]


def test_report_table_and_chart(rows, tmp_path):
    table = benchmark.markdown_table(rows)
    assert "| default | 16 x 1 |" in table and "| unsloth-b8 | | | | | skipped |" in table
    benchmark.chart(rows, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_chart_draws_repeated_rounds_as_one_bar_at_their_median(tmp_path):
    """--repeats rows: one bar a configuration at the median of its rounds, a line from the slowest to the
    fastest, one panel per architecture and sequence length."""
    base = dict(arch="llama-1b", seq_len=1024, card="H200", engine="project", gpus=1, peak_mem_gib=3.0)
    rows = [dict(base, config="default", tokens_per_s=speed) for speed in (50000, 60000, 52000)]
    rows += [dict(base, config="unsloth-b32", engine="unsloth", tokens_per_s=55000, peak_mem_gib=5.5),
             dict(base, seq_len=4096, config="default", tokens_per_s=40000)]
    figure = benchmark.chart(rows, tmp_path / "chart.png")
    first, second = figure.axes
    assert [round(bar.get_width(), 3) for bar in first.patches] == [52.0, 55.0]
    assert [round(bar.get_width(), 3) for bar in second.patches] == [40.0]
    (line,) = first.lines
    assert list(line.get_xdata()) == [50.0, 60.0] and not second.lines
    assert [text.get_text() for text in first.texts] == ["3.0 GiB, 3 rounds", "5.5 GiB"]
    assert "seq 4096" in second.get_title()


def test_model_flops_count_frozen_forward_and_input_gradients_plus_lora_and_attention():
    # 4 N + 6 N_lora + 6 L s d
    assert benchmark.model_flops_per_token(matmul=1000, lora=10, layers=2, hidden=8, seq_len=16) == 4000 + 60 + 1536


def test_every_configuration_is_a_valid_run_config():
    for name in benchmark.CONFIGS:
        config = benchmark.settings("tiny-llama", name, "/tmp/model", 64, 3, "/tmp/out")
        config.validate()
        targets = "all-linear" if "-all-" in name else "attention"  # the MLP step's rows: every linear layer
        assert (config.target_modules, config.lora_r, config.max_seq_length) == (targets, 16, 64)
        if "-all-" in name:  # the MLP step against each projection's own fused step
            assert config.fused_lora == ("layers" if name.endswith("-layers") else "auto")
    default = benchmark.settings("tiny-llama", "default", "/tmp/model", 64, 3, "/tmp/out")
    assert (default.batch_size, default.attention, default.precision) == (RunConfig().batch_size, "auto", "auto")


def test_merge_replaces_rows_of_the_same_key():
    old = [{"card": "A", "arch": "x", "config": "seed", "seq_len": 8, "tokens_per_s": 1},
           {"card": "A", "arch": "x", "config": "default", "seq_len": 8, "tokens_per_s": 2}]
    new = [{"card": "A", "arch": "x", "config": "seed", "seq_len": 8, "tokens_per_s": 3}]
    assert [row["tokens_per_s"] for row in benchmark.merge_rows(old, new)] == [2, 3]


def test_window_timing_and_shipped_logging_reach_the_row(tmp_path):
    """--timing window (no synchronisation inside the measured steps) and --logging-steps travel to the
    configuration's child process; the row keeps both, and loading and training peaks apart."""
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--arch", "tiny-llama", "--configs", "default",
               "--steps", "2", "--warmup", "1", "--seq-len", "64", "--model-dir", str(tmp_path / "model"),
               "--logging-steps", "5", "--timing", "window", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())[0]
    assert row["timing"] == "window" and row["logging_steps"] == 5 and row["steps_measured"] == 2
    assert row["s_per_step"] > 0 and row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["s_per_step"], rel=1e-3)
    assert row["peak_mem_gib"] == max(row["setup_peak_gib_per_rank"][0], row["train_peak_gib_per_rank"][0])


def test_memory_runs_start_what_users_start():
    from tools import memory_runs

    notebook, extra = memory_runs.command("sql", Path("/tmp/out"), -1, 4)
    assert notebook[1:3] == ["jobs/run_notebook.py", "notebooks/02_english_to_sql.ipynb"] and extra == {}
    assert "max_steps=-1" in notebook and "eval_rows=4" in notebook
    launcher, extra = memory_runs.command("two-processes", Path("/tmp/out"), 5, 4)
    assert launcher[1:3] == ["-m", "lib.launcher"] and "local" in launcher and extra == {"NUM_GPU_WORKERS": "2"}


def test_task_speed_times_a_recipe_and_its_evaluation(tmp_path):
    """tools/task_speed.py: a task recipe trained, held-out rows answered with the adapter and the base model,
    each timed; one row a repeat, appended to --out."""
    from tools import task_speed

    out = tmp_path / "speed.json"
    args = ["--task", "sql", "--max-steps", "2", "--eval-rows", "3", "--repeats", "2", "--set", "train_rows=16",
            "--set", "max_seq_length=128", "--output-dir", str(tmp_path / "runs"), "--out", str(out), "--compare-4bit"]
    assert task_speed.main(args) == 0
    rows = json.loads(out.read_text())
    assert [row["repeat"] for row in rows] == [0, 1]
    for row in rows:
        assert row["eval_rows"] == 3 and row["eval_batch"] == 16  # a CPU's batch
        assert row["eval_s_adapter"] > 0 and row["eval_s_base"] > 0 and row["train_tokens_per_s"] > 0
        assert row["settings"]["train_rows"] == 16 and set(row["scores"]) == {"exact_match", "executable",
                                                                             "execution_match"}
        assert row["eval_dequantized"] is False  # a CPU keeps the base 4-bit
    four_bit = rows[-1]["four_bit"]  # on a CPU both 4-bit: the plumbing, answers compared row by row
    assert four_bit["same_answers"] == 1.0 and len(four_bit["eval_s_adapter"]) == 2 and four_bit["eval_batch"] == 16


def test_repeat_summary_gives_medians_and_both_ratios():
    def row(config, repeat, speed, status="ok"):
        return {"config": config, "repeat": repeat, "tokens_per_s": speed, "peak_mem_gib": 1.0 + repeat / 10,
                "status": status}

    rows = [row("seed", 1, 100.0), row("default", 1, 300.0), row("seed", 2, 50.0), row("default", 2, 400.0),
            row("seed", 3, 80.0), row("default", 3, 160.0), row("flex", 1, None, "failed")]
    table = benchmark.repeat_summary(rows, "seed").splitlines()
    seed, default, flex = table[2:]
    assert seed.startswith("| seed | 3 | 80 (50-100) | 1.30 | 1.00 | 1.00 (1.00-1.00) |")
    # medians 300 / 80 = 3.75; per round 3.0, 8.0, 2.0: median 3.0
    assert default == "| default | 3 | 300 (160-400) | 1.30 | 3.75 | 3.00 (2.00-8.00) |"
    assert flex == "| flex | 0 (1 failed) | | | | |"


def test_repeats_interleave_configurations_and_label_rows(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--arch", "tiny-llama", "--configs",
               "seed,default", "--repeats", "2", "--run", "T", "--steps", "1", "--warmup", "1", "--seq-len", "64",
               "--model-dir", str(tmp_path / "model"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["config"], row["repeat"], row["run"]) for row in rows] == [
        ("seed", 1, "T"), ("default", 1, "T"), ("seed", 2, "T"), ("default", 2, "T")]
    assert "| default | 2 |" in done.stdout and "x seed per round" in done.stdout


def test_profile_runs_after_the_measured_steps_and_sums_kernel_time_by_family(tmp_path):
    """--profile 2: two more steps under torch.profiler after the measured ones; the row's measurement keeps
    its own steps, and its `profile` gives time per step by family, the top kernels and the idle rest."""
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--arch", "tiny-llama", "--configs", "default",
               "--steps", "2", "--warmup", "1", "--seq-len", "64", "--model-dir", str(tmp_path / "model"),
               "--profile", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())[0]
    assert row["steps_measured"] == 2
    profile = row["profile"]
    assert profile["steps"] == 2 and profile["clock"] == "cpu"  # no GPU here: the operators' CPU time
    families = profile["families_ms_per_step"]
    assert families["matrix products"] > 0 and families["attention"] > 0
    assert sum(families.values()) == pytest.approx(profile["busy_ms_per_step"], abs=0.05)
    assert profile["busy_ms_per_step"] + profile["idle_ms_per_step"] == pytest.approx(profile["wall_ms_per_step"], abs=0.05)
    top = profile["top_kernels"]
    assert len(top) == 15 and top == sorted(top, key=lambda kernel: kernel["ms_per_step"], reverse=True)
    assert "| family | ms a step |" in done.stdout and f"| {top[0]['family']} |" in done.stdout


def test_kernel_families_name_gpu_kernels():
    family = benchmark.kernel_family
    assert family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1") == "matrix products"
    assert family("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN") == "matrix products"
    assert family("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>") == "attention"
    assert family("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)") == "dequantize 4-bit"
    assert family("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>") == "copies and casts"
    assert family("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>") == "elementwise"
    assert family("_rms_norm_backward_kernel") == "norm, SwiGLU, RoPE, loss (Triton)"
    assert family("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert family("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert family("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4") == "attention"
    assert family("something_new") == "other"


def test_attention_speed_needs_a_gpu_and_says_so(capsys):
    """tools/attention_speed.py times CUDA kernels; without a GPU it stops with a clear message and exit code 2."""
    from tools import attention_speed

    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    assert attention_speed.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_attention_speed_ragged_lengths_fill_the_tokens():
    from tools import attention_speed

    lengths = attention_speed.ragged_lengths(16384, 1024)
    assert sum(lengths) == 16384 and max(lengths) <= 1024 and len(set(lengths)) > 5
    assert min(lengths[:-1]) >= 64  # only the last example is cut short to fill the tokens
