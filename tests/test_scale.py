"""Recipes and `slayer plan` (memory table + AOT compile on a simulated mesh); the launchers are in
tests/test_launch.py."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from slayer_jax.errors import SlayerError
from slayer_jax.training.configs import load_config_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    c = load_config_file(path)
    assert c.steps > 0 and c.data.seq_len > 1


@pytest.mark.parametrize("override,match", [
    ("--config.no_such_key=1", "unknown config key 'no_such_key'"),
    ("--config.optim.peak_lrr=1e-3", "unknown config key 'optim.peak_lrr'"),
    ("--config.steps=abc", "'steps' expects a number"),
    ("--config.plan.expand=20", "does not fit the 32-layer model"),
    ("--config.remat=sometimes", "'remat'"),
])
def test_bad_overrides_are_clear_errors(override, match):
    with pytest.raises(SlayerError, match=match):
        load_config_file(REPO / "configs" / "slayer_llama2_7b.py", [override])


def test_mesh_must_divide_devices():
    from slayer_jax.parallel.sharding import make_mesh

    with pytest.raises(SlayerError, match="does not divide the 8 devices"):
        make_mesh("data=3,fsdp=-1")
    with pytest.raises(SlayerError, match="data\\*fsdp\\*tensor = 4"):
        make_mesh("data=2,fsdp=2,tensor=1")
    assert dict(make_mesh("data=2,fsdp=-1,tensor=2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def _independent_bytes(tree, specs, mesh_shape):
    """Per-device bytes by hand: each dim divided by the product of the mesh axes named for it."""
    total = 0
    for x, spec in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        dims = list(x.shape)
        for i, axis in enumerate(tuple(spec)):
            names = axis if isinstance(axis, tuple) else (axis,)
            for a in names:
                if a is not None:
                    assert dims[i] % mesh_shape[a] == 0
                    dims[i] //= mesh_shape[a]
        total += math.prod(dims) * np.dtype(x.dtype).itemsize
    return total


def test_plan_llama2_7b_memory_table_is_the_sum_of_shards():
    from slayer_jax.training.aot import plan_memory

    c = load_config_file(REPO / "configs" / "slayer_llama2_7b.py")
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    r = plan_memory(c, "data=2,fsdp=2,tensor=2", "v5e-8")
    assert r["num_layers"] == 38 and r["trainable_layers"] == [2, 5, 8, 11, 14, 17, 20, 23, 37]
    ab, specs = r["abstract"], r["specs"]
    for name in ("trainable", "frozen", "opt_state"):  # every parameter and moment has a spec
        n_leaves = len(jax.tree_util.tree_leaves(ab[name]))
        assert len(jax.tree_util.tree_leaves(specs[name], is_leaf=lambda s: isinstance(s, P))) == n_leaves
    assert r["bytes"]["params"] == (_independent_bytes(ab["trainable"], specs["trainable"], mesh)
                                    + _independent_bytes(ab["frozen"], specs["frozen"], mesh))
    assert r["bytes"]["optimizer"] == _independent_bytes(ab["opt_state"], specs["opt_state"], mesh)
    assert r["bytes"]["gradients"] == _independent_bytes(ab["trainable"], specs["trainable"], mesh)
    # the masked optimizer's saving: Adam state only for the 9 trainable blocks
    trainable = r["params_trainable"]
    assert r["bytes"]["optimizer"] < 2 * 4 * trainable / (2 * 2) * 1.01  # fsdp x tensor shards; data replicates
    full = plan_memory(load_config_file(REPO / "configs" / "slayer_llama2_7b.py", ["--config.full_finetune=True"]),
                       "data=2,fsdp=2,tensor=2", "v5e-8")
    assert full["bytes"]["optimizer"] > 4 * r["bytes"]["optimizer"]


def test_the_plan_names_what_collective_matmuls_can_add():
    """The TPU compiler's collective matmuls (windowed einsums over FSDP all-gathers, seen on v5e)
    keep one [tokens, q + k + v + 2 x intermediate] output buffer per layer live at once: the plan
    prints that bound beside its total. With it the Llama-2-7B S strategy may not fit a v5e-8 (the
    compiler refuses it: CompileTimeHbmOom); a v5p-8 fits either way; without FSDP there is none."""
    from slayer_jax.training.aot import format_plan, plan_memory

    c = load_config_file(REPO / "configs" / "slayer_llama2_7b.py")
    v5e = plan_memory(c, None, "v5litepod-8")
    tokens = 1024 // 8 // 64 * 4096  # rows per chip per microbatch x sequence
    assert v5e["collective_matmul_bound"] == 38 * tokens * (3 * 4096 + 2 * 11008) * 2
    assert v5e["fits"] and not v5e["fits_with_collective_matmuls"]
    assert "MAY NOT FIT" in format_plan(v5e)
    assert plan_memory(c, None, "v5p-8")["fits_with_collective_matmuls"]
    assert "collective_matmul_bound" not in plan_memory(c, "data=8,fsdp=1,tensor=1", "v5litepod-8")


@pytest.mark.slow
def test_plan_compiles_on_simulated_8_device_mesh():
    """The real step, lowered and compiled with the recipe's shardings (reduced to 4 original
    layers of full 7B width so the compile fits this machine)."""
    from slayer_jax.training.aot import compile_for_mesh

    c = load_config_file(REPO / "configs" / "slayer_llama2_7b.py", ["--config.grad_accum=128"])
    info = compile_for_mesh(c, "data=2,fsdp=2,tensor=2", num_layers=4)
    assert info["num_devices"] == 8 and info["num_layers"] == 4  # 4 - 1 pruned + 1 new
    assert info["flops_per_device"] > 0


def test_plan_cli_end_to_end(tmp_path):
    import json
    import os
    import sys

    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "slayer_jax.cli", "plan", "--config",
                        str(REPO / "configs" / "slayer_llama2_7b.py"), "--mesh", "data=1,fsdp=1,tensor=1",
                        "--device", "h100-80gb", "--no-compile", "--config.grad_accum=1024", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=""))
    assert r.returncode == 0, r.stderr
    assert "fits" in r.stdout and "optimizer" in r.stdout
    assert json.loads(out.read_text())["num_layers"] == 38
    bad = subprocess.run([sys.executable, "-m", "slayer_jax.cli", "plan", "--config",
                          str(REPO / "configs" / "slayer_llama2_7b.py"), "--mesh", "data=1,fsdp=3,tensor=1",
                          "--device", "v5e-8", "--no-compile"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("slayer: error: --mesh")


# ----------------------------------------------------------------------------- plan = the step that runs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import json as json_mod

    from tiny_tok import make_exported_model

    work = tmp_path_factory.mktemp("plan_vs_train")
    make_exported_model(work / "model", layers=4)
    (work / "corpus").mkdir()
    for p in sorted(Path(json_mod.__file__).parent.glob("*.py"))[:3]:
        shutil.copy(p, work / "corpus" / p.name)
    c = load_config_file(REPO / "configs" / "smollm2_slayer.py", [
        f"--config.model={work / 'model'}", f"--config.workdir={work / 'run'}", "--config.export_dir=",
        "--config.steps=2", "--config.batch_size=4", f"--config.data.source={work / 'corpus'}",
        "--config.data.seq_len=64", "--config.plan.expand=2", "--config.num_devices=4", "--config.mesh=fsdp=4",
        "--config.log_every=1", "--config.checkpoint.every=100"])
    return c


def test_slayer_plan_compiles_the_step_slayer_train_runs(tiny_run):
    """The same builder makes both: equal StableHLO fingerprints for the same config and mesh."""
    from slayer_jax.training.aot import compile_plan
    from slayer_jax.training.train import run

    summary = run(tiny_run)
    info = compile_plan(tiny_run, "fsdp=4", "h100-80gb", target="cpu")
    assert info["hlo_fingerprint"] == summary["step_hlo"]
    other = load_config_file(REPO / "configs" / "smollm2_slayer.py", [f"--config.{k}={v}" for k, v in {
        **{k: tiny_run[k] for k in ("model", "steps", "batch_size", "num_devices", "mesh")},
        "data.seq_len": 64, "plan.expand": 1}.items()])
    assert compile_plan(other, "fsdp=4", "h100-80gb", target="cpu")["hlo_fingerprint"] != info["hlo_fingerprint"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None, reason="needs libtpu (the [tpu] extra)")
def test_slayer_plan_compiles_for_a_real_tpu_topology(tiny_run):
    from slayer_jax.training.aot import compile_plan

    c = tiny_run.copy_and_resolve_references()
    c.data.seq_len = 512  # a multiple of the splash kernel's 128-token blocks
    tpu = compile_plan(c, None, "v5p-8", target="tpu")  # attention "auto": splash on a TPU mesh
    assert tpu["target"] == "tpu" and tpu["num_devices"] == 4 and tpu["mesh"]["fsdp"] == 4
    m = tpu["memory"]
    assert 0 < m["argument"] < m["total"] <= tpu["hbm"] and tpu["fits"]
    assert tpu["flops_per_device"] > 0 and tpu["optimal_seconds"] > 0
    c.attention = "xla"
    xla = compile_plan(c, None, "v5p-8", target="tpu")
    assert xla["hlo_fingerprint"] != tpu["hlo_fingerprint"]
    assert tpu["memory"]["temp"] < xla["memory"]["temp"]  # the kernel keeps no [T, T] scores


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None, reason="needs libtpu (the [tpu] extra)")
@pytest.mark.parametrize("override", [
    ["--config.remat=full", "--config.loss_chunk=4096"],
    ["--config.remat=none", "--config.loss_chunk=4096"],
    ["--config.remat=full", "--config.grad_accum=2", "--config.batch_size=16", "--config.loss_chunk=4096"],
    ["--config.remat=full", "--config.dtype=bfloat16", "--config.frozen_dtype=bfloat16", "--config.loss_chunk=4096"],
    ["--config.remat=full"],
], ids=["full-chunked", "none-chunked", "accum2", "bf16", "full-logits"])
def test_the_plan_estimate_is_within_25_percent_of_the_tpu_compiler(override):
    """The quick analytic count against the TPU compiler's per-chip total for the same step
    (SmolLM2 widths, 6 original layers, 512 tokens, v5p-8, splash attention)."""
    from slayer_jax.training.aot import compile_plan, plan_memory

    c = load_config_file(REPO / "configs" / "smollm2_slayer.py", ["--config.batch_size=8", "--config.data.seq_len=512",
                                                                  "--config.model_config=smollm2_135m", *override])
    estimate = plan_memory(c, None, "v5p-8", num_layers=6)["bytes"]["total"]
    compiler = compile_plan(c, None, "v5p-8", num_layers=6, target="tpu")["memory"]["total"]
    assert 0.75 <= estimate / compiler <= 1.25, (estimate / 2**20, compiler / 2**20)


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None, reason="needs libtpu (the [tpu] extra)")
def test_libtpu_flags_reach_the_tpu_compiler_in_plan(tiny_run, tmp_path):
    """`libtpu_flags` is set as LIBTPU_INIT_ARGS before jax starts: the plan prints and records it,
    and libtpu itself refuses a flag it does not know (so the flags did reach it)."""
    base = [sys.executable, "-m", "slayer_jax.cli", "plan", "--config", str(REPO / "configs" / "smollm2_slayer.py"),
            "--device", "v5p-8", "--target", "tpu",
            *[f"--config.{k}={tiny_run[k]}" for k in ("model", "batch_size")], "--config.data.seq_len=512",
            "--config.plan.expand=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("LIBTPU_INIT_ARGS", "JAX_PLATFORMS", "XLA_FLAGS")}
    flag = "--xla_tpu_enable_windowed_einsum_for_all_gather=false"
    out = tmp_path / "plan.json"
    r = subprocess.run([*base, f"--config.libtpu_flags={flag}", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    assert f"TPU compiler flags (LIBTPU_INIT_ARGS): {flag}" in r.stdout
    assert json.loads(out.read_text())["compile"]["libtpu_init_args"] == flag
    bogus = subprocess.run([*base, "--config.libtpu_flags=--xla_tpu_no_such_flag_for_slayer=1"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert bogus.returncode != 0 and "xla_tpu_no_such_flag_for_slayer" in bogus.stderr, bogus.stderr[-2000:]
    from slayer_jax.training.configs import apply_libtpu_flags

    with pytest.raises(SlayerError, match=r"^config: field 'libtpu_flags' holds 'windowed=false'; expected flags "):
        apply_libtpu_flags({"libtpu_flags": "--xla_a=1 windowed=false"})
