"""scripts/benchmark.py (model and methods subcommands) and scripts/sweep_quality.py at toy sizes on the CPU."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

import attention
from attention.methods.block_sparse import BlockSparseMethod, Selection, keep_top_fraction, mean_pool_blocks

ROOT = Path(__file__).resolve().parents[1]
TOY = "toy-top-blocks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_script("benchmark")
sweep = load_script("sweep_quality")


class TopBlocks(BlockSparseMethod):
    """Keeps the key blocks with the highest pooled score: exactly (1 - sparsity) of them per query block."""

    def __init__(self, block_size: int = 16, sparsity: float | None = None):
        super().__init__(block_size=block_size, sparsity=0.5 if sparsity is None else sparsity)

    def select(self, q, k, v, layout):
        scores = mean_pool_blocks(q, self.block_size) @ mean_pool_blocks(k, self.block_size).transpose(-1, -2)
        return Selection(keep_top_fraction(scores, 1 - self.sparsity))


@pytest.fixture
def toy_method():
    attention.register_method(TOY, TopBlocks, overwrite=True)
    yield TOY
    attention.unregister_method(TOY)


def test_method_specs_parse():
    parse = benchmark.parse_method_spec
    assert parse("rectified:sparsity=0.85,rectify=false") == ("rectified", {"sparsity": 0.85, "rectify": False})
    assert parse("vmoba:threshold=0.25") == ("vmoba", {"threshold": 0.25})
    assert parse("dense") == ("dense", {})
    assert parse("x:dense_layers=[0, -1],threshold=0.5,mode=fast,cap=None") == (
        "x", {"dense_layers": [0, -1], "threshold": 0.5, "mode": "fast", "cap": None})
    args = benchmark.build_parser().parse_args(
        ["model", "--tiny", "--methods", "dense", "rectified:sparsity=0.85,rectify=false"])
    assert args.methods == [("dense", {}), ("rectified", {"sparsity": 0.85, "rectify": False})]
    assert benchmark.build_parser().parse_args(["methods"]).methods == [("all", {})]
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["model", "--methods", "vmoba:threshold"])


def test_model_subcommand_on_a_tiny_wan(toy_method, tmp_path, capsys):
    out = tmp_path / "model.json"
    benchmark.main(["model", "--tiny", "--runs", "1", "--warmup", "0", "--json", str(out),
                    "--methods", "dense", f"{toy_method}:sparsity=0.5", "no-such-method"])
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense (model, cuDNN)", "no self-attention", "dense", f"{toy_method}:sparsity=0.5",
                          "no-such-method"]
    assert rows["dense (model, cuDNN)"]["speedup"] == 1.0 and rows["dense"]["density"] == 1.0
    assert rows["no self-attention"]["density"] == 0.0 and rows["no self-attention"]["ms"] > 0
    assert rows[f"{toy_method}:sparsity=0.5"]["density"] == pytest.approx(0.5)  # 96 tokens, 6 blocks of 16
    assert rows["no-such-method"]["ms"] is None and "unknown" in rows["no-such-method"]["note"]
    printed = capsys.readouterr().out
    assert "speedup" in printed and "no-such-method" in printed


def test_model_subcommand_times_whole_generations_per_forward(tmp_path):
    import torch.nn.functional as F

    steps = []

    def record_step(q, k, v, layout, step):
        steps.append(step)
        return F.scaled_dot_product_attention(q, k, v)

    out = tmp_path / "model.json"
    attention.register_method("step-recorder", record_step, overwrite=True)
    try:
        benchmark.main(["model", "--tiny", "--runs", "2", "--warmup", "0", "--denoising-steps", "3", "--json",
                        str(out), "--methods", "step-recorder"])
    finally:
        attention.unregister_method("step-recorder")
    data = json.loads(out.read_text())
    assert data["denoising_steps"] == 3 and all(row["ms"] > 0 for row in data["rows"])
    layers = benchmark.WAN_TINY["num_layers"]
    # Each timed call is a fresh generation whose steps advance with the falling timesteps.
    assert steps == [step for _ in range(2) for step in range(3) for _ in range(layers)]
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["model", "--denoising-steps", "0"])


def test_methods_subcommand_on_a_tiny_grid(toy_method, tmp_path):
    out = tmp_path / "methods.json"
    benchmark.main(["methods", "--tiny", "--runs", "1", "--warmup", "0", "--json", str(out),
                    "--methods", f"{toy_method}:sparsity=0.75", "dense"])
    data = json.loads(out.read_text())
    toy, dense = data["rows"]
    assert toy["density"] == pytest.approx(0.25) and toy["layer"] == 0
    for key in ("select_ms", "kernel_ms", "total_ms", "select_pct", "ideal_ms"):
        assert toy[key] is not None and toy[key] >= 0, key
    # Total and kernel are timed separately, so with one noisy CPU run their difference may come out negative.
    assert toy["overhead_pct"] is not None and abs(toy["overhead_pct"]) < 1e4
    assert toy["flex_ms"] is None  # Flex only on a GPU
    assert "not a block-sparse" in dense["note"] and data["dense_ms"] > 0


def test_local_inputs_favour_nearby_keys():
    import torch

    q, k, _ = benchmark.local_qkv((4, 6, 8), 2, 32, torch.device("cpu"), torch.float32)
    scores = (q[0, :, :1] @ k[0].transpose(-1, -2)).squeeze(1)  # the first token against all
    assert (scores[:, 1] > scores[:, -1]).all()  # its neighbour beats the far corner in every head


def test_sweep_dense_against_dense_and_a_method(toy_method, tmp_path, capsys):
    out = tmp_path / "quality.json"
    sweep.main(["--method", "dense", toy_method, "--prompts", "3", "--seeds", "1", "--steps", "2", "--frames", "4",
                "--batch-size", "3", "--device", "cpu", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["prompts"] == 3 and data["steps"] == 2
    reference, dense, toy = data["rows"]
    for row in (reference, dense, toy):
        for key in ("density", "sparsity", "all", "delta_all", "attributes", "delta", "psnr_mean", "psnr_min",
                    "seconds", "n_clips"):
            assert key in row, key
        assert row["n_clips"] == 3
    assert dense["density"] == 1.0 and dense["psnr_min"] > 60  # the same attention as the model's own
    assert toy["density"] == pytest.approx(0.5) and toy["sparsity"] == pytest.approx(0.5)
    assert len(toy["psnrs"]) == 3 and toy["psnr_median"] == pytest.approx(sorted(toy["psnrs"])[1], abs=0.01)
    assert toy["psnr_min"] == pytest.approx(min(toy["psnrs"]), abs=0.01)
    assert toy["psnr_mean"] == pytest.approx(sum(toy["psnrs"]) / 3, abs=0.01)
    assert toy["share_under_20db"] == pytest.approx(sum(p < 20 for p in toy["psnrs"]) / 3)
    assert toy["share_under_10db"] == pytest.approx(sum(p < 10 for p in toy["psnrs"]) / 3)
    assert dense["share_under_20db"] == 0
    assert len(data["captions"]) == 3
    for row in (reference, dense, toy):  # the listed wrong clips are what the accuracies count
        assert row["all"] == pytest.approx(1 - len(row["wrong"]["all"]) / 3)
        wrong_somewhere = set().union(*(row["wrong"][a] for a in row["attributes"]))
        assert wrong_somewhere == set(row["wrong"]["all"]) and wrong_somewhere <= {0, 1, 2}
    assert "PSNR" in capsys.readouterr().out


def test_sweep_runs_the_settings_on_another_pipeline_against_the_dense_clips(tmp_path):
    out = tmp_path / "quality.json"
    same_model = tmp_path / "same.json"
    common = ["--method", "dense", "--prompts", "2", "--seeds", "1", "--steps", "2", "--frames", "4",
              "--batch-size", "2", "--device", "cpu"]
    sweep.main([*common, "--json", str(same_model)])
    sweep.main([*common, "--sparse-model", "t2v-tiny-vmoba", "--json", str(out)])
    data = json.loads(out.read_text())
    _, dense_on_variant = data["rows"]
    _, dense_on_model = json.loads(same_model.read_text())["rows"]
    assert data["sparse_model"] == "t2v-tiny-vmoba" and dense_on_variant["n_clips"] == 2
    # Dense attention on the fine-tuned weights: not the model's own clips again.
    assert dense_on_variant["psnr_mean"] < dense_on_model["psnr_mean"]
    # The variant's folder names the dense model for its noisiest steps: the first of two here.
    assert data["high_noise_steps"] == 1
    alone = tmp_path / "alone.json"
    sweep.main([*common, "--sparse-model", "t2v-tiny-vmoba", "--without-high-noise-model", "--json", str(alone)])
    data = json.loads(alone.read_text())
    assert data["high_noise_steps"] == 0 and data["rows"][1]["psnrs"] != dense_on_variant["psnrs"]
    with pytest.raises(SystemExit, match="names no high-noise model"):
        sweep.main([*common, "--sparse-model", "t2v-tiny", "--boundary-ratio", "0.9"])


def test_sweep_measures_a_step_cache_against_no_cache(tmp_path):
    out = tmp_path / "caches.json"
    sweep.main(["--method", "dense", "--caches", "none", "taylorseer", "--prompts", "2", "--seeds", "1", "--steps",
                "8", "--frames", "4", "--batch-size", "2", "--device", "cpu", "--json", str(out)])
    _, no_cache, cached = json.loads(out.read_text())["rows"]
    assert no_cache["method"] == "dense" and cached["method"] == "dense+taylorseer"
    assert no_cache["psnr_min"] == 100.0  # the model's own clips again
    assert 10 < cached["psnr_mean"] < 100.0  # steps skipped: close to, but not, the uncached clips


def test_sweep_settings_and_effective_density():
    args = sweep.build_parser().parse_args(["--method", "rectified", "--settings", "sparsity=0.75",
                                            "sparsity=0.85,rectify=false", "--dense-warmup-steps", "2",
                                            "--dense-layers", "0", "-1"])
    assert sweep.jobs(args) == [
        ("rectified", {"sparsity": 0.75, "dense_warmup_steps": 2, "dense_layers": (0, -1)}, "none"),
        ("rectified", {"sparsity": 0.85, "rectify": False, "dense_warmup_steps": 2, "dense_layers": (0, -1)}, "none"),
    ]
    args = sweep.build_parser().parse_args(["--method", "dense", "--caches", "none", "mag"])
    assert sweep.jobs(args) == [("dense", {}, "none"), ("dense", {}, "mag")]
    with pytest.raises(SystemExit, match="unknown cache"):
        sweep.jobs(sweep.build_parser().parse_args(["--method", "dense", "--caches", "magic"]))
    options = {"dense_warmup_steps": 5, "dense_layers": (0, -1)}
    assert sweep.effective_density(0.2, options, 20, 8) == pytest.approx(0.75 * 0.75 * 0.2 + 1 - 0.75 * 0.75)
    # a high-noise model's 6 steps come first, the method's 5 warm-up steps after them: 9 of 20 steps sparse
    assert sweep.effective_density(0.2, options, 20, 8, lead_steps=6) == pytest.approx(
        0.45 * 0.75 * 0.2 + 1 - 0.45 * 0.75)


def test_gpu_record_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_record.sh")]).returncode == 0


def test_evaluate_prints_confusion_tables_and_records_its_settings(tmp_path, capsys):
    evaluate = load_script("evaluate")
    out = tmp_path / "eval.json"
    evaluate.main(["--splits", "heldout", "--prompts", "2", "--seeds", "1", "--steps", "2", "--batch-size", "2",
                   "--device", "cpu", "--prompt-seed", "3", "--confusion", "shape", "--motions", "--json", str(out)])
    (result,) = json.loads(out.read_text())
    assert result["prompt_seed"] == 3 and result["guidance_scale"] == 2.5  # the embedded model's own scale
    for attribute in ("motion", "shape"):
        table = result[f"{attribute}_confusion"]
        assert sum(sum(row.values()) for row in table.values()) >= 2  # every object of both clips is tabled
    printed = capsys.readouterr().out
    assert "prompted shape (rows)" in printed and "prompted motion (rows)" in printed


def test_flashblock_and_mate_subcommands_on_toy_sizes(tmp_path, capsys):
    out = tmp_path / "fb.json"
    benchmark.main(["flashblock", "--tiny", "--chunks", "3", "--steps", "4", "--refresh", "1", "2",
                    "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["refresh_every"] for r in rows] == [None, 1, 2] and all(r["last_chunk_ms"] > 0 for r in rows)
    out = tmp_path / "mate.json"
    benchmark.main(["mate", "--tiny", "--sizes", "8k", "32k", "--runs", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["rows"]] == [128, 512]
    assert all(r[key] > 0 for r in data["rows"] for key in ("dense_fwd_ms", "mate_fwd_ms", "mate_fwd_bwd_ms"))
    assert data["model"]["mate_ms"] > 0 and "whole model forward" in capsys.readouterr().out
    benchmark.main(["mate", "--tiny", "--scan", "--sizes", "8k", "32k", "--runs", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["backends"] == ["torch"]  # the CPU has neither Triton nor fla
    assert [r["tokens"] for r in data["rows"]] == [128, 512]
    assert all(r["torch_ms"] > 0 and r["torch_error"] == 0 for r in data["rows"])
    assert "gated linear scan" in capsys.readouterr().out


# ---- e2e: whole Wan / HunyuanVideo transformers, methods x step caches (tiny configs, CPU, eager backend) -------

E2E_FAST = ["--tiny", "--steps", "3", "--runs", "1", "--warmup", "0"]


def e2e_rows(path):
    data = json.loads(path.read_text())
    return data, {(r["model"], r["variant"], r["cache"]): r for r in data["rows"]}


def test_e2e_subcommand_times_methods_and_a_cache_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    sparse = "vmoba:sparsity=0.85"
    benchmark.main(["e2e", *E2E_FAST, "--models", "hunyuan", "wan1.3b", "--methods", sparse,
                    "--caches", "taylorseer", "--json", str(out)])
    data, rows = e2e_rows(out)
    assert data["backend"] == "eager" and data["steps"] == 3 and data["loop_models"] == ["wan1.3b"]
    # The loop model runs first, whatever the order given: the other models' cache rows scale by its ratios.
    assert list(rows) == [(model, variant, cache) for model in ("wan1.3b", "hunyuan")
                          for variant in ("dense (model)", sparse) for cache in (None, "taylorseer")]
    for row in data["rows"]:
        for key in ("tokens", "eager_ms", "compiled_ms", "compile_s", "steps_s", "steps_how", "speedup", "peak_gib",
                    "oom", "note"):
            assert key in row, key
        assert not row["failed"] and row["steps_s"] > 0 and row["peak_gib"] is None  # no GPU memory on the CPU
    assert rows["wan1.3b", "dense (model)", None]["tokens"] == 96
    for model in ("wan1.3b", "hunyuan"):
        dense, plain = rows[model, "dense (model)", None], rows[model, sparse, None]
        assert dense["speedup"] == 1.0
        for row in (dense, plain):  # one forward eager and compiled; N steps are N compiled forwards
            assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["compile_s"] is not None
            assert row["steps_how"] == "est" and row["steps_s"] == pytest.approx(3 * row["compiled_ms"] / 1e3)
        assert plain["speedup"] == pytest.approx(dense["steps_s"] / plain["steps_s"])
    # The cache row of the loop model ran the real compiled loop; elsewhere it is scaled by that loop's ratio.
    looped, plain = rows["wan1.3b", sparse, "taylorseer"], rows["wan1.3b", sparse, None]
    assert looped["steps_how"] == "loop" and looped["loop_mode"] == "compiled"
    assert looped["steps_s"] == pytest.approx(looped["loop_s"]) and looped["eager_ms"] is None
    scaled = rows["hunyuan", sparse, "taylorseer"]
    assert scaled["steps_how"] == "est~"
    assert scaled["steps_s"] == pytest.approx(rows["hunyuan", sparse, None]["steps_s"] * looped["loop_s"]
                                              / plain["steps_s"])
    printed = capsys.readouterr().out
    assert "3-step s" in printed and "est~" in printed and "taylorseer" in printed


def test_e2e_reports_oom_and_goes_on(tmp_path, monkeypatch):
    import sys

    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    e2e = sys.modules["bench_e2e"]
    build = e2e.build
    monkeypatch.setattr(e2e, "build", lambda size, *a: out_of_memory() if size.config.get("num_layers") == 3
                        else build(size, *a))  # the tiny 14B's weights do not fit
    attention.register_method("test-oom", lambda q, k, v, layout: out_of_memory(), overwrite=True)
    out = tmp_path / "e2e.json"
    try:
        benchmark.main(["e2e", *E2E_FAST, "--models", "wan14b", "wan1.3b", "--methods", "test-oom", "no-such-method",
                        "--caches", "taylorseer", "--no-compile", "--json", str(out)])
    finally:
        attention.unregister_method("test-oom")
    data, rows = e2e_rows(out)
    oom = rows["wan1.3b", "test-oom", None]
    assert oom["oom"] and oom["note"] == "OOM" and oom["eager_ms"] is None
    assert rows["wan1.3b", "test-oom", "taylorseer"]["note"].startswith("not run")
    assert "unknown" in rows["wan1.3b", "no-such-method", None]["note"]
    assert rows["wan1.3b", "dense (model)", "taylorseer"]["loop_mode"] == "eager"  # --no-compile: eager loops
    assert rows["wan14b", "(model)", None]["oom"] and list(rows)[-1] == ("wan14b", "(model)", None)
    table = benchmark.sys.modules["bench_e2e"].e2e_table(data["rows"], 3)
    assert table.count("OOM") >= 3  # eager, compiled and N-step columns of the method's row


def test_e2e_time_limit_skips_and_lists_the_rest(tmp_path):
    out = tmp_path / "e2e.json"
    benchmark.main(["e2e", *E2E_FAST, "--models", "wan1.3b", "--methods", "--caches", "--time-limit", "0",
                    "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["note"] == "skipped (time limit)" and row["eager_ms"] is None


def test_e2e_explain_compile_finds_graph_breaks_and_recompiles(tmp_path, capsys):
    import torch.nn.functional as F

    def branchy(q, k, v, layout, step):
        if step == 0:  # a Python value compiled code specialises on: one more graph at the next step
            q = q * 1.0
        if float(q.abs().sum()) < 0:  # a tensor read back into Python: a graph break
            q = -q
        return F.scaled_dot_product_attention(q, k, v)

    attention.register_method("test-branchy", branchy, overwrite=True)
    out = tmp_path / "explain.json"
    try:
        benchmark.main(["e2e", "--tiny", "--models", "wan1.3b", "--explain-compile", "test-branchy",
                        "--json", str(out)])
    finally:
        attention.unregister_method("test-branchy")
    data = json.loads(out.read_text())
    dense, branched = data["rows"]
    assert data["explain"] == "test-branchy" and data["backend"] == "eager"
    assert dense["graph_breaks"] == 0 and dense["recompiles"] == 0 and dense["graphs"] >= 1
    assert branched["graph_breaks"] >= 1 and branched["recompiles"] >= 1 and branched["graphs"] > dense["graphs"]
    assert any("test_benchmark_scripts.py" in reason for reason, _ in branched["break_reasons"])
    assert any("step" in reason for reason, _ in branched["recompile_reasons"])
    for row in (dense, branched):
        assert row["first_call_s"] > 0 and row["second_call_s"] > 0 and row["in_compile_s"] > 0
        assert "_compile.compile_inner" in row["phases_s"]
    printed = capsys.readouterr().out
    assert "graph breaks" in printed and "recompiles" in printed and "compile time by phase" in printed


def test_e2e_sizes_are_the_real_models():
    sizes = benchmark.sys.modules["bench_e2e"].sizes(tiny=False)
    wan14b, hunyuan = sizes["wan14b"], sizes["hunyuan"]
    assert (wan14b.config["num_attention_heads"], wan14b.config["num_layers"], wan14b.config["ffn_dim"]) == (
        40, 40, 13824)
    assert wan14b.latents == (1, 16, 21, 90, 160) and sizes["wan1.3b"].latents == (1, 16, 21, 60, 104)
    assert hunyuan.latents == (1, 16, 33, 90, 160) and hunyuan.config == {}  # diffusers' defaults: the 13B model
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["e2e", "--models", "wan2.2"])


def test_e2e_eager_loops_and_ratios_from_an_earlier_run(tmp_path):
    first, second = tmp_path / "wan.json", tmp_path / "hunyuan.json"
    benchmark.main(["e2e", *E2E_FAST, "--models", "wan1.3b", "--methods", "--caches", "taylorseer", "--loop-eager",
                    "--json", str(first)])
    _, rows = e2e_rows(first)
    plain, cached = rows["wan1.3b", "dense (model)", None], rows["wan1.3b", "dense (model)", "taylorseer"]
    # An eager loop, compared with the eager forward, scales the compiled estimate.
    assert cached["loop_mode"] == "eager" and cached["steps_how"] == "est~"
    assert cached["loop_ratio"] == pytest.approx(cached["loop_s"] / (3 * plain["eager_ms"] / 1e3))
    assert cached["steps_s"] == pytest.approx(plain["steps_s"] * cached["loop_ratio"])
    benchmark.main(["e2e", *E2E_FAST, "--models", "hunyuan", "--methods", "--caches", "taylorseer", "--no-eager",
                    "--ratios-from", str(first), "--json", str(second)])
    _, rows = e2e_rows(second)
    scaled = rows["hunyuan", "dense (model)", "taylorseer"]
    assert scaled["steps_how"] == "est~" and "loop_s" not in scaled
    assert scaled["steps_s"] == pytest.approx(rows["hunyuan", "dense (model)", None]["steps_s"] * cached["loop_ratio"])
