"""Trust nothing on disk (issue 11): contained paths, checksums on every read path, one-line errors.

Every case runs the real command line (`llmflash.cli.main`, in process unless a signal or a
separate process is the point) on a real converted tiny model, and asserts the one-line
`llmflash: error: ...`, exit code 2, and that nothing outside the model directory changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from llmflash.cli import main
from llmflash.conversion.writer import convert
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.format.schema import seal

FAST = dict(max_new_tokens="3")


# -- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "llama-relu"
    tiny_models.build("llama-relu", d)
    return d


@pytest.fixture(scope="module")
def pristine(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flash") / "model"
    convert(hf_dir, out, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("text") / "calib.txt"
    text.write_text(" ".join(tiny_models.TRAIN_TEXT) * 20)
    return text


@pytest.fixture()
def env(pristine, tmp_path):
    """A copy of the model in tmp/work/model, and tmp/outside holding files an attacker targets."""
    model = tmp_path / "work" / "model"
    shutil.copytree(pristine, model)
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    shutil.copy(pristine / "ffn.bin", outside / "victim" / "ffn.bin")
    (outside / "secret.txt").write_text("do not touch\n")
    shutil.copy(pristine / "tokenizer.json", outside / "tokenizer.json")  # a symlink's target
    (outside / "sparsity").mkdir()
    before = snapshot(tmp_path, exclude=model)
    yield model, outside
    assert snapshot(tmp_path, exclude=model) == before, "something outside the model directory changed"


def snapshot(root: Path, exclude: Path) -> dict:
    """Every path under root except `exclude`'s subtree: kind, size, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == exclude or exclude in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == exclude:
                continue
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, *args, match: str = "") -> str:
    """Run the CLI, assert exit 2 and exactly one stderr line `llmflash: error: ...` containing match."""
    code, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("llmflash: note")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("llmflash: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], (match, lines[0])
    return lines[0]


def generate(model: Path, *extra: str) -> list[str]:
    return ["generate", model, "--ids", "1,5,6,7", "--max-new-tokens", FAST["max_new_tokens"], *extra]


def flash_args(mode: str) -> list[str]:
    if mode in ("flash", "hybrid"):
        return ["--mode", mode, "--memory", "4MiB", *(["--sparsity", "exact"] if mode == "flash" else [])]
    return ["--mode", mode]


def edit_manifest(model: Path, change, reseal: bool = True) -> dict:
    m = json.loads((model / "manifest.json").read_text())
    change(m)
    (model / "manifest.json").write_text(json.dumps(seal(m) if reseal else m, indent=1))
    return m


def flip(path: Path, offset: int, bit: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


# -- 1. paths stay inside the model directory --------------------------------------------------------
def test_ffn_file_outside_the_model_is_refused_and_reorder_deletes_nothing(env, capsys, calib_text):
    model, outside = env

    def escape(m):
        m["files"]["../../outside/victim/ffn.bin"] = m["files"].pop("ffn.bin")
        m["ffn"]["file"] = "../../outside/victim/ffn.bin"

    edit_manifest(model, escape)
    text = calib_text
    one_line_error(capsys, *generate(model), match="not a plain file name inside the model directory")
    one_line_error(capsys, "reorder", model, "--text", text, match="not a plain file name")
    code, _, err = cli(capsys, "verify", model)
    assert code == 1 and "not a plain file name" in err  # verify: a damaged model is exit 1
    assert (outside / "victim" / "ffn.bin").exists()


@pytest.mark.parametrize("name", ["/etc/passwd", "..", ".", ".hidden", "a/b", "tok\\json", "", "x" * 300])
def test_tokenizer_name_must_be_plain(env, capsys, name):
    model, _ = env

    def rename(m):
        m["files"][name] = m["files"].pop("tokenizer.json")
        m["tokenizer"]["file"] = name

    edit_manifest(model, rename)
    one_line_error(capsys, *generate(model), match="is not a plain file name")


def test_symlink_leaving_the_model_directory_is_refused(env, capsys):
    model, outside = env
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    one_line_error(capsys, *generate(model), match="outside the model directory")


def test_symlink_inside_the_model_directory_is_allowed(env, capsys):
    model, _ = env
    (model / "tokenizer.json").rename(model / "tok-real.json")
    (model / "tokenizer.json").symlink_to("tok-real.json")
    code, out, err = cli(capsys, *generate(model, "--json"))
    assert code == 0, err


def test_sparsity_folder_symlinked_outside_is_refused(env, capsys):
    model, outside = env
    (model / "sparsity").symlink_to(outside / "sparsity")
    one_line_error(capsys, *generate(model, "--mode", "dense", "--sparsity", "predictor"),
                   match="outside the model directory")


def test_model_path_that_is_a_file(env, capsys):
    model, _ = env
    one_line_error(capsys, *generate(model / "ffn.bin"), match="is a file, not a directory")


# -- 2. corruption on every read path ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dense", "flash", "naive", "hybrid", "mmap"])
def test_corruption_message_names_the_layer(env, capsys, mode):
    model, _ = env
    layer1 = FlashModelDir(model).layers[1]
    flip(model / "ffn.bin", layer1.offset + 7)
    line = one_line_error(capsys, *generate(model, *flash_args(mode)), match="checksum mismatch")
    assert "ffn.bin layer 1" in line


def test_flash_scattered_reads_are_checked_per_bundle(env):
    """Bundles that change on disk under a running model (after its layers were read and checked
    whole once) are caught by the per-bundle digests of flash's scattered reads."""
    from llmflash.runtime.engine import Engine
    from llmflash.runtime.modes import RunOptions, ffn_factory

    model, _ = env
    engine = Engine(model, ffn=ffn_factory(RunOptions(mode="flash", memory="4MiB", sparsity="exact")))
    m = engine.dir
    region, nbytes = m.layers[0], m.bundle.nbytes
    with open(model / "ffn.bin", "r+b") as f:  # every bundle of layer 0, in its down part
        for slot in range(region.neurons):
            f.seek(region.offset + slot * nbytes + nbytes - 8)
            f.write(b"\xff\xff\xff\x7f")
    with pytest.raises(LLMFlashError, match=r"checksum mismatch: .*ffn.bin layer 0, bundle slot \d+ \(neuron \d+\)"):
        engine.generate([1], 3)  # one token: straight to the decode path's scattered reads


def test_scattered_check_can_be_turned_off(env, capsys, monkeypatch):
    """LLMFLASH_VERIFY_READS=0 (for measuring its cost): the same corruption then goes unnoticed
    by the per-bundle check (the run may still fail later, but not on a bundle checksum)."""
    model, _ = env
    m = FlashModelDir(model)
    region, nbytes = m.layers[0], m.bundle.nbytes
    for slot in range(region.neurons):
        flip(model / "ffn.bin", region.offset + slot * nbytes + nbytes - 8, bit=0x01)
    monkeypatch.setenv("LLMFLASH_VERIFY_READS", "0")
    code, _, err = cli(capsys, "generate", model, "--ids", "1", "--max-new-tokens", "2", "--json",
                       *flash_args("flash"))
    assert "bundle slot" not in err


@pytest.mark.parametrize("mode", ["dense", "naive", "mmap", "flash"])
def test_nan_in_weights_is_an_error_naming_the_layer_not_token_0(env, capsys, mode):
    """NaN written into layer 1 with every checksum recomputed (the bytes 'verify'): the FFN's
    non-finite output is reported, never argmax'ed into token id 0."""
    model, _ = env
    m = FlashModelDir(model)
    region = m.layers[1]
    data = bytearray((model / "ffn.bin").read_bytes())
    nan = np.full(region.nbytes // 4, np.nan, dtype=np.float32).tobytes()
    data[region.offset:region.offset + region.nbytes] = nan
    (model / "ffn.bin").write_bytes(bytes(data))
    from llmflash.format.integrity import write_bundle_checks

    def reseal(man):
        man["ffn"]["layers"][1]["sha256"] = hashlib.sha256(nan).hexdigest()
        man["files"]["ffn.bin"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        _, entry, _ = write_bundle_checks(model, "ffn.bin", man["ffn"]["layers"], m.bundle.nbytes)
        man["files"]["ffn.xxh3"] = entry

    edit_manifest(model, reseal)
    one_line_error(capsys, *generate(model, *flash_args(mode)), match="layer 1's FFN produced non-finite values")


def test_same_size_tokenizer_edit_is_caught(env, capsys):
    model, _ = env
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    data = json.dumps(tok).encode()
    original = (model / "tokenizer.json").read_bytes()
    data = data[:len(original)].ljust(len(original), b" ")  # same size, as an attacker would keep it
    (model / "tokenizer.json").write_bytes(data)
    assert (model / "tokenizer.json").stat().st_size == len(original)
    one_line_error(capsys, "generate", model, "hello", "--max-new-tokens", "2",
                   match="checksum mismatch: " + str(model / "tokenizer.json"))


def test_flipped_manifest_byte_is_corruption(env, capsys):
    model, _ = env
    raw = bytearray((model / "manifest.json").read_bytes())
    at = raw.index(b'"file": "ffn.bin"') + len(b'"file": "ff')
    raw[at] ^= 0x01  # ffn.bin -> fgn.bin
    (model / "manifest.json").write_bytes(bytes(raw))
    one_line_error(capsys, *generate(model), match="corrupted manifest")


def test_chat_template_is_covered_by_the_manifest_checksum(env, capsys):
    model, _ = env
    edit_manifest(model, lambda m: m["tokenizer"].update(chat_template="{{ 'evil' }}"), reseal=False)
    one_line_error(capsys, "generate", model, "hi", "--chat", "--max-new-tokens", "1", match="checksum mismatch")


def test_damaged_checks_file(env, capsys):
    model, _ = env
    flip(model / "ffn.xxh3", 3)
    one_line_error(capsys, *generate(model, *flash_args("flash")), match="ffn.xxh3")


def test_version_1_models_still_open(env, capsys):
    """Models converted before this change (format version 1, no checksum fields) still run."""
    model, _ = env
    code, out, _ = cli(capsys, *generate(model, "--json"))
    expected = json.loads(out)["token_ids"]
    m = json.loads((model / "manifest.json").read_text())
    del m["manifest_sha256"], m["ffn"]["checks"], m["files"]["ffn.xxh3"]
    m["format_version"] = 1
    (model / "manifest.json").write_text(json.dumps(m))
    (model / "ffn.xxh3").unlink()
    code, out, err = cli(capsys, *generate(model, "--json", *flash_args("flash")))
    assert code == 0, err
    assert json.loads(out)["token_ids"] == expected
    m["checksum_like"] = "x"  # unknown field in a version-1 manifest: possibly a flipped key
    (model / "manifest.json").write_text(json.dumps(m))
    one_line_error(capsys, *generate(model), match="not a field of a version-1 manifest")


# -- 3. malformed manifests, each a one-line error ----------------------------------------------------
def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        target = m
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value
    return change


MALFORMED = {
    "negative offset": (_set("ffn.layers.0.offset", -4096), "ffn.layers[0].offset"),
    "huge layer bytes": (_set("ffn.layers.1.bytes", 2 ** 62), "ffn.layers[1].bytes"),
    "huge neuron count": (_set("ffn.layers.0.neurons", 10 ** 12), "ffn.layers[0].neurons"),
    "huge intermediate size": (_set("config.intermediate_size", 2 ** 40), "config.intermediate_size"),
    "empty files map": (_set("files", {}), "files is empty"),
    "unknown bundle dtype": (_set("ffn.bundle.dtype", "int3"), "ffn.bundle"),
    "format_version as a string": (_set("format_version", "1"), "format_version must be an integer"),
    "format_version too new": (_set("format_version", 9), "format version 9"),
    "hidden_size -5": (_set("config.hidden_size", -5), "config.hidden_size"),
    "dtype int3": (_set("dtype", "int3"), "dtype is 'int3'"),
    "dtype int8 over float bundles": (_set("dtype", "int8"), "int8"),
    "hidden_act unknown": (_set("config.hidden_act", "gelu_pytorch"), "config.hidden_act"),
    "num_kv_heads not dividing": (_set("config.num_kv_heads", 3), "config.num_kv_heads"),
    "eos id outside vocab": (_set("config.eos_token_id", [10 ** 6]), "config.eos_token_id[0]"),
    "layers not a list": (_set("ffn.layers", {"0": 1}), "ffn.layers must be a list"),
    "order not a permutation": (_set("ffn.layers.0.order", [0] * 160), "not a permutation"),
    "files entry not an object": (_set("files.ffn.bin", 5), "files['ffn.bin'] must be an object"),
    "sha256 not hex": (_set("files.resident.safetensors.sha256", "zz"), "sha256 hex digest"),
    "config not an object": (_set("config", [1, 2]), "config must be an object"),
    "window_union NaN": (_set("ffn.layers.0.window_union", [float("nan")]), "NaN is not allowed"),
    "window_union negative": (_set("ffn.layers.0.window_union", [-1.0]), "window_union[0]"),
    "tokenizer file not listed": (_set("tokenizer.file", "other.json"), "not listed in files"),
    "size disagrees with the file": (_set("files.resident.safetensors.bytes", 12345), "manifest says 12345"),
    "config field unknown": (_set("config.experts", 8), "config.experts"),
    "num_heads changed": (_set("config.num_heads", 8), "shape"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest(env, capsys, case):
    model, _ = env
    change, match = MALFORMED[case]
    # "files.ffn.bin" style keys contain dots: address them directly
    if case == "files entry not an object":
        change = lambda m: m["files"].__setitem__("ffn.bin", 5)  # noqa: E731
    if case == "sha256 not hex":
        change = lambda m: m["files"]["resident.safetensors"].__setitem__("sha256", "zz")  # noqa: E731
    if case == "size disagrees with the file":
        change = lambda m: m["files"]["resident.safetensors"].__setitem__("bytes", 12345)  # noqa: E731
    edit_manifest(model, change)
    one_line_error(capsys, *generate(model), match=match)


@pytest.mark.parametrize("raw, match", [
    (b"\x00\xff\xfe binary", "corrupted manifest"),
    (b"[1, 2, 3]", "top level must be an object"),
    (b'{"format": "llmflash", "format_version": NaN}', "NaN is not allowed"),
    (b"[" * 100000 + b"]" * 100000, "corrupted manifest"),
    (b"", "corrupted manifest"),
    (b'"llmflash"', "top level must be an object"),
], ids=["binary", "list", "nan", "deep", "empty", "string"])
def test_unparseable_manifest(env, capsys, raw, match):
    model, _ = env
    (model / "manifest.json").write_bytes(raw)
    one_line_error(capsys, *generate(model), match=match)


# -- 3b. verify's exit codes agree with docs/FORMAT.md -----------------------------------------------
def test_verify_exit_codes(env, capsys, tmp_path):
    model, _ = env
    assert cli(capsys, "verify", model)[0] == 0
    flip(model / "ffn.bin", 5000)
    code, _, err = cli(capsys, "verify", model)
    assert code == 1 and "checksum mismatch" in err and "layer" in err
    os.truncate(model / "ffn.bin", (model / "ffn.bin").stat().st_size - 4096)
    code, _, err = cli(capsys, "verify", model)
    assert code == 1 and "truncated file" in err  # was exit 2 before (docs say 1)
    one_line_error(capsys, "verify", tmp_path / "work" / "no-such-model", match="does not exist")


# -- 3c. one error path: OSError, sampling, prompts, budgets ------------------------------------------
def _tmpfs(where: Path, size: str, readonly: bool = False) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.decode().strip()})")
    return where


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=False)


def test_disk_full_during_convert(hf_dir, capsys, tmp_path):
    disk = _tmpfs(tmp_path / "small", "96k")
    try:
        line = one_line_error(capsys, "convert", hf_dir, disk / "model", "--quiet", "--dtype", "float32",
                              match="No space left on device [ENOSPC]")
        assert list(disk.iterdir()) == [], "the partial conversion was left behind"
        del line
    finally:
        _umount(disk)


def test_read_only_destination(hf_dir, capsys, tmp_path):
    disk = _tmpfs(tmp_path / "ro", "1m", readonly=True)
    try:
        one_line_error(capsys, "convert", hf_dir, disk / "model", "--quiet", match="[EROFS]")
    finally:
        _umount(disk)


def test_forbidden_destination(hf_dir):
    """EACCES needs a user without root's override: the conversion runs as `nobody` (setpriv)."""
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as another user")
    base = Path(tempfile.mkdtemp(prefix="llmflash-eacces-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = base / "hf"
        shutil.copytree(hf_dir, src)
        for p in [src, *src.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o755)  # root's: nobody may not create anything in it
        proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                               sys.executable, "-m", "llmflash", "convert", str(src), str(locked / "model"),
                               "--quiet"], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("llmflash: error: Permission denied [EACCES]: ") and str(locked) in lines[0]
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_destination_under_a_file(hf_dir, capsys, tmp_path):
    (tmp_path / "plain").write_text("x")
    one_line_error(capsys, "convert", hf_dir, tmp_path / "plain" / "model", "--quiet", match="[ENOTDIR]")


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"),
                                         ("--temperature", "inf"), ("--top-p", "0"), ("--top-p", "2"),
                                         ("--top-p", "nan"), ("--top-p", "-0.5")])
def test_bad_sampling_values(env, capsys, flag, value):
    model, _ = env
    one_line_error(capsys, *generate(model, flag, value), match=flag.lstrip("-").replace("-", "_"))


def test_sampling_checked_in_the_library_too(pristine):
    from llmflash.runtime.engine import Engine

    engine = Engine(pristine)
    for t, p in [(-1, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, 1.5)]:
        with pytest.raises(LLMFlashError):
            engine.generate([1, 5], 2, temperature=t, top_p=p)


def test_invalid_utf8_prompt(env, capsys):
    model, _ = env
    one_line_error(capsys, "generate", model, "caf\udce9", "--max-new-tokens", "1", match="not valid UTF-8")


def test_invalid_utf8_prompt_from_a_real_shell(env):
    model, _ = env
    proc = subprocess.run([sys.executable, "-m", "llmflash", "generate", str(model).encode(), b"caf\xe9",
                           b"--max-new-tokens", b"1"], capture_output=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.decode().strip().startswith("llmflash: error:")
    assert b"not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


def test_budget_refused_before_weights_load(env, capsys):
    """The resident file is corrupted: had weights been loaded first, the error would be its
    checksum. The budget error proves the plan is checked before anything is read."""
    model, _ = env
    flip(model / "resident.safetensors", (model / "resident.safetensors").stat().st_size - 10)
    for mode in ("flash", "hybrid"):
        one_line_error(capsys, *generate(model, "--mode", mode, "--memory", "1%", "--sparsity", "exact"),
                       match="cannot hold the resident part")


def test_debug_shows_the_traceback(env):
    model, _ = env
    for extra_env, args in [({}, ["--debug"]), ({"LLMFLASH_DEBUG": "1"}, [])]:
        proc = subprocess.run([sys.executable, "-m", "llmflash", *args, "generate", str(model / "nope"), "x"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **extra_env})
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "does not exist" in proc.stderr


# -- 4. leftovers of killed commands -----------------------------------------------------------------
def _dead_pid() -> int:
    """The pid of a process that has exited (killed with SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def _medium_hf_model(d: Path) -> None:
    """A random Llama of ~50 MB float32, so a conversion takes long enough to be interrupted."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)


@pytest.fixture(scope="module")
def medium_hf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("medium") / "hf"
    _medium_hf_model(d)
    return d


def _start_convert_and_wait(src: Path, dst: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-m", "llmflash", "convert", str(src), str(dst),
                             "--dtype", "float32", "--quiet"], stderr=subprocess.PIPE)
    tmp_dir = dst.parent / f".{dst.name}.tmp-{proc.pid}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ffn = tmp_dir / "ffn.bin"
        if ffn.exists() and ffn.stat().st_size > 4096:
            return proc, tmp_dir
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.kill()
    pytest.fail("the conversion never started writing bundles")


def test_killed_convert_leftovers_removed_by_next_run(medium_hf, tmp_path):
    dst = tmp_path / "out"
    proc, tmp_dir = _start_convert_and_wait(medium_hf, dst)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_dir.exists() and not dst.exists()
    subprocess.run([sys.executable, "-m", "llmflash", "convert", str(medium_hf), str(dst), "--quiet"],
                   check=True, timeout=300)
    assert not tmp_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_cleans_up_at_once(medium_hf, tmp_path):
    dst = tmp_path / "out"
    proc, tmp_dir = _start_convert_and_wait(medium_hf, dst)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert b"llmflash: terminated" in err and b"Traceback" not in err
    assert not tmp_dir.exists() and not dst.exists()


def test_killed_reorder_leftovers_removed(env, capsys, calib_text):
    model, _ = env
    dead, live = _dead_pid(), os.getpid()
    stale = [model / f".ffn.bin.tmp-{dead}", model / f".manifest.json.tmp-{dead}",
             model / f".ffn.xxh3.tmp-{dead}", model / "ffn-0123456789ab.bin"]
    for p in stale:
        p.write_bytes(b"\0" * 8192)
    kept = model / f".ffn.bin.tmp-{os.getppid()}"  # a live process's work is never removed
    kept.write_bytes(b"x")
    code, _, err = cli(capsys, "reorder", model, "--text", calib_text)
    assert code == 0, err
    assert not any(p.exists() for p in stale) and kept.exists()
    kept.unlink()
    names = sorted(p.name for p in model.iterdir())
    m = FlashModelDir(model)
    assert names == sorted(list(m.files) + ["manifest.json"])
    assert m.verify() == [] and m.manifest["ffn"]["checks"]["file"] in m.files
    assert cli(capsys, *generate(model, *flash_args("flash")))[0] == 0
    del live


def test_calibrate_leftovers_removed_and_statistics_resumed(env, calib_text):
    from llmflash.tools.calibrate import calibrate

    model, _ = env
    text = calib_text
    logs: list[str] = []
    calibrate(model, text, tokens=256, window=64, train=False, progress=False, log=logs.append)
    dead = _dead_pid()
    stale = model / "sparsity" / f".stats.safetensors.tmp-{dead}"
    stale.write_bytes(b"partial")
    logs.clear()
    calibrate(model, text, tokens=256, window=64, train=False, progress=False, log=logs.append)
    assert any("reusing the statistics" in line for line in logs), logs
    assert not stale.exists()


def test_relufy_checkpoints_are_safetensors_and_resume(tmp_path):
    """Kill relufy after a checkpoint, run it again: it resumes from safetensors + JSON (no
    pickle), and the killed run's staging directory is removed."""
    work = tmp_path / "work"
    src = work / "silu"
    convert(tiny_models_dir(tmp_path), src, dtype="float32", progress=False)
    text = work / "train.txt"
    text.write_text(" ".join(tiny_models.TRAIN_TEXT) * 60)
    dst = work / "relu"
    dead = _dead_pid()
    (work / f".relu.relufy-hf-{dead}").mkdir()
    args = [sys.executable, "-m", "llmflash", "relufy", str(src), str(dst), "--text", str(text), "--steps", "60",
            "--checkpoint-every", "1", "--seq-len", "32", "--batch", "1", "--eval-tokens", "64", "--quiet"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    ckpt = work / ".relu.relufy-ckpt.json"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stderr.read()
    state = json.loads(ckpt.read_text())
    assert (work / state["tensors_file"]).exists() and state["tensors_file"].endswith(".safetensors")
    assert 1 <= state["step"] < 60
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {state['step']}" in resumed.stderr or "resuming from" in resumed.stderr
    assert FlashModelDir(dst).config.hidden_act == "relu"
    assert not ckpt.exists() and not list(work.glob(".relu.relufy-ckpt*"))
    assert not (work / f".relu.relufy-hf-{dead}").exists()
    assert not [p for p in work.iterdir() if ".tmp" in p.name or "relufy-hf" in p.name]


def tiny_models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "work" / "hf-silu"
    if not d.exists():
        tiny_models.build("llama-gqa", d)
    return d


def test_no_pickle_anywhere():
    root = Path(__file__).resolve().parents[1] / "llmflash"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "weights_only=False" not in text, path


# -- 5. fuzz: random manifest and config mutations never end in a traceback ----------------------------
def _mutation_paths(x, pre=()):
    if pre:
        yield pre
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _mutation_paths(v, pre + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x[:3]):
            yield from _mutation_paths(v, pre + (i,))


@pytest.fixture(scope="module")
def fuzz_dir(pristine, tmp_path_factory):
    """The model's data files hard-linked into a fresh directory: each example rewrites only
    manifest.json (data files are never written by the code under test)."""
    d = tmp_path_factory.mktemp("fuzz") / "model"
    d.mkdir()
    for p in pristine.iterdir():
        if p.name != "manifest.json":
            os.link(p, d / p.name)
    return d


def test_fuzz_manifest_and_config(pristine, fuzz_dir):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from llmflash.runtime.engine import Engine
    from llmflash.runtime.modes import RunOptions, ffn_factory

    base = json.loads((pristine / "manifest.json").read_text())
    paths = list(_mutation_paths(base))
    config_paths = [p for p in paths if p[0] == "config"]
    values = st.one_of(st.integers(-2 ** 63, 2 ** 63), st.floats(allow_nan=False), st.text(max_size=8),
                       st.none(), st.booleans(), st.lists(st.integers(-3, 400), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                       st.sampled_from(["float16", "int8", "relu", "silu", "../x", "ffn.bin", "llama", "opt"]))
    mutation = st.tuples(st.sampled_from(paths + config_paths * 2), st.one_of(values, st.just("<delete>")))
    outcomes = {"ok": 0, "error": 0}

    @settings(max_examples=int(os.environ.get("LLMFLASH_FUZZ_EXAMPLES", 300)), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=3), st.sampled_from([True, True, True, False]),
           st.sampled_from(["dense", "dense", "naive", "flash", "mmap"]), st.integers(0, 2 ** 16))
    def case(mutations, reseal, mode, flip_at):
        m = json.loads(json.dumps(base))
        for path, value in mutations:
            target = m
            try:
                for key in path[:-1]:
                    target = target[key]
                if value == "<delete>":
                    del target[path[-1]]
                else:
                    target[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass
        raw = json.dumps(seal(m) if reseal else m).encode()
        if not reseal and flip_at % 3 == 0:
            b = bytearray(raw)
            b[flip_at % len(b)] ^= 1 << (flip_at % 8)
            raw = bytes(b)
        (fuzz_dir / "manifest.json").write_bytes(raw)
        try:
            options = RunOptions(mode=mode, memory="4MiB", sparsity="exact" if mode == "flash" else None)
            engine = Engine(fuzz_dir, ffn=ffn_factory(options))
            result = engine.generate([1, 5, 6], 2)
            assert all(0 <= t < engine.config.vocab_size for t in result.token_ids)
            outcomes["ok"] += 1
        except LLMFlashError as exc:
            assert "\n" not in str(exc) and str(exc)
            outcomes["error"] += 1

    case()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes
