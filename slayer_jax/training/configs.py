"""ml_collections recipe files (``configs/*.py`` with ``get_config()``) and ``--config.x=y`` overrides."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
from pathlib import Path

import ml_collections

from slayer_jax.errors import SlayerError
from slayer_jax.parallel.sharding import parse_mesh
from slayer_jax.surgery import GROUPS as OPTIM_GROUPS
from slayer_jax.surgery import PLAN_KINDS


def base_config() -> ml_collections.ConfigDict:
    """Every key a recipe may set, with the small-CPU defaults. Recipes start from this."""
    c = ml_collections.ConfigDict()
    c.model = "default"  # HF dir, .gguf, slayer checkpoint, or "default" (SmolLM2-135M-Instruct)
    c.model_config = ""  # a slayer_jax.modeling.known_models name, for `slayer plan` without weights
    c.workdir = "runs/run"
    c.export_dir = ""  # HF export at the end ("" = none)
    c.seed = 0
    c.steps = 200
    c.epochs = 0.0  # > 0: train this many epochs of packed rows instead of `steps`
    c.batch_size = 8  # global, in rows of seq_len tokens
    c.grad_accum = 1
    c.dtype = "float32"  # compute dtype; master weights of trainable params are always fp32
    c.frozen_dtype = ""  # "" = fp32; "bfloat16" halves frozen-weight memory (they have no master copy)
    c.remat = "none"  # none | full | save_dots
    c.attention = "auto"  # auto (splash on TPU, cuDNN on GPU for bf16, xla elsewhere) | xla | splash | cudnn
    c.loss_chunk = 0  # > 0: cross-entropy over vocabulary chunks of this size, never [B, T, V] logits (slayer_jax.modeling.loss)
    c.libtpu_flags = ""  # TPU compiler flags (LIBTPU_INIT_ARGS), e.g. "--xla_tpu_enable_windowed_einsum_for_all_gather=false"; train and plan set them before jax starts
    c.scan_layers = False  # scan runs of identical frozen layers (slayer_jax.modeling.layout): smaller HLO, same results
    c.mesh = "data=-1"  # data=..,fsdp=..,tensor=..; one axis may be -1
    c.num_devices = 0  # 0 = every device; N = the mesh uses the first N (e.g. 1 for a CPU demo)
    c.full_finetune = False
    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 4

    c.plan = ml_collections.ConfigDict()
    c.plan.kind = "shallow"  # none | shallow | uniform | lora | file | from_model (the model's own record: continue training)
    c.plan.expand = 7
    c.plan.prune = 0
    c.plan.prune_mode = "deepest"  # deepest | keep_last
    c.plan.prune_layers = ()  # explicit original indices, overrides prune/prune_mode
    c.plan.refresh_last = False
    c.plan.init = ""  # "" = the kind's own: shallow averages neighbours, uniform (LLaMA Pro) copies
    c.plan.file = ""
    c.plan.train_head = False
    c.plan.lora_rank = 0  # > 0: LoRA adapters of this rank on every frozen projection (kind "lora": the baseline)
    c.plan.lora_alpha = 16.0  # adapter scale alpha / rank

    c.data = ml_collections.ConfigDict()
    # .txt / dir / .jsonl / .parquet / datasets name (tokenised in memory), or a `slayer data prepare`
    # directory (streamed); a mixture "DIR_A@1.0;DIR_B@1.5" (weights in rows; all prepared or all raw)
    c.data.source = ""
    c.data.eval_source = ""
    c.data.mode = "text"  # text | sft
    c.data.field = ""
    c.data.seq_len = 512
    c.data.separator = "auto"  # after each raw-text document: auto (end-of-text token) | eos | none | a token
    c.data.packing_bins = 0  # rows the packer keeps open (0 = max(16, global batch))
    # The record of the upstream corpora a recipe mixes (HF names@weight, see configs/); not read by
    # training: prepare each with `slayer data prepare`, then set data.source to "DIR_A@w;DIR_B@w".
    c.data.mixture = ""

    c.optim = ml_collections.ConfigDict()  # LLaMA Pro defaults
    c.optim.peak_lr = 2e-4
    c.optim.warmup_frac = 0.06
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    # Per-group multipliers of the learning rate and the weight decay. A group is a leaf's provenance
    # (the layer map's kind: inserted / refreshed / original) or role (adapter, embed, norm, lm_head).
    c.optim.lr_mult = ml_collections.ConfigDict({g: 1.0 for g in OPTIM_GROUPS})  # learning rate x, per group
    c.optim.wd_mult = ml_collections.ConfigDict({g: 1.0 for g in OPTIM_GROUPS})  # weight decay x, per group

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True  # background writes; a kill loses < 2 intervals (False: at most 1)
    c.checkpoint.resume = True
    c.checkpoint.hash_base = True

    # Several JAX processes (TPU pod hosts, GPU nodes). Empty = from the environment: Cloud TPU
    # metadata, SLURM, or JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # host:port of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def describe_keys() -> str:
    """Every config key with its default and the comment beside it in :func:`base_config`, one
    per line (``slayer train --help``); the members of a group (``optim.lr_mult.*``) share its comment."""
    comments = {}
    for line in inspect.getsource(base_config).splitlines():
        m = re.match(r"\s+c\.([\w.]+) = (.+?)(?:\s+#\s*(.*))?$", line)
        if m:
            comments[m.group(1)] = m.group(3) or ""
    out = []

    def walk(d, prefix):
        for k, v in d.items():
            key = prefix + k
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                note = comments.get(key) or comments.get(key.rpartition(".")[0], "")
                out.append(f"  {key:<28} {v!r:<22} {note}".rstrip())

    walk(base_config().to_dict(), "")
    return "\n".join(out)


def paper_scale(c: ml_collections.ConfigDict, name: str, model: str, model_config: str) -> ml_collections.ConfigDict:
    """The LLaMA Pro pretraining settings shared by the 7B/8B recipes: ~80B tokens as 15,900 steps
    of 1024 x 4096, bf16 compute over fp32 masters, frozen weights in bf16, full remat, FSDP over
    every device, 16 rows per microbatch."""
    c.model, c.model_config = model, model_config
    c.workdir, c.export_dir = f"runs/{name}", f"runs/{name}/hf"
    c.steps, c.batch_size, c.grad_accum = 15900, 1024, 64
    c.dtype, c.frozen_dtype, c.remat = "bfloat16", "bfloat16", "full"
    c.loss_chunk = 4096  # the head's logits in 4096-column chunks: Llama-3's 128k vocabulary never forms [B, T, V]
    c.mesh = "data=1,fsdp=-1,tensor=1"
    c.eval_every = 500
    c.data.seq_len = 4096
    c.data.mixture = ("EleutherAI/proof-pile-2:algebraic-stack,open-web-math,arxiv@1.0;"
                      "bigcode/the-stack-dedup:data/python@1.5")
    c.checkpoint.every = 500
    return c


def validate(c: ml_collections.ConfigDict, source: str = "config") -> None:
    """Checks that need no weights and no devices: one-line errors naming the key."""

    for key, ok, want in (
        ("steps", int(c.steps) > 0, "a positive integer"),
        ("epochs", float(c.get("epochs", 0)) >= 0, "0 (use steps) or a positive number of epochs"),
        ("data.packing_bins", int(c.data.get("packing_bins", 0)) >= 0, "0 (automatic) or a positive integer"),
        ("batch_size", int(c.batch_size) > 0, "a positive integer"),
        ("grad_accum", int(c.grad_accum) > 0 and int(c.batch_size) % int(c.grad_accum) == 0,
         "a positive divisor of batch_size"),
        ("dtype", c.dtype in ("float32", "bfloat16", "bf16", "fp32"), "float32 or bfloat16"),
        ("frozen_dtype", c.frozen_dtype in ("", "float32", "bfloat16"), "'', float32 or bfloat16"),
        ("remat", c.remat in ("none", "full", "save_dots"), "none, full or save_dots"),
        ("attention", c.get("attention", "auto") in ("auto", "xla", "splash", "cudnn"), "auto, xla, splash or cudnn"),
        ("loss_chunk", int(c.get("loss_chunk", 0)) >= 0, "0 (full logits) or a positive vocabulary chunk"),
        ("plan.kind", c.plan.kind in PLAN_KINDS, f"one of {', '.join(PLAN_KINDS)}"),
        ("data.mode", c.data.mode in ("text", "sft"), "text or sft"),
        ("data.seq_len", int(c.data.seq_len) > 1, "an integer > 1"),
    ):
        if not ok:
            value = c
            for part in key.split("."):
                value = value[part]
            raise SlayerError(f"{source}: config key '{key}' is {value!r}; expected {want}")
    if str(c.data.get("source", "") or "").strip():
        from slayer_jax.data import parse_sources

        try:
            parse_sources(c.data.source)
        except SlayerError:
            raise SlayerError(f"{source}: config key 'data.source' is {c.data.source!r}; expected SOURCE or "
                              f"SOURCE@WEIGHT;SOURCE@WEIGHT;... with positive weights") from None
    mesh = parse_mesh(c.mesh)
    if sum(v == -1 for v in mesh.values()) > 1 or any(v == 0 or v < -1 for v in mesh.values()):
        raise SlayerError(f"{source}: config key 'mesh' is {c.mesh!r}; expected positive sizes, at most one -1")
    if c.plan.kind != "none":
        from slayer_jax.training.aot import model_config_of
        from slayer_jax.training.train import build_plan

        try:
            _, L = model_config_of(c)
        except SlayerError:
            return  # a model path that is not there yet: checked when the run loads it
        try:
            build_plan(c.plan, L)
        except (ValueError, FileNotFoundError) as e:
            raise SlayerError(f"{source}: config key 'plan' does not fit the {L}-layer model: {e}") from None


_LIBTPU_FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9_]*(=\S+)?")


def apply_libtpu_flags(c) -> str:
    """Add the config's ``libtpu_flags`` to LIBTPU_INIT_ARGS, which libtpu reads once, when jax starts
    its TPU backend (or compiles for a deviceless topology): ``slayer train`` and ``slayer plan`` call
    this before either, so the plan compiles with the flags the run uses. Returns what is now set."""
    flags = str(c.get("libtpu_flags", "") or "").split()
    bad = [f for f in flags if not _LIBTPU_FLAG.fullmatch(f)]
    if bad:
        raise SlayerError(f"config: field 'libtpu_flags' holds {bad[0]!r}; expected flags such as "
                          f"--xla_tpu_enable_windowed_einsum_for_all_gather=false, separated by spaces")
    have = os.environ.get("LIBTPU_INIT_ARGS", "").split()
    new = [f for f in flags if f not in have]
    if new:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise SlayerError("config: field 'libtpu_flags' is set, but jax has already started its backends in this "
                              "process; libtpu would not see the flags")
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(have + new)
    return os.environ.get("LIBTPU_INIT_ARGS", "")


def load_config_file(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.exists():
        raise SlayerError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"slayer_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise SlayerError(f"{path}: no get_config() function; expected an ml_collections config file")
    cfg = mod.get_config()
    for ov in overrides:
        apply_override(cfg, ov, str(path))
    validate(cfg, str(path))
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, override: str, source: str = "config") -> None:
    """Apply 'a.b=value' (value parsed as a Python literal when it is one, else a string).
    An unknown key or a type change is a one-line error."""
    key, sep, raw = override.removeprefix("--config.").removeprefix("config.").partition("=")
    if not sep:
        raise SlayerError(f"{source}: override '{override}' is not KEY=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node, parts = cfg, key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise SlayerError(f"{source}: unknown config key '{key}'")
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
        raise SlayerError(f"{source}: unknown config key '{key}'")
    old = node[parts[-1]]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise SlayerError(f"{source}: config key '{key}' is a bool; got {raw!r}")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, str):
        raise SlayerError(f"{source}: config key '{key}' expects a number; got {raw!r}")
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
        value = raw
    if isinstance(old, tuple) and isinstance(value, (int, list)):
        value = tuple(value) if isinstance(value, list) else (value,)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise SlayerError(f"{source}: config key '{key}': {e}") from None
