"""scripts/benchmark.py parallel at a toy size on the CPU: two ranks over gloo (torchrun) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attention

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
SPARSE = "vmoba:sparsity=0.5,block_size=16"  # 96 tokens: 6 blocks, half of them kept
FAST = ["--tiny", "--runs", "1", "--warmup", "0"]
DENSE = "dense (model)"


def launch(folder, ranks, *args):
    """The subcommand as a user starts it: `python scripts/benchmark.py` alone, or under torchrun for several ranks."""
    if ranks == 1:
        command = [sys.executable, str(SCRIPT), "parallel", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   str(SCRIPT), "parallel", *args]
    # One thread a process: two ranks on a small machine otherwise spend their time contending for cores.
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    one, two = folder / "one.json", folder / "two.json"
    launch(folder, 1, *FAST, "--methods", SPARSE, "--json", str(one))
    printed = launch(folder, 2, *FAST, "--check", "--methods", SPARSE, "--baseline", str(one), "--json", str(two))
    return json.loads(one.read_text()), json.loads(two.read_text()), printed


def by_variant(data):
    return {row["variant"]: row for row in data["rows"]}


def test_two_ranks_give_the_one_process_output(runs):
    _, two, _ = runs
    assert two["world_size"] == 2 and two["kind"] == "ulysses" and two["check"]
    assert two["tokens"] == 96 and two["tokens_per_rank"] == 48
    rows = by_variant(two)
    assert list(rows) == [DENSE, SPARSE]
    for row in rows.values():
        assert not row["failed"] and row["note"] == "" and row["ranks"] == 2
        assert row["eager_ms"] > 0 and row["compiled_ms"] is None
        assert row["peak_gib_per_rank"] == [None, None] and row["peak_gib"] is None  # no GPU memory on the CPU
        assert row["max_rel_err"] is not None and row["max_rel_err"] < 1e-4  # float32
    assert rows[DENSE]["density"] == 1.0
    # Each rank selects over every token for its heads, so the density is the one-process one, not half of it.
    assert rows[SPARSE]["density"] == pytest.approx(0.5)


def test_the_baseline_run_adds_the_speed_up(runs):
    one, two, printed = runs
    assert one["world_size"] == 1 and one["kind"] is None and not one["check"]
    assert two["baseline"].endswith("one.json") and two["baseline_world_size"] == 1
    base, rows = by_variant(one), by_variant(two)
    assert list(base) == [DENSE, SPARSE]
    for variant, row in rows.items():
        assert base[variant]["speedup"] is None and base[variant]["peak_gib_per_rank"] == [None]
        assert row["baseline_eager_ms"] == base[variant]["eager_ms"]
        assert row["speedup"] == pytest.approx(base[variant]["eager_ms"] / row["eager_ms"])
    assert "speed-up" in printed and "max rel err" in printed and SPARSE in printed
    assert printed.count("parallel: ") == 1  # rank 0 alone reports


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_parallel_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, sys.modules["bench_parallel"]


def test_an_oom_row_is_reported_and_the_run_goes_on(tmp_path, one_thread):
    benchmark, _ = load_benchmark()

    def out_of_memory(q, k, v, layout):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    out = tmp_path / "oom.json"
    attention.register_method("test-oom", out_of_memory, overwrite=True)
    try:
        benchmark.main(["parallel", *FAST, "--check", "--methods", "test-oom", "no-such-method", "dense",
                        "--json", str(out)])
    finally:
        attention.unregister_method("test-oom")
    rows = by_variant(json.loads(out.read_text()))
    assert list(rows) == [DENSE, "test-oom", "no-such-method", "dense"]
    assert rows["test-oom"]["oom"] and rows["test-oom"]["note"] == "OOM" and rows["test-oom"]["eager_ms"] is None
    assert rows["no-such-method"]["failed"] and "unknown" in rows["no-such-method"]["note"]
    assert not rows["dense"]["failed"] and rows["dense"]["eager_ms"] > 0 and rows["dense"]["max_rel_err"] == 0.0


def test_time_limit_and_an_incomparable_baseline(tmp_path, one_thread):
    benchmark, bench_parallel = load_benchmark()
    out = tmp_path / "late.json"
    benchmark.main(["parallel", *FAST, "--methods", SPARSE, "--time-limit", "0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [row["note"] for row in data["rows"]] == ["skipped (time limit)"] * 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(data, model="wan1.3b")))
    with pytest.raises(SystemExit, match="not comparable"):
        bench_parallel.load_baseline(str(other), data)
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["parallel", "--kind", "tensor"])
