"""Bad input: one clear line naming the file and field, exit code 2, nothing written at OUT."""

import json
import os
import subprocess
import sys

import pytest
from tiny_hf import make_hf_model

from slayer_jax.cli import main


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "hf"
    make_hf_model("gqa_kv2").save_pretrained(d)
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _break_missing_config(d):
    (d / "config.json").unlink()


def _break_missing_weights(d):
    (d / "model.safetensors").unlink()


def _break_truncated_weights(d):
    p = d / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _break_model_type(d):
    _edit_config(d, model_type="gpt2")


def _break_shape(d):
    _edit_config(d, intermediate_size=128)


def _break_rope(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))


def _header(d, mutate):
    """Rewrite model.safetensors' JSON header (the 8-byte length, then JSON) through ``mutate``."""
    import struct

    p = d / "model.safetensors"
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    new = json.dumps(mutate(header)).encode()
    p.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def _break_header_list(d):
    _header(d, lambda h: list(h))


def _break_header_offsets(d):
    def drop(h):
        name = next(k for k in h if k != "__metadata__")
        del h[name]["data_offsets"]
        return h
    _header(d, drop)


def _break_config_bytes(d):
    (d / "config.json").write_bytes(b"\xff\xfe" + (d / "config.json").read_bytes())


CASES = {
    # readers fed the wrong JSON types: one line naming the file and field, never a traceback
    "header_is_a_list": (_break_header_list, ["model.safetensors", "safetensors header", "expected a JSON object"]),
    "header_no_data_offsets": (_break_header_offsets, ["model.safetensors", "field 'data_offsets' is 'missing'"]),
    "config_not_utf8": (_break_config_bytes, ["config.json", "not UTF-8"]),
    "hidden_size_abc": (lambda d: _edit_config(d, hidden_size="abc"), ["config.json", "'hidden_size' is 'abc'",
                                                                       "expected an integer"]),
    "tie_word_embeddings_str": (lambda d: _edit_config(d, tie_word_embeddings="yes"),
                                ["config.json", "'tie_word_embeddings'", "true or false"]),
    "eos_token_id_str": (lambda d: _edit_config(d, eos_token_id="</s>"), ["config.json", "'eos_token_id'"]),
    "missing_config": (_break_missing_config, ["config.json", "not found"]),
    "missing_weights": (_break_missing_weights, ["model.safetensors"]),
    "truncated_weights": (_break_truncated_weights, ["model.safetensors", "truncated"]),
    "model_type_gpt2": (_break_model_type, ["config.json", "'model_type'", "'gpt2'"]),
    "shape_mismatch": (_break_shape, ["model.safetensors", "mlp.gate_proj.weight", "[112, 64]", "[128, 64]"]),
    "unknown_rope_scaling": (_break_rope, ["config.json", "rope_scaling.rope_type", "'yarn'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("to", ["hf", "checkpoint"])
def test_bad_input_one_line_nonzero_nothing_written(case, to, good_dir, tmp_path, capsys):
    breaker, must_mention = CASES[case]
    src = _copy(good_dir, tmp_path / "src")
    breaker(src)
    out = tmp_path / "out"
    code = main(["convert", str(src), str(out), "--to", to])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("slayer: error: "), err
    for word in must_mention:
        assert word in err[0], (word, err[0])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temp dirs left behind


def test_null_max_position_embeddings_takes_the_default(good_dir, tmp_path):
    """JSON null where a number with a default goes is that default (transformers' own reading)."""
    from slayer_jax.modeling.config import load_config

    src = _copy(good_dir, tmp_path / "src")
    _edit_config(src, max_position_embeddings=None, rope_theta=None)
    cfg, _ = load_config(src)
    assert cfg.max_position_embeddings == 2048 and cfg.rope_theta == 10000.0


def test_existing_output_is_refused_and_kept(good_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(good_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_real_process_exit_code(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    r = subprocess.run([sys.executable, "-m", "slayer_jax.cli", "convert", str(src), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"slayer: error: {src}/config.json: file not found; expected an HF config.json"]


def test_export_interrupted_leaves_nothing(good_dir, tmp_path, monkeypatch):
    """A crash in the middle of writing tensors leaves neither OUT nor a temp dir."""
    from slayer_jax.io import hf as hf_io

    params, cfg, _ = hf_io.load_hf(good_dir, progress=False)
    calls = {"n": 0}
    real = hf_io.write_safetensors

    def dying_get_wrapper(path, specs, get, metadata=None):
        def get2(name):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return get(name)
        return real(path, specs, get2, metadata)

    monkeypatch.setattr(hf_io, "write_safetensors", dying_get_wrapper)
    with pytest.raises(KeyboardInterrupt):
        hf_io.save_hf(params, cfg, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["hf", "checkpoint"])
def test_a_dead_writers_staging_is_removed_a_live_ones_kept(good_dir, tmp_path, to):
    """A convert killed mid-write leaves `.OUT.tmp-HOST-PID`; the next write to OUT removes it (and
    a dead swap's `.old-`), but never a live process's, nor another host's."""
    from slayer_jax import storage

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    host = storage._HOST
    stale = [tmp_path / f".out.tmp-{host}-{dead.pid}", tmp_path / f".out.old-{host}-{dead.pid}"]
    kept = [tmp_path / f".out.tmp-{host}-{os.getppid()}",
            tmp_path / f".out.tmp-otherhost-{dead.pid}", tmp_path / f".other.tmp-{host}-{dead.pid}"]
    for d in stale + kept:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half a tensor")
    assert main(["convert", str(good_dir), str(out), "--to", to]) == 0
    assert not any(d.exists() for d in stale)
    assert all(d.exists() for d in kept)  # a live writer (our parent), another host's, another target's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [d.name for d in kept])


@pytest.mark.parametrize("to", ["hf", "checkpoint"])
def test_a_full_disk_mid_write_is_one_line_and_leaves_the_old_output(good_dir, tmp_path, capsys, monkeypatch, to):
    """ENOSPC in the middle of writing over an existing export (--overwrite): one line, exit 2, the
    old output as it was, no staging directory left."""
    import errno

    out = tmp_path / "out"
    assert main(["convert", str(good_dir), str(out), "--to", to]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk"))

    if to == "hf":
        from slayer_jax.io import hf as hf_io

        monkeypatch.setattr(hf_io, "write_safetensors", full)
    else:
        import orbax.checkpoint as ocp

        monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    assert main(["convert", str(good_dir), str(out), "--to", to, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slayer: error: {tmp_path / 'disk'}: No space left on device; nothing was replaced"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("verb,content,line", [
    ("surgery", [1, 2], "plan: expected an object with num_layers"),
    ("surgery", {"num_layers": 2, "expand_after": 5}, "plan: field 'expand_after' is 5; expected a list of layer numbers"),
    ("surgery", {"num_layers": "2"}, "plan: field 'num_layers' is '2'; expected a positive integer"),
    ("surgery", {"num_layers": 2, "identity": "yes"}, "plan: field 'identity' is 'yes'; expected true or false"),
    ("compare", [1], "expected a JSON object (a result written by `slayer eval`), got list"),
    ("compare", {"tasks": [1]}, "field 'tasks' is [1]; expected an object of task -> metrics"),
    ("compare", {"tasks": {"ppl": 3}}, "field 'tasks.ppl' is 3; expected an object of metric -> number"),
])
def test_json_of_the_wrong_shape_is_one_line(good_dir, tmp_path, capsys, verb, content, line):
    f = tmp_path / "in.json"
    f.write_text(json.dumps(content))
    argv = (["surgery", str(good_dir), str(tmp_path / "out"), "--plan", str(f)] if verb == "surgery"
            else ["compare", str(f)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"slayer: error: {f}: {line}"), err
    assert not (tmp_path / "out").exists()


# Run inside a private user+mount namespace (`unshare -rm`) over a tmpfs mounted at argv[1]: the
# real kernel's ENOSPC and EROFS, no mocks. Prints the CLI's exit codes and the files as JSON.
FS_DRIVER = r'''
import hashlib, json, os, sys
from pathlib import Path
mnt, src, to, mode = sys.argv[1:5]
out = Path(mnt) / "out"
from slayer_jax import storage
from slayer_jax.cli import main
def files(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file()}
res = {}
if mode == "readonly":
    res["rc"] = main(["convert", src, str(out), "--to", to])
else:
    res["first"] = main(["convert", src, str(out), "--to", to])
    res["before"] = files(out)
    if mode == "midwrite":  # skip the free-space check: the write itself meets the full disk
        storage.require_free_space = lambda *a, **k: None
    print("--- second", file=sys.stderr, flush=True)
    res["rc"] = main(["convert", src, str(out), "--to", to, "--overwrite"])
    res["after"] = files(out)
res["listing"] = sorted(os.listdir(mnt))
print("RESULT " + json.dumps(res), flush=True)
'''


def _on_a_tmpfs(tmp_path, good_dir, to, mode):
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux `unshare` to mount a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine allows no user+mount namespace: {probe.stderr.decode().strip()[:120]}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = "ro" if mode == "readonly" else "size=800k"  # the tiny model is 0.46 MB: one copy fits, two do not
    driver = tmp_path / "driver.py"
    driver.write_text(FS_DRIVER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o {opts} tmpfs "$0" && exec "$@"', str(mnt),
                        sys.executable, str(driver), str(mnt), str(good_dir), to, mode],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    err = r.stderr.split("--- second\n")[-1]
    return json.loads(lines[0][len("RESULT "):]), [ln for ln in err.splitlines() if "it/s]" not in ln], mnt


@pytest.mark.parametrize("to", ["hf", "checkpoint"])
def test_a_real_full_filesystem_is_refused_before_writing(good_dir, tmp_path, to):
    """A tmpfs with room for one copy: overwriting needs a second (the old output stays until the
    new one is complete), so the write is refused up front: one line, exit 2, the old output as it was."""
    res, err, mnt = _on_a_tmpfs(tmp_path, good_dir, to, "full")
    assert res["first"] == 0
    assert res["rc"] == 2
    assert len(err) == 1 and err[0].startswith(f"slayer: error: {mnt / 'out'}: the ") and \
        err[0].endswith("free; nothing was written") and "needs" in err[0], err
    assert res["after"] == res["before"] and res["before"]
    assert res["listing"] == ["out"]


@pytest.mark.parametrize("to", ["hf", "checkpoint"])
def test_a_disk_that_fills_mid_write_leaves_the_old_output(good_dir, tmp_path, to):
    """The free-space check skipped, the kernel's ENOSPC meets the writer itself: the old output as
    it was, no staging left, exit 2 and the last line names the target. (Orbax's background threads
    log their own tracebacks before it on the checkpoint path: tensorstore's, not ours.)"""
    res, err, mnt = _on_a_tmpfs(tmp_path, good_dir, to, "midwrite")
    assert res["first"] == 0
    assert res["rc"] == 2
    assert res["after"] == res["before"] and res["before"]
    assert res["listing"] == ["out"]
    assert err[-1].startswith(f"slayer: error: {mnt / 'out'}: ") and "No space left on device" in err[-1], err[-5:]
    if to == "hf":
        assert err == [f"slayer: error: {mnt / 'out'}: No space left on device; nothing was replaced"]


@pytest.mark.parametrize("to", ["hf", "checkpoint"])
def test_a_read_only_filesystem_is_one_line_and_leaves_nothing(good_dir, tmp_path, to):
    res, err, mnt = _on_a_tmpfs(tmp_path, good_dir, to, "readonly")
    assert res["rc"] == 2
    assert len(err) == 1 and err[0].startswith("slayer: error: ") and "Read-only file system" in err[0], err
    assert res["listing"] == []


def test_a_newline_in_a_path_keeps_the_error_on_one_line(tmp_path, capsys):
    bad = tmp_path / "two\nlines"
    assert main(["convert", str(bad), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two\\nlines" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_convert_killed_mid_write_then_run_again_succeeds_and_leaves_no_staging(smollm2_dir, tmp_path):
    """A real SIGKILL while `slayer convert` writes SmolLM2 (0.5 GB of float32 safetensors): the
    target is not there, the staging directory is; the same command again succeeds and removes it."""
    import signal
    import time

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "slayer_jax.cli", "convert", str(smollm2_dir), str(out), "--to", "hf",
            "--dtype", "float32"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    victim = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = []
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if staged and any(f.stat().st_size > 0 for f in staged[0].iterdir()):  # tensors are being written
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert staged and staged[0].exists() and not out.exists(), "the kill must land while the export is staged"

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").stat().st_size > 100 * 2**20
