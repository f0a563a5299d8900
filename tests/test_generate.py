"""KV-cache decoding against full re-forwarding, sampling, stops, buckets, streaming; SmolLM2 vs transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import make_hf_model

from slayer_jax.generate import (
    TRACES,
    DecodeWeights,
    Generator,
    greedy_reforward,
    sample_logits,
)
from slayer_jax.io.hf import load_hf
from slayer_jax.modeling.layout import is_stacked, to_scan_layout
from slayer_jax.modeling.model import block, forward, self_attention

TOL = 1e-4
_fwd = jax.jit(forward, static_argnums=2)


def _load(variant, tmp_path, sharpen=20.0):
    hf = make_hf_model(variant)
    hf.save_pretrained(tmp_path / variant)
    params, cfg, _ = load_hf(tmp_path / variant, progress=False)
    # random weights give nearly flat logits; a larger final-norm scale spreads them, so greedy choices
    # are not decided by float noise (the reference below uses the very same params)
    params = dict(params, norm={"scale": params["norm"]["scale"] * sharpen})
    return params, cfg


def _reference_logits(params, cfg, prompt, new_tokens):
    """Teacher-forced logits of the full sequence, no cache: row j predicts new token j."""
    seq = np.asarray(list(prompt) + list(new_tokens), np.int32)[None]
    return np.asarray(_fwd(params, jnp.asarray(seq), cfg))[0, len(prompt) - 1:seq.shape[1] - 1]


@pytest.mark.parametrize("feature_major", [True, False], ids=["feature_major", "token_major"])
@pytest.mark.parametrize("variant", ["llama2", "gqa_kv1", "mistral_sliding_window", "llama31_rope_llama3_untied",
                                     "rope_linear_biases", "explicit_head_dim"])
def test_kv_cache_equals_reforward(variant, feature_major, tmp_path):
    """Batched, left-padded prompts of several lengths: same greedy tokens and logits (1e-4) as forward.

    Both decode-step layouts: feature-major (the CPU default: transposed kernels, [D, B] activations)
    and token-major (the flax block on the parameters as they are: the accelerator default)."""
    params, cfg = _load(variant, tmp_path)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 97, n)) for n in (1, 5, 11, 17)]  # 17 > mistral's window of 7
    gen = Generator(params, cfg, prompt_bucket=16, length_bucket=32, feature_major=feature_major)
    assert gen.feature_major == feature_major
    outs = gen.generate_ids(prompts, 14, stop_ids=(), return_logits=True)
    for p, o in zip(prompts, outs):
        assert len(o.tokens) == 14 and o.finish == "length"
        ref = _reference_logits(params, cfg, p, o.tokens)
        assert np.abs(o.logits - ref).max() < TOL, np.abs(o.logits - ref).max()
        top2 = np.sort(ref, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 10 * TOL  # the greedy choices below are not float noise
        assert o.tokens == ref.argmax(-1).tolist()
        assert o.tokens == greedy_reforward(params, cfg, p, 14, bucket=32)  # the no-cache decoder


def test_decode_layout_is_held_beside_the_params(tmp_path):
    """The CPU layout ("out_in": transposed kernels, weights-first matmuls) is built beside the params,
    which the Generator leaves as they are; one block gives the same output in both layouts."""
    params, cfg = _load("rope_linear_biases", tmp_path)  # untied head, biases
    keys = {k: sorted(v) if isinstance(v, dict) else len(v) for k, v in params.items()}
    gen = Generator(params, cfg, feature_major=True)
    assert gen.params is params and {k: sorted(v) if isinstance(v, dict) else len(v) for k, v in params.items()} == keys
    w = gen.weights
    assert w.kernels == "out_in" and DecodeWeights.build(params, "in_out").layers is params["layers"]
    assert np.array_equal(w.head_VxD, np.asarray(params["lm_head"]["kernel"]).T)
    for lw, lp in zip(w.layers, params["layers"]):
        assert lw["attn_norm"]["scale"] is lp["attn_norm"]["scale"] and lw["q_proj"]["bias"] is lp["q_proj"]["bias"]
        assert np.array_equal(lw["down_proj"]["kernel"], np.asarray(lp["down_proj"]["kernel"]).T)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.hidden_size))
    cos, sin = jnp.ones((2, 5, cfg.head_dim)), jnp.zeros((2, 5, cfg.head_dim))
    attend = self_attention(cfg, jnp.float32, jnp.tril(jnp.ones((2, 5, 5), bool)))
    y_in, _ = block(cfg, jnp.float32, params["layers"][0], x, cos, sin, attend)
    y_out, _ = block(cfg, jnp.float32, w.layers[0], x, cos, sin, attend, kernels="out_in")
    assert np.abs(np.asarray(y_in) - np.asarray(y_out)).max() < 1e-5


@pytest.mark.parametrize("feature_major", [True, False], ids=["feature_major", "token_major"])
def test_stacked_layers_decode_like_the_list(feature_major, tmp_path):
    """The one layer loop runs a stacked run of layers (the scan layout) in prefill and decode too."""
    params, cfg = _load("gqa_kv1", tmp_path)
    stacked = to_scan_layout(params)
    assert any(is_stacked(e) for e in stacked["layers"])
    prompts = [[5, 9, 13], [7, 3, 21, 40, 2, 8]]
    kw = {"prompt_bucket": 16, "length_bucket": 32, "feature_major": feature_major}
    want = Generator(params, cfg, **kw).generate_ids(prompts, 6, stop_ids=(), return_logits=True)
    got = Generator(stacked, cfg, **kw).generate_ids(prompts, 6, stop_ids=(), return_logits=True)
    for w, g in zip(want, got):
        assert g.tokens == w.tokens and np.abs(g.logits - w.logits).max() < TOL


def test_batch_equals_single_and_buckets_do_not_recompile(tmp_path):
    params, cfg = _load("gqa_kv2", tmp_path)
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(3, 97, n)) for n in (2, 7, 13)]
    gen = Generator(params, cfg, prompt_bucket=16, length_bucket=64)
    batch = gen.generate_ids(prompts, 9, stop_ids=())
    before = dict(TRACES)
    for p, b in zip(prompts, batch):  # batch 1 is a new bucket: first call traces, the rest must not
        assert gen.generate_ids([p], 9, stop_ids=())[0].tokens == b.tokens
    after_single = dict(TRACES)
    assert after_single["prefill"] - before["prefill"] <= 1  # (0 if an earlier test compiled this bucket)
    assert after_single["decode_chunk"] - before["decode_chunk"] <= 1
    # other prompt lengths, token counts, stop ids within the same (B, T, S) buckets: no new trace
    for n, m in ((1, 3), (16, 20), (9, 40)):
        gen.generate_ids([list(rng.randint(3, 97, n))] * 3, m, stop_ids=(5, 6))
    assert dict(TRACES) == after_single
    # sampling is one more (static) mode; its parameters and seeds are traced values
    gen.generate_ids(prompts, 5, temperature=0.7, top_k=5, seed=1)
    n_sampling = dict(TRACES)
    gen.generate_ids(prompts, 8, temperature=1.3, top_k=0, top_p=0.5, seed=2)
    assert dict(TRACES) == n_sampling
    # the cache of a bucket is allocated once and handed from call to call
    ptr = gen._caches[(4, 64)][0][0].unsafe_buffer_pointer()
    gen.generate_ids(prompts, 4)
    assert gen._caches[(4, 64)][0][0].unsafe_buffer_pointer() == ptr


@pytest.mark.parametrize("feature_major", [True, False], ids=["feature_major", "token_major"])
def test_bfloat16_decoding_tracks_float32(feature_major, tmp_path):
    """bf16 compute (fp32 weights) in both decode layouts: at every step, the bf16 logits stay within
    bf16 rounding (5% of the logit scale) of fp32 full re-forwarding of the same sequence."""
    params, cfg = _load("llama31_rope_llama3_untied", tmp_path)
    prompts = [[5, 9, 13], [7, 3, 21, 40, 2, 8]]
    gen = Generator(params, cfg, dtype="bfloat16", prompt_bucket=16, length_bucket=32, feature_major=feature_major)
    outs = gen.generate_ids(prompts, 8, stop_ids=(), return_logits=True)
    for p, o in zip(prompts, outs):
        ref = _reference_logits(params, cfg, p, o.tokens)  # fp32, no cache, on the bf16 run's tokens
        assert o.logits.shape == ref.shape and np.isfinite(o.logits).all()
        assert np.abs(o.logits - ref).max() < 0.05 * np.abs(ref).max(axis=-1).min()


def test_stop_tokens_end_rows_independently(tmp_path):
    params, cfg = _load("llama2", tmp_path)
    rng = np.random.RandomState(2)
    prompts = [list(rng.randint(3, 97, n)) for n in (4, 9)]
    gen = Generator(params, cfg, prompt_bucket=16, length_bucket=32)
    free = gen.generate_ids(prompts, 12, stop_ids=())
    stop = free[0].tokens[3]
    first = free[0].tokens.index(stop)
    outs = gen.generate_ids(prompts, 12, stop_ids=(stop,))
    assert outs[0].tokens == free[0].tokens[:first + 1] and outs[0].finish == "stop_token"
    if stop not in free[1].tokens:
        assert outs[1].tokens == free[1].tokens and outs[1].finish == "length"


def _ref_probs(logits, temperature, top_k, top_p):
    x = logits / temperature
    order = np.argsort(-x)
    keep = np.zeros_like(x, bool)
    keep[order[: top_k or len(x)]] = True
    p = np.exp(x - x[keep].max()) * keep
    p /= p.sum()
    ps = p[order]
    before = np.cumsum(ps) - ps
    keep2 = np.zeros_like(keep)
    keep2[order[(before < top_p) & (ps > 0)]] = True
    keep2[order[0]] = True
    q = p * keep2
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7),
                                                     (2.0, 4, 0.8)])
def test_sampling_distribution(temperature, top_k, top_p):
    """20k draws from one row of logits match softmax(l/T) restricted to top-k then top-p (transformers' order)."""
    logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0], np.float32)
    n = 20000
    lg = jnp.broadcast_to(jnp.asarray(logits), (n, len(logits)))
    toks = np.asarray(sample_logits(lg, jax.random.PRNGKey(0), temperature, jnp.int32(top_k), top_p, greedy=False,
                                    filtered=top_k > 0 or top_p < 1.0))
    freq = np.bincount(toks, minlength=len(logits)) / n
    want = _ref_probs(logits.astype(np.float64), temperature, top_k, top_p)
    assert np.all(freq[want == 0] == 0)
    assert np.abs(freq - want).max() < 0.015, (freq, want)


def test_sampling_edge_cases(tmp_path):
    params, cfg = _load("llama2", tmp_path, sharpen=1.0)
    prompts = [[5, 6, 7], [8, 9]]
    gen = Generator(params, cfg, prompt_bucket=16, length_bucket=32)
    greedy = [o.tokens for o in gen.generate_ids(prompts, 10, stop_ids=())]
    assert [o.tokens for o in gen.generate_ids(prompts, 10, stop_ids=(), temperature=1.0, top_k=1)] == greedy
    assert [o.tokens for o in gen.generate_ids(prompts, 10, stop_ids=(), temperature=1.0, top_p=1e-6)] == greedy
    a = [o.tokens for o in gen.generate_ids(prompts, 10, stop_ids=(), temperature=1.0, seed=3)]
    b = [o.tokens for o in gen.generate_ids(prompts, 10, stop_ids=(), temperature=1.0, seed=3)]
    c = [o.tokens for o in gen.generate_ids(prompts, 10, stop_ids=(), temperature=1.0, seed=4)]
    assert a == b and a != c and a != greedy


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    from tiny_tok import make_exported_model

    d = make_exported_model(tmp_path_factory.mktemp("tokmodel") / "m", std=0.3)
    return d, load_hf(d, progress=False)


def test_stop_strings_and_streaming(tok_model):
    _, (params, cfg, tok) = tok_model
    gen = Generator(params, cfg, tok, prompt_bucket=16, length_bucket=64)
    prompt = "Question: What is the capital of France?\nAnswer:"
    free = gen.generate([prompt], 40, stop_ids=())[0]
    text = free.text
    assert len(text) > 12
    stop = text[5:8]
    cut = gen.generate([prompt], 40, stop_ids=(), stop_strings=[stop])[0]
    assert cut.finish == "stop_string" and cut.text == text[:text.find(stop)]
    assert stop in tok.decode(cut.tokens) and stop not in tok.decode(cut.tokens[:-1])
    # streaming hands out the same text, in several pieces, with and without a stop string
    pieces = list(gen.stream(prompt, 40, stop_ids=()))
    assert "".join(pieces) == text and len(pieces) > 3
    assert "".join(gen.stream(prompt, 40, stop_ids=(), stop_strings=[stop], chunk=3)) == cut.text


def test_chat_template_and_cli(tok_model, capsys):
    d, (params, cfg, tok) = tok_model
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    gen = Generator(params, cfg, tok)
    ids = gen.encode("Hi there", chat=True)
    assert ids == list(tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
    from slayer_jax.cli import build_parser
    from slayer_jax.errors import SlayerError

    p = build_parser()
    a = p.parse_args(["generate", str(d), "--prompt", "Question: What is 2 plus 3?", "--max-new-tokens", "6"])
    assert a.fn(a) == 0
    out = capsys.readouterr()
    want = gen.generate(["Question: What is 2 plus 3?"], 6)[0]
    assert out.out == want.text + "\n" and f"[{len(want.tokens)} tokens" in out.err
    a = p.parse_args(["generate", str(d), "--prompt", "Hi", "--chat"])
    with pytest.raises(SlayerError, match="chat_template"):  # the saved tokenizer has no template
        a.fn(a)


# ----------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2_dir):
    """32 greedy tokens for several prompts (ours batched with padding; transformers one by one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    params, cfg, _ = load_hf(smollm2_dir, progress=False)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                   add_generation_prompt=True, tokenize=False)
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "Once upon a time, in a small village by the sea,", chat]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = Generator(params, cfg, tok).generate(prompts, 32)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        assert o.tokens == ref[0, len(p):].tolist(), (tok.decode(o.tokens), tok.decode(ref[0, len(p):]))
    assert sum(len(o.tokens) for o in ours) > 64  # not a vacuous comparison of empty outputs
