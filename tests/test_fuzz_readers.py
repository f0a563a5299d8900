"""Hostile inputs for every reader (issue 18): property-based fuzzing with hypothesis.

For each reader the property is the same: either a correct result, or a ``SlayerError`` whose message
is one line naming the file (and the field where there is one). Through the CLI: exit 2, one line on
stderr starting ``slayer: error:``, no traceback, nothing at OUT and no staging left beside it
(``.OUT.tmp-*``, ``.OUT.old-*``).

Readers: config.json, safetensors headers and index files, GGUF metadata and truncated GGUF files,
plan files, the surgery record and orbax checkpoint files (model and training checkpoints), training
data (documents, chats, ``check_messages``), MCQ and text files of `slayer eval` / `slayer importance`,
`slayer compare` result files, and lm-eval task files (``--include-path``).

Example counts are bounded (the file runs in about two minutes on two CPU cores); every input that
once broke a reader is pinned with ``@example`` so that it is tried on every run.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from slayer_jax.cli import main
from slayer_jax.errors import SlayerError


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------- strategies
# Numbers as JSON text that json.dumps never writes but a file may hold: 4301+ digits (int() refuses
# them), out-of-range exponents (json reads 1e400 as inf), NaN and Infinity (json's extensions).
RAW_NUMBERS = ["1" * 5000, "-" + "9" * 4400, "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-400", "-0",
               "0.5", "4.0", "1" * 40]
DEEP = "[" * 3000 + "]" * 3000  # nesting json's decoder refuses with RecursionError
NASTY_STRINGS = ["NaN", "Infinity", "1e400", "-1", "12", "0x10", "", " ", "\n", "a\nb", "\u2028", "\x0c", "\ud800",
                 "abc", "true", "null", "llama", "linear", "\x00", "é", "東"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 300), st.integers(-(10 ** 40), 10 ** 40), st.sampled_from([0, 2 ** 31, 2 ** 63, 2 ** 64, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-5, -0.0, 1e308, 4.0]),
    st.text(max_size=12), st.sampled_from(NASTY_STRINGS))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                           max_leaves=10)
json_keys = st.one_of(st.text(max_size=10), st.sampled_from(["a\nb", "\u2028", "x'y", "", "plan", "text"]))
json_objects = st.dictionaries(json_keys, json_values, max_size=5)


def json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


def with_raw(obj: dict, key: str, raw: str) -> str:
    """``obj`` as JSON text, the value of ``key`` replaced by the raw JSON token ``raw``."""
    mark = "\x00RAW\x00"
    return json.dumps({**obj, key: mark}).replace(json.dumps(mark), raw)


def bad_bytes():
    """Raw file contents: random bytes, non-UTF-8 and other encodings, truncations, deep nesting."""
    return st.one_of(
        st.binary(max_size=80),
        st.sampled_from([b"", b"\xff\xfe{}", b"\xef\xbb\xbf{}", "{\"a\": \"é\"}".encode("utf-16"),
                         "{\"a\": \"é\"}".encode("latin-1"), b"{\"a\": 1", b"[1, 2", b"\x00" * 8,
                         DEEP.encode(), ("[" + "1" * 5000 + "]").encode()]))


# ----------------------------------------------------------------------------- checks
def assert_one_line(e: BaseException, path, *fields: str) -> str:
    """A SlayerError of one line that starts with the file's name and, when ``fields`` are given,
    names one of them."""
    assert isinstance(e, SlayerError), f"{type(e).__name__}: {e}"
    msg = str(e)
    assert msg.splitlines() == [msg], repr(msg)
    assert msg.startswith(str(path)), (str(path), msg)
    if fields:
        assert any(f in msg for f in fields), (fields, msg)
    return msg


def outcome(fn, *args, **kwargs):
    """(result, None) or (None, the SlayerError); any other exception fails the test as itself."""
    try:
        return fn(*args, **kwargs), None
    except SlayerError as e:
        return None, e


LEFTOVER = re.compile(r"^\..*\.(tmp|old)-|\.tmp\d+$")


def run_cli(argv: list[str], out: Path) -> int:
    """Run ``slayer ARGV`` in-process: exit 0 with OUT written, or exit 2 with one error line and no
    OUT; never a traceback, never a staging directory or temp file beside OUT."""
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        code = main(argv)
    leftovers = [p.name for p in out.parent.iterdir() if LEFTOVER.search(p.name)]
    assert not leftovers, leftovers
    text = err.getvalue()
    assert "Traceback" not in text, text
    if code == 0:
        assert out.exists(), (argv, text)
        return 0
    lines = [x for x in text.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("slayer: error: "), (code, text)
    assert not out.exists(), f"{out} written by a failed command"
    return code


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="fuzz_") as d:
        yield Path(d)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tiny_hf import make_hf_model

    d = tmp_path_factory.mktemp("fuzz_hf") / "hf"
    make_hf_model("gqa_kv2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama with a tokenizer (byte-level BPE with a chat template), as our HF exporter writes it."""
    from tiny_tok import make_exported_model

    d = make_exported_model(tmp_path_factory.mktemp("fuzz_exp") / "model", layers=2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                         "{% endif %}")
    tok.save_pretrained(str(d))
    return d


def copy_model(src: Path, root: Path) -> Path:
    dst = root / "src"
    shutil.copytree(src, dst)
    return dst


# ============================================================================= config.json
CONFIG_FIELDS = ["model_type", "hidden_act", "attention_dropout", "mlp_dropout", "hidden_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rope_parameters", "rope_theta", "rope_scaling", "sliding_window",
                 "use_sliding_window", "vocab_size", "intermediate_size", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
                 "num_hidden_layers"]
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
             "attention_factor", "x"]
rope_objects = st.fixed_dictionaries({}, optional={k: json_values for k in ROPE_KEYS}) | st.fixed_dictionaries(
    {"rope_type": st.sampled_from(["linear", "llama3", "default"])},
    optional={k: st.one_of(scalars, st.just([1])) for k in ROPE_KEYS[2:]})


def check_config(cfg, n_layers) -> None:
    """What every accepted config must be: typed, positive, finite, hashable (a jit static argument)
    and with finite rotary frequencies."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "max_position_embeddings"):
        v = getattr(cfg, name)
        assert type(v) is int and v > 0, (name, v)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    for name in ("rms_norm_eps", "rope_theta"):
        assert type(getattr(cfg, name)) is float and math.isfinite(getattr(cfg, name)), name
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert type(getattr(cfg, name)) is bool, name
    assert type(n_layers) is int and n_layers >= 0
    hash(cfg)
    inv = cfg.rope_inv_freq()
    assert inv.shape == (cfg.head_dim // 2,) and np.isfinite(inv).all() and (inv > 0).all()


@fuzz(150)
@given(base=st.sampled_from([{}, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}}]),
       edits=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, min_size=1, max_size=3),
       rope=st.none() | rope_objects,
       raw=st.none() | st.tuples(st.sampled_from(CONFIG_FIELDS), st.sampled_from(RAW_NUMBERS + [DEEP])))
@example(base={}, edits={"hidden_size": float("nan")}, rope=None, raw=None)
@example(base={}, edits={"hidden_size": float("inf")}, rope=None, raw=None)
@example(base={}, edits={"hidden_size": "abc"}, rope=None, raw=None)
@example(base={}, edits={"rms_norm_eps": float("nan")}, rope=None, raw=None)
@example(base={}, edits={"rope_theta": 0}, rope=None, raw=None)
@example(base={}, edits={"num_hidden_layers": True}, rope=None, raw=None)
@example(base={}, edits={"model_type": "llama"}, rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "a",
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16}, raw=None)
@example(base={}, edits={"model_type": "llama"}, rope={"rope_type": "linear", "factor": "abc"}, raw=None)
@example(base={}, edits={"model_type": "llama"}, rope={"rope_type": "linear", "factor": 2.0, "x": [1]}, raw=None)
@example(base={}, edits={"model_type": "llama"}, rope={"rope_type": "linear", "factor": 2.0,
                                                     "attention_factor": [1]}, raw=None)
@example(base={}, edits={"model_type": "llama"}, rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16}, raw=None)
@example(base={}, edits={"model_type": "llama"}, rope=None, raw=("hidden_size", "1" * 5000))
@example(base={}, edits={"model_type": "llama"}, rope=None, raw=("hidden_size", "1e400"))
@example(base={}, edits={"model_type": "llama"}, rope=None, raw=("rope_scaling", DEEP))
def test_config_json_any_value_in_any_field(hf_dir, base, edits, rope, raw):
    from slayer_jax.modeling.config import load_config

    cfg = {**json.loads((hf_dir / "config.json").read_text()), **base, **edits}
    if rope is not None:
        cfg["rope_scaling"] = rope
        cfg.pop("rope_parameters", None)
    text = with_raw(cfg, *raw) if raw else json_text(cfg)
    with scratch() as d:
        path = d / "config.json"
        path.write_text(text)
        got, err = outcome(load_config, path)
        if err is not None:
            msg = assert_one_line(err, path)
            assert re.search(r"field '[^']+'|not UTF-8|not valid JSON|JSON object", msg), msg
        else:
            check_config(*got)


@fuzz(40)
@given(data=bad_bytes())
@example(data=b"\xff\xfe{}")
@example(data=DEEP.encode())
@example(data=b'{"hidden_size": ' + b"1" * 5000 + b"}")
def test_config_json_any_bytes(hf_dir, data):
    from slayer_jax.modeling.config import load_config

    with scratch() as d:
        path = d / "config.json"
        path.write_bytes(data)
        _, err = outcome(load_config, path)
        assert err is not None  # none of these bytes is an HF config
        assert_one_line(err, path)


@fuzz(6)
@given(edits=st.dictionaries(st.sampled_from(CONFIG_FIELDS), json_values, min_size=1, max_size=2))
@example(edits={"hidden_size": float("nan")})
@example(edits={"num_hidden_layers": 10 ** 15})
def test_config_json_through_convert(hf_dir, edits):
    with scratch() as d:
        src = copy_model(hf_dir, d)
        cfg = {**json.loads((src / "config.json").read_text()), **edits}
        (src / "config.json").write_text(json_text(cfg))
        run_cli(["convert", str(src), str(d / "out")], d / "out")


# ============================================================================= safetensors
def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path: Path, header, body: bytes, length: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + body)


def check_safetensors(path: Path) -> None:
    """Open the file and read every tensor: arrays of the declared shape and dtype, whose bytes are
    their own (no two tensors share a byte), or one line."""
    from slayer_jax.io.safetensors_stream import SafetensorsFile

    f, err = outcome(SafetensorsFile, path)
    if err is not None:
        assert_one_line(err, path)
        return
    spans = []
    for name in f.entries:
        arr, err = outcome(f.read, name)
        if err is not None:
            assert_one_line(err, path, "tensor")
            continue
        e = f.entries[name]
        assert arr.shape == tuple(e["shape"]) and arr.dtype.itemsize * arr.size == e["data_offsets"][1] - \
            e["data_offsets"][0]
        if arr.size:
            spans.append(tuple(e["data_offsets"]))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # a correct result: no shared bytes


ENTRY_FIELDS = ["dtype", "shape", "data_offsets"]
dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "f32", "", "F32\n"]) | json_values


@fuzz(150)
@given(mutation=st.one_of(
    st.tuples(st.just("entry"), st.integers(0, 40), st.sampled_from(ENTRY_FIELDS), json_values | dtypes),
    st.tuples(st.just("drop"), st.integers(0, 40), st.sampled_from(ENTRY_FIELDS)),
    st.tuples(st.just("offsets"), st.integers(0, 40), st.integers(-64, 64), st.integers(-64, 64)),
    st.tuples(st.just("header"), json_values),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("length"), st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("raw"), bad_bytes())))
@example(mutation=("header", [1, 2]))
@example(mutation=("drop", 0, "data_offsets"))
@example(mutation=("offsets", 1, -8, -8))  # overlaps its neighbour
@example(mutation=("entry", 0, "shape", [2 ** 32, 2 ** 32, 1]))  # numpy's int64 product wraps to 0
@example(mutation=("entry", 0, "shape", [2 ** 70]))
@example(mutation=("entry", 0, "dtype", "F32\n"))
@example(mutation=("metadata", [1]))
@example(mutation=("raw", DEEP.encode()))
@example(mutation=("raw", b'{"a": ' + b"1" * 5000 + b"}"))
def test_safetensors_header_mutations(hf_dir, mutation):
    header, body = read_header(hf_dir / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    kind, *arg = mutation
    length = None
    if kind == "entry":
        header[names[arg[0] % len(names)]][arg[1]] = arg[2]
    elif kind == "drop":
        del header[names[arg[0] % len(names)]][arg[1]]
    elif kind == "offsets":
        e = header[names[arg[0] % len(names)]]
        e["data_offsets"] = [e["data_offsets"][0] + arg[1], e["data_offsets"][1] + arg[2]]
    elif kind == "header":
        header = arg[0]
    elif kind == "metadata":
        header["__metadata__"] = arg[0]
    elif kind == "length":
        length = arg[0]
    elif kind == "raw":
        header = arg[0]
    with scratch() as d:
        path = d / "model.safetensors"
        write_header(path, header, body, length)
        if kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * arg[0])])
        check_safetensors(path)


@fuzz(80)
@given(index=st.one_of(
    json_values,
    st.fixed_dictionaries({"weight_map": json_values}),
    st.fixed_dictionaries({"weight_map": st.dictionaries(json_keys, json_values, max_size=3)}),
    st.builds(lambda v: {"weight_map": {"model.embed_tokens.weight": v}},
              st.sampled_from(["", ".", "..", "/etc/passwd", "../hf/model.safetensors", "model.safetensors",
                               "missing.safetensors", "config.json"]) | json_values)),
    raw=st.none() | bad_bytes())
@example(index={"weight_map": [1]}, raw=None)
@example(index={"weight_map": {"a": 5}}, raw=None)
@example(index={"weight_map": {"a": ""}}, raw=None)
@example(index={"weight_map": {"a": [1]}}, raw=None)
@example(index=None, raw=b"\xff\xfe{}")
@example(index={"weight_map": {"": "\n"}}, raw=None)
def test_safetensors_index_file_of_any_shape(hf_dir, index, raw):
    from slayer_jax.io.hf import INDEX_FILE, load_hf

    with scratch() as d:
        src = copy_model(hf_dir, d)
        path = src / INDEX_FILE
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(json_text(index))
        got, err = outcome(load_hf, src, tokenizer=False, progress=False)
        if err is not None:
            assert_one_line(err, src)
        else:
            assert len(got[0]["layers"]) == 3


@fuzz(6)
@given(mutation=st.one_of(st.tuples(st.just("header"), json_values),
                          st.tuples(st.just("entry"), st.sampled_from(ENTRY_FIELDS), json_values),
                          st.tuples(st.just("index"), json_values)))
@example(mutation=("header", [1]))
@example(mutation=("index", {"weight_map": {"model.norm.weight": ""}}))
def test_safetensors_through_convert(hf_dir, mutation):
    with scratch() as d:
        src = copy_model(hf_dir, d)
        header, body = read_header(src / "model.safetensors")
        kind, *arg = mutation
        if kind == "header":
            write_header(src / "model.safetensors", arg[0], body)
        elif kind == "entry":
            header["model.norm.weight"][arg[0]] = arg[1]
            write_header(src / "model.safetensors", header, body)
        else:
            (src / "model.safetensors.index.json").write_text(json_text(arg[0]))
        run_cli(["convert", str(src), str(d / "out")], d / "out")


# ============================================================================= GGUF
@pytest.fixture(scope="module")
def gguf_parts():
    """A tiny llama GGUF's metadata (key -> (value, type)) and tensors, written with gguf.GGUFWriter."""
    import gguf
    from gguf import GGUFValueType as T

    from slayer_jax.io.gguf import bytes_to_unicode

    alpha = bytes_to_unicode()
    tokens = ["<s>", "</s>"] + [alpha[b] for b in range(256)] + ["Ġt", "he"]
    D, F, H, K = 8, 16, 2, 1
    hd, V = D // H, len(tokens)
    meta = {
        "llama.block_count": (1, T.UINT32), "llama.context_length": (64, T.UINT32),
        "llama.embedding_length": (D, T.UINT32), "llama.feed_forward_length": (F, T.UINT32),
        "llama.attention.head_count": (H, T.UINT32), "llama.attention.head_count_kv": (K, T.UINT32),
        "llama.rope.dimension_count": (hd, T.UINT32), "llama.rope.freq_base": (10000.0, T.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.pre": ("llama-bpe", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY), "tokenizer.ggml.token_type": ([3, 3] + [1] * (V - 2), T.ARRAY),
        "tokenizer.ggml.merges": (["Ġ t", "h e"], T.ARRAY), "tokenizer.ggml.bos_token_id": (0, T.UINT32),
        "tokenizer.ggml.eos_token_id": (1, T.UINT32), "tokenizer.ggml.add_bos_token": (True, T.BOOL),
        "tokenizer.chat_template": ("{% for m in messages %}{{ m['content'] }}{% endfor %}", T.STRING),
    }
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (H * hd, D), "blk.0.attn_k.weight": (K * hd, D),
              "blk.0.attn_v.weight": (K * hd, D), "blk.0.attn_output.weight": (D, H * hd),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    return gguf, meta, tensors


def write_gguf(gguf, path: Path, meta: dict, tensors: dict) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, *sub) in meta.items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_KEYS = ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
             "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
             "llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count",
             "llama.rope.freq_base", "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.vocab_size",
             "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
             "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
             "tokenizer.chat_template"]


@st.composite
def gguf_values(draw):
    """(value, GGUF type[, array element type]) of any of GGUF's 13 value types."""
    from gguf import GGUFValueType as T

    ints = {T.UINT8: (0, 255), T.INT8: (-128, 127), T.UINT16: (0, 2 ** 16 - 1), T.INT16: (-2 ** 15, 2 ** 15 - 1),
            T.UINT32: (0, 2 ** 32 - 1), T.INT32: (-2 ** 31, 2 ** 31 - 1), T.UINT64: (0, 2 ** 64 - 1),
            T.INT64: (-2 ** 63, 2 ** 63 - 1)}
    kind = draw(st.sampled_from(["int", "float", "bool", "str", "bytes", "array"]))
    if kind == "int":
        t = draw(st.sampled_from(sorted(ints)))
        lo, hi = ints[t]
        return draw(st.one_of(st.integers(max(lo, -4), min(hi, 300)), st.sampled_from([lo, hi]))), t
    if kind == "float":
        t = draw(st.sampled_from([T.FLOAT32, T.FLOAT64]))
        return draw(st.floats(allow_nan=True, allow_infinity=True, width=32 if t == T.FLOAT32 else 64)), t
    if kind == "bool":
        return draw(st.booleans()), T.BOOL
    if kind == "str":
        return draw(st.text(min_size=1, max_size=12) | st.sampled_from(["none", "linear", "yarn", "gpt2", "llama",
                                                                         "4", "llama-bpe"])), T.STRING
    if kind == "bytes":
        return draw(st.sampled_from([b"\xff\xfe", b"ab\x80", b"\xc3"])), T.STRING
    sub = draw(st.sampled_from(["int", "str", "float", "bool", "bytes"]))
    items = {"int": st.integers(0, 300), "str": st.text(max_size=6), "float": st.floats(width=32),
             "bool": st.booleans(), "bytes": st.just(b"\xff")}[sub]
    sub_type = {"int": T.INT32, "str": T.STRING, "float": T.FLOAT32, "bool": T.BOOL, "bytes": T.STRING}[sub]
    return draw(st.lists(items, min_size=1, max_size=6)), T.ARRAY, sub_type


def check_gguf_load(path: Path) -> None:
    from slayer_jax.io.gguf import load_gguf

    got, err = outcome(load_gguf, path, progress=False)
    if err is not None:
        msg = assert_one_line(err, path)
        assert re.search(r"field|tensor|truncated|GGUF", msg), msg
        return
    params, cfg, tok = got
    check_config(cfg, len(params["layers"]))
    assert tok is not None and isinstance(tok("the thin")["input_ids"], list)


def gguf_example(**edits):
    from gguf import GGUFValueType as T

    return {k: (v, getattr(T, t)) for k, (v, t) in edits.items()}


@fuzz(60)
@given(edits=st.dictionaries(st.sampled_from(GGUF_KEYS), gguf_values(), min_size=1, max_size=2),
       drop=st.lists(st.sampled_from(GGUF_KEYS), max_size=2))
@example(edits=gguf_example(**{"llama.block_count": ("abc", "STRING")}), drop=[])
@example(edits=gguf_example(**{"llama.block_count": (2 ** 63, "UINT64")}), drop=[])
@example(edits=gguf_example(**{"llama.embedding_length": (True, "BOOL")}), drop=[])
@example(edits=gguf_example(**{"llama.attention.key_length": ("4", "STRING")}), drop=[])
@example(edits=gguf_example(**{"llama.rope.freq_base": ("x", "STRING")}), drop=[])
@example(edits=gguf_example(**{"llama.attention.layer_norm_rms_epsilon": (float("nan"), "FLOAT32")}), drop=[])
@example(edits=gguf_example(**{"llama.rope.freq_base": (1e39, "FLOAT64")}), drop=[])  # inf as float32
@example(edits=gguf_example(**{"llama.context_length": (1.5, "FLOAT32")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.ggml.tokens": (5, "UINT32")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.ggml.pre": (["a"], "ARRAY")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.ggml.merges": (["zz qq"], "ARRAY")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.ggml.merges": ([1, 2], "ARRAY")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.ggml.bos_token_id": ("1", "STRING")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.ggml.model": (b"\xff\xfe", "STRING")}), drop=[])
@example(edits=gguf_example(**{"tokenizer.chat_template": (5, "UINT32")}), drop=[])
@example(edits=gguf_example(**{"llama.rope.scaling.type": ("linear", "STRING"),
                               "llama.rope.scaling.factor": ("x", "STRING")}), drop=[])
def test_gguf_metadata_of_any_type(gguf_parts, edits, drop):
    gguf, meta, tensors = gguf_parts
    meta = {k: v for k, v in {**meta, **edits}.items() if k not in drop or k in edits}
    with scratch() as d:
        path = d / "m.gguf"
        write_gguf(gguf, path, meta, tensors)
        check_gguf_load(path)


@fuzz(30)
@given(keep=st.floats(0, 1), flip=st.none() | st.tuples(st.floats(0, 1), st.integers(0, 255)))
def test_gguf_truncated_or_damaged(gguf_parts, keep, flip):
    gguf, meta, tensors = gguf_parts
    with scratch() as d:
        path = d / "m.gguf"
        write_gguf(gguf, path, meta, tensors)
        data = bytearray(path.read_bytes())
        if flip is not None:
            data[int(flip[0] * (len(data) - 1))] = flip[1]
        path.write_bytes(bytes(data[: max(4, int(len(data) * keep))]))
        check_gguf_load(path)


@fuzz(5)
@given(edits=st.dictionaries(st.sampled_from(GGUF_KEYS), gguf_values(), min_size=1, max_size=1))
@example(edits=gguf_example(**{"llama.block_count": ("abc", "STRING")}))
def test_gguf_through_convert(gguf_parts, edits):
    gguf, meta, tensors = gguf_parts
    with scratch() as d:
        path = d / "m.gguf"
        write_gguf(gguf, path, {**meta, **edits}, tensors)
        run_cli(["convert", str(path), str(d / "out")], d / "out")


# ============================================================================= plan files
PLAN_FIELDS = ["num_layers", "expand_after", "prune", "refresh", "init", "identity", "train_embed", "train_norm",
               "train_head", "name", "notes"]
plan_values = st.one_of(json_values, st.lists(st.integers(-2, 5), max_size=4), st.integers(-1, 5),
                        st.sampled_from(["average", "copy", "random"]))


@fuzz(200)
@given(plan=st.one_of(json_values, json_objects,
                      st.dictionaries(st.sampled_from(PLAN_FIELDS) | json_keys, plan_values, max_size=6),
                      st.fixed_dictionaries({"num_layers": st.just(3)},
                                            optional={k: plan_values for k in PLAN_FIELDS[1:]})),
       wrap=st.sampled_from(["plain", "record", "config"]), raw=st.none() | bad_bytes())
@example(plan={"num_layers": 3, "a\nb": 1}, wrap="plain", raw=None)
@example(plan=None, wrap="plain", raw=DEEP.encode())
@example(plan=None, wrap="plain", raw=b'{"num_layers": ' + b"1" * 5000 + b"}")
def test_plan_file_of_any_shape(hf_dir, plan, wrap, raw):
    from slayer_jax import surgery

    content = {"plain": plan, "record": {"plan": plan}, "config": {"slayer": {"plan": plan}}}[wrap]
    with scratch() as d:
        path = d / "plan.json"
        path.write_bytes(raw) if raw is not None else path.write_text(json_text(content))
        got, err = outcome(surgery.plan_from, "file", 3, file=str(path))
        if err is not None:
            assert_one_line(err, path)
            return
        assert isinstance(got, surgery.Plan)
        if got.num_layers == 3:  # it runs: the new layer count is what the plan says
            params = {"embed": {"embedding": np.zeros((4, 2))}, "norm": {"scale": np.ones(2)},
                      "layers": [{"o_proj": {"kernel": np.ones((2, 2))}, "down_proj": {"kernel": np.ones((2, 2))},
                                  "q_proj": {"kernel": np.full((2, 2), i)}} for i in range(3)]}
            new, _, lmap = surgery.apply_plan(params, got)
            assert len(new["layers"]) == len(lmap) == got.num_new_layers


@fuzz(6)
@given(plan=st.dictionaries(st.sampled_from(PLAN_FIELDS), plan_values, max_size=4) | json_values)
@example(plan={"num_layers": 3, "a\nb": 1})
@example(plan={"num_layers": 3, "expand_after": [0]})
def test_plan_file_through_surgery(hf_dir, plan):
    with scratch() as d:
        path = d / "plan.json"
        path.write_text(json_text(plan))
        run_cli(["surgery", str(hf_dir), str(d / "out"), "--plan", str(path)], d / "out")


# ============================================================================= the record, checkpoints
RECORD_FIELDS = ["plan", "layer_map", "trainable_layers", "trainable_rest", "trained_steps"]
layer_entries = st.fixed_dictionaries({}, optional={"index": st.integers(-1, 3) | json_values,
                                                    "kind": st.sampled_from(["original", "inserted", "refreshed",
                                                                             "x"]) | json_values,
                                                    "from": st.lists(st.integers(-1, 3), max_size=2) | json_values,
                                                    "trainable": st.booleans() | json_values})


@fuzz(150)
@given(record=st.one_of(json_values, st.fixed_dictionaries(
    {"layer_map": st.lists(layer_entries, max_size=3) | json_values},
    optional={k: json_values for k in RECORD_FIELDS if k != "layer_map"})))
@example(record={"layer_map": [{"index": True, "kind": "original", "from": [0], "trainable": False}]})
@example(record={"layer_map": [{"index": 0, "kind": "original", "from": [0], "trainable": False}],
                 "plan": {"num_layers": 1, "a\nb": 2}})
def test_record_of_any_shape(record):
    from slayer_jax import surgery

    with scratch() as d:
        (d / "config.json").write_text(json_text({"model_type": "llama", "slayer": record}))
        got, err = outcome(surgery.read_record, d)
        if err is not None:
            assert_one_line(err, d / "config.json", "slayer.")
        elif got is not None:
            for j, r in enumerate(got.layer_map):
                assert type(r["index"]) is int and r["index"] == j and type(r["trainable"]) is bool
            json.dumps(got.to_json())  # it can be written back


@pytest.fixture(scope="module")
def ckpt_dir(hf_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt"
    assert main(["convert", str(hf_dir), str(d), "--to", "checkpoint"]) == 0
    return d


@fuzz(14)
@given(target=st.sampled_from(["_CHECKPOINT_METADATA", "_METADATA", "_sharding", "array_metadatas/process_0",
                               "manifest.ocdbt", "ocdbt.process_0/manifest.ocdbt", "data", "record", "config"]),
       content=st.one_of(bad_bytes(), json_values.map(lambda v: json_text(v).encode())))
@example(target="_CHECKPOINT_METADATA", content=b"[1, 2]")
@example(target="_METADATA", content=b"[1, 2]")
@example(target="array_metadatas/process_0", content=b"\xff\x00garbage")
@example(target="array_metadatas/process_0", content=b"")
@example(target="data", content=b"\xff\x00garbage")
def test_model_checkpoint_files_damaged(ckpt_dir, target, content):
    """`slayer export` of a checkpoint whose orbax files, config.json or record are damaged."""
    with scratch() as d:
        src = copy_model(ckpt_dir, d)
        params = src / "params"
        if target == "data":  # the largest array file of the OCDBT store
            victim = max((p for p in (params / "ocdbt.process_0" / "d").iterdir()), key=lambda p: p.stat().st_size)
        elif target == "record":
            cfg = json.loads((src / "config.json").read_text())
            try:
                cfg["slayer"] = json.loads(content)
            except (ValueError, RecursionError):
                cfg["slayer"] = content.decode("latin-1")
            (src / "config.json").write_text(json_text(cfg))
            victim = None
        elif target == "config":
            victim = src / "config.json"
        else:
            victim = params / target
        if victim is not None:
            victim.write_bytes(content)
        run_cli(["export", str(src), str(d / "out")], d / "out")


@pytest.fixture(scope="module")
def train_ckpt(tmp_path_factory):
    import grain
    import jax.numpy as jnp

    from slayer_jax.io.checkpoint import TrainCheckpointer

    d = tmp_path_factory.mktemp("fuzz_train") / "ckpt"
    ck = TrainCheckpointer(d, keep=3, async_save=False)
    loader = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(loader)
    ck.save(1, {"w": jnp.arange(10.0, dtype=jnp.float32)}, loader, {"plan": "p", "base_hash": "h"})
    ck.close()
    return d


@fuzz(15)
@given(target=st.sampled_from(["1/meta/metadata", "1/data/process_0-of-1.json", "1/_CHECKPOINT_METADATA"]),
       content=st.one_of(bad_bytes(), json_values.map(lambda v: json_text(v).encode()),
                         st.just(b'{"plan": "p", "base_hash": "h"}')))
@example(target="1/meta/metadata", content=b"[1, 2]")
@example(target="1/meta/metadata", content=b"\xff")
@example(target="1/data/process_0-of-1.json", content=b"[1]")
def test_training_checkpoint_meta_damaged(train_ckpt, target, content):
    import grain
    import jax
    import jax.numpy as jnp

    from slayer_jax.io.checkpoint import TrainCheckpointer

    with scratch() as d:
        src = d / "ckpt"
        shutil.copytree(train_ckpt, src)
        (src / target).write_bytes(content)
        ck, err = outcome(TrainCheckpointer, src, keep=3, async_save=False)
        if err is not None:
            assert_one_line(err, src)
            return
        loader = iter(grain.MapDataset.range(100).to_iter_dataset())
        try:
            got, err = outcome(ck.restore, {"w": jax.ShapeDtypeStruct((10,), jnp.float32)}, loader,
                               {"plan": "p", "base_hash": "h"})
        finally:
            ck.close()
        if err is not None:
            assert_one_line(err, src)
        else:
            state, step = got
            assert step == 1 and np.asarray(state["w"]).tolist() == list(range(10))


# ============================================================================= training data
doc_lines = st.one_of(
    json_objects.map(lambda o: json_text(o).encode()),
    st.fixed_dictionaries({"text": json_values | st.sampled_from(NASTY_STRINGS)}).map(lambda o: json_text(o).encode()),
    bad_bytes(),
    st.sampled_from([b'{"text": "\\ud800 x"}', b'{"text": ' + b"1" * 5000 + b"}", b'{"text": "ok"}', b"   "]))


@fuzz(120)
@given(lines=st.lists(doc_lines, min_size=1, max_size=4), suffix=st.sampled_from([".jsonl", ".txt", ".md"]))
@example(lines=[b'{"text": "\\ud800 x"}'], suffix=".jsonl")
@example(lines=[b'{"text": ' + b"1" * 5000 + b"}"], suffix=".jsonl")
@example(lines=[DEEP.encode()], suffix=".jsonl")
@example(lines=[b'{"a\\nb": 1}'], suffix=".jsonl")
def test_training_documents_any_lines(lines, suffix):
    from slayer_jax.data.sources import load_documents

    with scratch() as d:
        path = d / f"docs{suffix}"
        path.write_bytes(b"\n".join(lines))
        got, err = outcome(load_documents, path)
        if err is not None:
            assert_one_line(err, path)
        else:
            assert got and all(isinstance(doc, str) and doc.strip() for doc in got)
            for doc in got:
                doc.encode("utf-8")  # text a tokenizer can take


messages = st.one_of(
    json_values,
    st.lists(st.one_of(json_values, st.fixed_dictionaries(
        {}, optional={"role": st.sampled_from(["user", "assistant", "system"]) | json_values,
                      "content": st.text(max_size=8) | json_values | st.sampled_from(NASTY_STRINGS)})), max_size=3))


@fuzz(200)
@given(msgs=messages)
@example(msgs=[{"role": "user", "content": "\ud800"}])
@example(msgs=[{"role": "\ud800", "content": "x"}])
def test_check_messages_any_value(msgs):
    from slayer_jax.data.sources import check_messages

    got, err = outcome(check_messages, msgs, "chat.jsonl:1")
    if err is not None:
        assert_one_line(err, "chat.jsonl:1", "messages")
    else:
        assert got and all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in got)
        for m in got:
            (m["role"] + m["content"]).encode("utf-8")


@fuzz(80)
@given(lines=st.lists(st.one_of(bad_bytes(), json_objects.map(lambda o: json_text(o).encode()),
                                messages.map(lambda m: json_text({"messages": m}).encode())), min_size=1, max_size=3))
@example(lines=[b'{"messages": [{"role": "user", "content": "\\ud800"}]}'])
@example(lines=[b'{"a\\nb": []}'])
def test_chat_jsonl_any_lines(lines):
    from slayer_jax.data.sources import load_chat_jsonl

    with scratch() as d:
        path = d / "chat.jsonl"
        path.write_bytes(b"\n".join(lines))
        got, err = outcome(load_chat_jsonl, path)
        if err is not None:
            assert_one_line(err, path)
        else:
            assert got and all(isinstance(c, list) and c for c in got)


@pytest.fixture(scope="module")
def tok_dir(exported, tmp_path_factory):
    """Only the tokenizer files of the tiny model: what `slayer data prepare --tokenizer` reads."""
    d = tmp_path_factory.mktemp("fuzz_tok") / "tok"
    d.mkdir()
    for f in exported.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return d


@fuzz(8)
@given(lines=st.lists(doc_lines, min_size=1, max_size=3), mode=st.sampled_from(["text", "sft"]))
@example(lines=[b'{"text": "\\ud800 x"}'], mode="text")
@example(lines=[b'{"messages": [{"role": "user", "content": "\\ud800"}]}'], mode="sft")
@example(lines=[b'{"text": "fine words"}'], mode="text")
def test_training_data_through_prepare(tok_dir, lines, mode):
    with scratch() as d:
        path = d / "data.jsonl"
        path.write_bytes(b"\n".join(lines))
        run_cli(["data", "prepare", str(path), "--tokenizer", str(tok_dir), "--out", str(d / "out"),
                 "--seq-len", "16", "--mode", mode, "--quiet"], d / "out")


# ============================================================================= eval files
mcq_lines = st.one_of(
    bad_bytes(), json_values.map(lambda v: json_text(v).encode()),
    st.fixed_dictionaries({}, optional={
        "question": st.text(max_size=8) | json_values | st.sampled_from(NASTY_STRINGS),
        "choices": st.lists(st.text(max_size=5) | st.sampled_from(NASTY_STRINGS), max_size=4) | json_values,
        "answer": st.integers(-1, 4) | json_values}).map(lambda o: json_text(o).encode()))


@fuzz(150)
@given(lines=st.lists(mcq_lines, min_size=1, max_size=4))
@example(lines=[b"\xff\xfe"])
@example(lines=[b'{"question": "q", "choices": ["a", "b"], "answer": ' + b"1" * 5000 + b"}"])
@example(lines=[b'{"question": "\\ud800", "choices": ["a", "b"], "answer": 0}'])
@example(lines=[b'{"question": "q", "choices": ["a", "\\udc00"], "answer": 0}'])
def test_mcq_file_any_lines(lines):
    from slayer_jax.evaluation.scoring import MCQ, load_mcq

    with scratch() as d:
        path = d / "q.jsonl"
        path.write_bytes(b"\n".join(lines))
        got, err = outcome(load_mcq, path)
        if err is not None:
            assert_one_line(err, path)
        else:
            assert got and all(isinstance(q, MCQ) and 0 <= q.answer < len(q.choices) for q in got)
            for q in got:
                (q.question + "".join(q.choices)).encode("utf-8")


@fuzz(60)
@given(lines=st.lists(doc_lines, min_size=1, max_size=3), suffix=st.sampled_from([".jsonl", ".txt"]))
@example(lines=[b"\xff\xfe"], suffix=".jsonl")
@example(lines=[b'{"text": "\\ud800"}'], suffix=".jsonl")
def test_eval_text_file_any_lines(lines, suffix):
    from slayer_jax.evaluation.scoring import load_text

    with scratch() as d:
        path = d / f"t{suffix}"
        path.write_bytes(b"\n".join(lines))
        got, err = outcome(load_text, path)
        if err is not None:
            assert_one_line(err, path)
        else:
            assert got and all(isinstance(t, str) for t in got)
            for t in got:
                t.encode("utf-8")


@fuzz(4)
@given(lines=st.lists(mcq_lines, min_size=1, max_size=2))
@example(lines=[b"\xff\xfe"])
@example(lines=[b'{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}'])
def test_mcq_file_through_eval(exported, lines):
    with scratch() as d:
        path = d / "q.jsonl"
        path.write_bytes(b"\n".join(lines))
        run_cli(["eval", str(exported), "--tasks", "mcq", "--mcq", str(path), "--out", str(d / "out.json"),
                 "--max-length", "64"], d / "out.json")


result_files = st.one_of(json_values, st.fixed_dictionaries(
    {"tasks": st.dictionaries(json_keys, st.dictionaries(json_keys, json_values, max_size=3) | json_values,
                              max_size=3) | json_values},
    optional={"name": json_values, "model": json_values, "role": json_values, "num_layers": json_values}))


@fuzz(80)
@given(result=result_files, raw=st.none() | bad_bytes())
@example(result={"tasks": {"ppl": {"ppl": float("nan")}}}, raw=None)
@example(result={"tasks": {"ppl": {"ppl": float("inf")}}}, raw=None)
@example(result={"tasks": {"ppl": {"ppl": 10 ** 400}}}, raw=None)
@example(result={"tasks": {"ppl": {}}, "model": 5}, raw=None)
@example(result={"tasks": {"ppl": {}}, "role": []}, raw=None)
@example(result={"tasks": {"ppl": {}}, "model": None}, raw=None)
@example(result={"tasks": {"a\nb": 3}}, raw=None)
@example(result=None, raw=DEEP.encode())
def test_result_file_through_compare(result, raw):
    with scratch() as d:
        path = d / "r.json"
        path.write_bytes(raw) if raw is not None else path.write_text(json_text(result))
        run_cli(["compare", str(path), "--out", str(d / "table.md")], d / "table.md")


# ============================================================================= lm-eval task files
@pytest.fixture(scope="module")
def harness_lm(exported):
    pytest.importorskip("lm_eval")
    from slayer_jax.evaluation.harness import SlayerLM

    return SlayerLM(pretrained=str(exported), batch_size=4, max_length=64, max_gen_toks=8)


TASK_FIELDS = ["task", "dataset_path", "dataset_kwargs", "output_type", "test_split", "doc_to_text",
               "doc_to_choice", "doc_to_target", "target_delimiter", "metric_list", "num_fewshot"]


@fuzz(4)
@given(edits=st.dictionaries(st.sampled_from([f for f in TASK_FIELDS[1:] if f != "doc_to_target"]), json_values,
                             max_size=1),
       rows=st.none() | st.lists(mcq_lines, min_size=1, max_size=2))
@example(edits={"dataset_path": "/nonexistent"}, rows=None)
@example(edits={"doc_to_choice": 5}, rows=None)
@example(edits={"doc_to_choice": None}, rows=None)
@example(edits={"output_type": None}, rows=None)
@example(edits={}, rows=[b"\xff\xfe"])
@example(edits={}, rows=None)
def test_harness_task_file_of_any_shape(harness_lm, edits, rows):
    """A task YAML (JSON is YAML) over a local JSONL, one field or the data replaced. (A file lm-eval's
    indexer skips, e.g. unparsable YAML or a dataset_path that is not a string, is reported as an
    unknown task, one line but without the file's name, after indexing every built-in lm-eval task,
    about 20 s a try: not fuzzed here.)"""
    from lm_eval.tasks import TaskManager

    from slayer_jax.evaluation.harness import run_harness

    with scratch() as d:
        data = d / "q.jsonl"
        data.write_bytes(b"\n".join(rows) if rows is not None else
                         b'{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}\n'
                         b'{"question": "3 + 3?", "choices": ["6", "7"], "answer": 0}\n')
        task = {"task": "fuzz_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "Question: {{question}}",
                "doc_to_choice": "{{choices}}", "doc_to_target": "answer", "metric_list": [{"metric": "acc"}],
                **edits}
        path = d / "fuzz_task.yaml"
        path.write_text(json_text(task))
        assume("fuzz_task" in TaskManager(include_path=[str(d)], include_defaults=False).all_tasks)  # see above
        got, err = outcome(run_harness, harness_lm, ["fuzz_task"], include_path=[str(d)], limit=2)
        if err is not None:
            assert_one_line(err, path, "fuzz_task")
        else:
            assert "fuzz_task" in got["results"]


def test_harness_task_whose_target_breaks_lm_evals_metrics(harness_lm, tmp_path):
    from slayer_jax.evaluation.harness import run_harness

    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}\n')
    task = {"task": "fuzz_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "Question: {{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": [], "metric_list": [{"metric": "acc"}]}
    (tmp_path / "fuzz_task.yaml").write_text(json_text(task))
    _, err = outcome(run_harness, harness_lm, ["fuzz_task"], include_path=[str(tmp_path)], limit=1)
    assert err is not None and err.args[0].startswith(str(tmp_path / "fuzz_task.yaml"))


# ============================================================================= prepared corpus, HumanEval, probe
MANIFEST_FIELDS = ["format", "format_version", "seq_len", "mode", "counts", "shards", "fingerprint", "tokenizer",
                   "separator_id"]


@pytest.fixture(scope="module")
def prepared(tok_dir, tmp_path_factory):
    """A real prepared corpus of the tiny model's tokenizer: its manifest is what the fuzz mutates."""
    d = tmp_path_factory.mktemp("fuzz_prep")
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 5}) for i in range(12)))
    assert main(["data", "prepare", str(d / "docs.jsonl"), "--tokenizer", str(tok_dir), "--out", str(d / "corpus"),
                 "--seq-len", "16", "--quiet"]) == 0
    return d / "corpus"


@fuzz(120)
@given(edits=st.dictionaries(st.sampled_from(MANIFEST_FIELDS), json_values, min_size=1, max_size=2),
       drop=st.sets(st.sampled_from(MANIFEST_FIELDS), max_size=1), shard=st.none() | bad_bytes(),
       raw=st.none() | bad_bytes())
@example(edits={"shards": [{"file": "../../etc/passwd", "records": 1}]}, drop=set(), shard=None, raw=None)
@example(edits={"counts": {"rows": "7"}}, drop=set(), shard=None, raw=None)
@example(edits={"tokenizer": []}, drop=set(), shard=None, raw=None)
@example(edits={"seq_len": 16}, drop=set(), shard=b"garbage", raw=None)
def test_prepared_corpus_manifest_and_shards_of_any_shape(prepared, edits, drop, shard, raw):
    from slayer_jax.data.prepare import PreparedCorpus

    with scratch() as d:
        corpus = d / "corpus"
        shutil.copytree(prepared, corpus)
        m = json.loads((corpus / "manifest.json").read_text())
        m = {k: v for k, v in {**m, **edits}.items() if k not in drop}
        (corpus / "manifest.json").write_bytes(raw if raw is not None else json_text(m).encode())
        if shard is not None:
            for f in corpus.glob("*.array_record"):
                f.write_bytes(shard)
        got, err = outcome(PreparedCorpus, corpus)
        if err is not None:
            assert_one_line(err, corpus)
        else:  # a readable corpus: the rows it serves have the manifest's shape
            rows = got.read(range(min(2, len(got))))
            assert all(v.shape == (min(2, len(got)), got.seq_len) for v in rows.values())
            assert got.stats.rows == len(got)


humaneval_lines = st.one_of(
    bad_bytes(), json_values.map(lambda v: json_text(v).encode()),
    st.fixed_dictionaries({}, optional={k: st.text(max_size=8) | json_values | st.sampled_from(NASTY_STRINGS)
                                        for k in ("task_id", "prompt", "test", "entry_point")}
                          ).map(lambda o: json_text(o).encode()))


@fuzz(120)
@given(lines=st.lists(humaneval_lines, min_size=1, max_size=3), gz=st.sampled_from([None, "ok", "cut"]))
@example(lines=[b'{"task_id": "t", "prompt": "p", "test": "t", "entry_point": "f(); import os"}'], gz=None)
@example(lines=[b'{"task_id": "t", "prompt": "p", "test": "t", "entry_point": "f"}'], gz="cut")
def test_humaneval_file_any_lines(lines, gz):
    import gzip

    from slayer_jax.evaluation.evaluate import load_humaneval

    with scratch() as d:
        body = b"\n".join(lines)
        path = d / ("HumanEval.jsonl.gz" if gz else "HumanEval.jsonl")
        if gz:
            body = gzip.compress(body)
            body = body[: len(body) // 2] if gz == "cut" else body
        path.write_bytes(body)
        got, err = outcome(load_humaneval, path)
        if err is not None:
            assert_one_line(err, path)
        else:
            for p in got:
                assert all(isinstance(p[k], str) for k in ("task_id", "prompt", "test"))
                assert p["entry_point"].isidentifier()


@fuzz(80)
@given(which=st.sampled_from(["heldout.jsonl", "train_questions.jsonl", "probe.json"]), content=bad_bytes()
       | json_values.map(lambda v: json_text(v).encode()))
@example(which="probe.json", content=DEEP.encode())
def test_probe_folder_any_file(which, content):
    from slayer_jax.evaluation.probe import load_probe, make_task, write_task

    with scratch() as d:
        folder = write_task(make_task(6, seed=0), d / "probe")
        (folder / which).write_bytes(content)
        got, err = outcome(load_probe, folder)
        if err is not None:
            assert_one_line(err, folder)
        else:
            assert got["heldout"] and got["train_questions"]
            assert got["manifest"] is None or isinstance(got["manifest"], dict)
