"""The manifest's schema, checked field by field before anything on disk is trusted.

Everything in a model directory is input: a flipped bit, a half-copied directory or a crafted
manifest must end in one `LLMFlashError` naming the file and the field, never in a traceback, a
read outside the directory or a huge allocation. `validate_manifest` checks

* types and ranges of every field the runtime reads (ints are ints, not strings or booleans;
  sizes positive and bounded; dtypes and activations among the supported ones);
* consistency: the bundle layout is exactly the one the config implies, every layer region lies
  inside the FFN file as recorded, regions do not overlap, slot orders are permutations;
* containment: every file name is a plain name (no separator, no `..`, no leading dot) and
  resolves, symlinks followed, to a regular file inside the model directory;
* integrity of the manifest itself (format version 2): `manifest_sha256` is the sha256 of the
  manifest's canonical JSON form without that field, so a flipped byte anywhere in it is reported
  as corruption. Version 1 manifests (written before the field existed) are still read; having no
  checksum, they are held to the strict schema: an unknown field is refused as corruption.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import fields
from pathlib import Path
from typing import Any

from llmflash.models import BY_FAMILY
from llmflash.models.config import ACTIVATIONS, ModelConfig
from llmflash.errors import LLMFlashError

CHECKSUM_FIELD = "manifest_sha256"
READABLE_VERSIONS = (1, 2)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "int8", "int4", "int4m")  # int: format/quantized.py
BUNDLE_CHECK_ALGORITHMS = ("xxh3_64",)

# Bounds far above any real model, far below what would exhaust memory when allocated.
MAX_DIM = 1 << 18  # hidden size, FFN neurons, head dim
MAX_VOCAB = 1 << 23
MAX_LAYERS = 1 << 12
MAX_HEADS = 1 << 12
MAX_POSITIONS = 1 << 24
MAX_FILE_BYTES = 1 << 50

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Top-level fields a version-1 manifest may have (the writer's and reorder's).
_V1_FIELDS = {"format", "format_version", "created_by", "source", "dtype", "config", "files", "ffn",
              "tokenizer", "conversion_seconds"}
_FFN_FIELDS = {"file", "alignment", "bundle", "layers", "layout", "checks"}
_LAYER_FIELDS = {"offset", "neurons", "bytes", "sha256", "order", "hot", "window_union"}


def canonical_bytes(manifest: dict) -> bytes:
    """The bytes `manifest_sha256` covers: sorted keys, no whitespace, the field itself left out."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict) -> dict:
    """The manifest with its own checksum (every writer calls this last)."""
    out = {k: v for k, v in manifest.items() if k != CHECKSUM_FIELD}
    out[CHECKSUM_FIELD] = hashlib.sha256(canonical_bytes(out)).hexdigest()
    return out


def manifest_text(manifest: dict) -> str:
    return json.dumps(seal(manifest), indent=1)


class _Check:
    """Field checks that raise one error naming the manifest and the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str) -> LLMFlashError:
        return LLMFlashError(f"corrupted manifest {self.where}: {field} {problem}")

    def dict(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, got {_kind(value)}")
        return value

    def has(self, d: dict, key: str, field: str) -> Any:
        if key not in d:
            raise self.fail(f"{field}.{key}" if field else key, "is missing")
        return d[key]

    def int(self, value: Any, field: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"must be an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(field, f"is {value}, outside {lo}..{hi}")
        return value

    def num(self, value: Any, field: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.fail(field, f"must be a number, got {_kind(value)}")
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            raise self.fail(field, f"is {value}, outside {'(' if lo_open else '['}{lo}, {hi}]")
        return float(value)

    def str(self, value: Any, field: str, choices: tuple | set | None = None, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.fail(field, f"is {value!r}; supported: {', '.join(sorted(choices))}")
        return value

    def bool(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {_kind(value)}")
        return value

    def list(self, value: Any, field: str, max_len: int) -> list:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {_kind(value)}")
        if len(value) > max_len:
            raise self.fail(field, f"has {len(value)} entries, at most {max_len} expected")
        return value

    def sha(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise self.fail(field, "must be a sha256 hex digest")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


# -- paths -------------------------------------------------------------------------------------------
def contained_file(root: Path, name: Any, what: str, must_exist: bool = True) -> Path:
    """`root / name` after checking that name is a plain file name and stays inside root.

    Refused: separators, `..`, leading dots, empty or odd names, and symlinks (or a directory)
    that resolve outside root. With must_exist, the target must be a regular file.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LLMFlashError(f"{what} {name!r} in {root} is not a plain file name inside the model directory")
    path = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise LLMFlashError(f"{what} {path} resolves to {real}, outside the model directory {root}; refused")
    if must_exist:
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise LLMFlashError(f"missing file {path} ({what}, listed in {root / 'manifest.json'})") from None
        if not stat.S_ISREG(st.st_mode):
            raise LLMFlashError(f"{what} {path} is not a regular file")
    return path


def contained_dir(root: Path, name: str, what: str) -> Path:
    """A subdirectory of root (which may not exist yet) that does not resolve outside it."""
    path = root / name
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise LLMFlashError(f"{what} {path} resolves to {real}, outside the model directory {root}; refused")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise LLMFlashError(f"{what} {path} is not a directory")
    return path


# -- config ------------------------------------------------------------------------------------------
def validate_config(d: Any, where: str, field: str = "config") -> ModelConfig:
    """A ModelConfig from a manifest's config object, every field checked."""
    c = _Check(where)
    c.dict(d, field)
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise c.fail(f"{field}.{unknown[0]}", "is not a known config field")
    f = lambda k: f"{field}.{k}"  # noqa: E731
    get = lambda k, default=None: d.get(k, default)  # noqa: E731
    for k in ("family", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings", "hidden_act"):
        c.has(d, k, field)
    family = c.str(d["family"], f("family"), tuple(BY_FAMILY))
    c.str(d["model_type"], f("model_type"), BY_FAMILY[family].MODEL_TYPES)
    vocab = c.int(d["vocab_size"], f("vocab_size"), 1, MAX_VOCAB)
    c.int(d["hidden_size"], f("hidden_size"), 1, MAX_DIM)
    c.int(d["intermediate_size"], f("intermediate_size"), 1, MAX_DIM)
    c.int(d["num_layers"], f("num_layers"), 1, MAX_LAYERS)
    heads = c.int(d["num_heads"], f("num_heads"), 1, MAX_HEADS)
    kv = c.int(d["num_kv_heads"], f("num_kv_heads"), 1, heads)
    if heads % kv:
        raise c.fail(f("num_kv_heads"), f"({kv}) must divide num_heads ({heads})")
    c.int(d["head_dim"], f("head_dim"), 1, MAX_DIM)
    c.int(d["max_position_embeddings"], f("max_position_embeddings"), 2, MAX_POSITIONS)
    act = c.str(d["hidden_act"], f("hidden_act"), ACTIVATIONS)
    thr = c.num(get("act_threshold", 0.0), f("act_threshold"), 0.0, 1e6)
    if act != "fatrelu" and thr != 0.0:
        raise c.fail(f("act_threshold"), f"is {thr} but hidden_act is {act}")
    c.num(get("norm_eps", 1e-5), f("norm_eps"), 0.0, 1.0, lo_open=True)
    c.num(get("rope_theta", 10000.0), f("rope_theta"), 0.0, 1e12, lo_open=True)
    scaling = get("rope_scaling")
    if scaling is not None:
        c.dict(scaling, f("rope_scaling"))
        c.str(scaling.get("rope_type"), f("rope_scaling.rope_type"), ("default", "linear", "llama3", "longrope"))
        if scaling.get("rope_type") == "longrope":  # Phi-3: per-frequency factors (models/phi3.py)
            for k in ("short_factor", "long_factor"):
                c.has(scaling, k, f("rope_scaling"))
                factors = c.list(scaling[k], f(f"rope_scaling.{k}"), d["head_dim"] // 2)
                if len(factors) != d["head_dim"] // 2:
                    raise c.fail(f(f"rope_scaling.{k}"), f"must list head_dim / 2 = {d['head_dim'] // 2} factors")
                for i, v in enumerate(factors):
                    c.num(v, f(f"rope_scaling.{k}[{i}]"), 0.0, 1e6, lo_open=True)
            for k in ("attention_factor", "original_max_position_embeddings"):
                c.has(scaling, k, f("rope_scaling"))
            c.num(scaling["attention_factor"], f("rope_scaling.attention_factor"), 0.0, 1e6, lo_open=True)
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            if k in scaling:
                c.num(scaling[k], f(f"rope_scaling.{k}"), 0.0, 1e6, lo_open=True)
        if "original_max_position_embeddings" in scaling:
            c.int(scaling["original_max_position_embeddings"], f("rope_scaling.original_max_position_embeddings"),
                  1, MAX_POSITIONS)
        if scaling.get("rope_type") in ("linear", "llama3") and "factor" not in scaling:
            raise c.fail(f("rope_scaling.factor"), "is missing")
        if scaling.get("rope_type") == "llama3":
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                c.has(scaling, k, f("rope_scaling"))
    for k in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias",
              "do_layer_norm_before", "final_layer_norm"):
        if k in d:
            c.bool(d[k], f(k))
    if get("sliding_window") is not None:
        c.int(d["sliding_window"], f("sliding_window"), 1, MAX_POSITIONS)
    if get("layer_types") is not None:  # Gemma 3
        for i, t in enumerate(c.list(d["layer_types"], f("layer_types"), MAX_LAYERS)):
            c.str(t, f(f"layer_types[{i}]"), ("sliding_attention", "full_attention"))
        if len(d["layer_types"]) != d["num_layers"]:
            raise c.fail(f("layer_types"), f"has {len(d['layer_types'])} entries, num_layers is {d['num_layers']}")
    for k in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
        if get(k) is not None:
            c.num(d[k], f(k), 0.0, 1e12, lo_open=True)
    if d["family"] == "gemma3" and (get("rope_local_theta") is None or get("query_pre_attn_scalar") is None):
        raise c.fail(field, "is a Gemma 3 config without rope_local_theta and query_pre_attn_scalar")
    if get("word_embed_proj_dim") is not None:
        c.int(d["word_embed_proj_dim"], f("word_embed_proj_dim"), 1, MAX_DIM)
    if get("bos_token_id") is not None:
        c.int(d["bos_token_id"], f("bos_token_id"), 0, vocab - 1)
    for i, e in enumerate(c.list(get("eos_token_id", []), f("eos_token_id"), 64)):
        c.int(e, f(f"eos_token_id[{i}]"), 0, vocab - 1)
    if family == "opt":
        if d["num_heads"] * d["head_dim"] != d["hidden_size"] or kv != heads:
            raise c.fail(field, "has OPT attention sizes that do not match hidden_size")
        if not d.get("mlp_bias", False):
            raise c.fail(f("mlp_bias"), "must be true for OPT")
    return ModelConfig.from_dict(d)


def expected_resident_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes the forward code relies on, for the resident tensors whose shape the config fixes."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    out: dict[str, tuple[int, ...]] = {}
    if config.family == "opt":
        p = "model.decoder."
        proj = config.word_embed_proj_dim or d
        out[p + "embed_tokens.weight"] = (config.vocab_size, proj)
        out[p + "embed_positions.weight"] = (config.max_position_embeddings + 2, d)
        if config.word_embed_proj_dim:
            out[p + "project_in.weight"] = (d, proj)
            out[p + "project_out.weight"] = (proj, d)
        for i in range(config.num_layers):
            lp = f"{p}layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{lp}self_attn.{name}.weight"] = (d, d)
                out[f"{lp}self_attn.{name}.bias"] = (d,)
            for name in ("self_attn_layer_norm", "final_layer_norm"):
                out[f"{lp}{name}.weight"] = out[f"{lp}{name}.bias"] = (d,)
            out[f"{lp}fc2.bias"] = (d,)
        if not config.tie_word_embeddings:
            out["lm_head.weight"] = (config.vocab_size, proj)
        return out
    out["model.embed_tokens.weight"] = (config.vocab_size, d)
    out["model.norm.weight"] = (d,)
    for i in range(config.num_layers):
        lp = f"model.layers.{i}."
        out[lp + "input_layernorm.weight"] = out[lp + "post_attention_layernorm.weight"] = (d,)
        out[lp + "self_attn.q_proj.weight"] = (q, d)
        out[lp + "self_attn.k_proj.weight"] = (kv, d)
        out[lp + "self_attn.v_proj.weight"] = (kv, d)
        out[lp + "self_attn.o_proj.weight"] = (d, q)
        if config.attention_bias:
            out[lp + "self_attn.q_proj.bias"] = (q,)
            out[lp + "self_attn.k_proj.bias"] = (kv,)
            out[lp + "self_attn.v_proj.bias"] = (kv,)
        if config.attention_out_bias:
            out[lp + "self_attn.o_proj.bias"] = (d,)
        if config.mlp_bias:
            out[lp + "mlp.down_proj.bias"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, d)
    return out


# -- manifest ----------------------------------------------------------------------------------------
def parse_manifest(raw: bytes, where: str) -> dict:
    """JSON object from the manifest's bytes; every way it can fail is a one-line error."""
    try:
        text = raw.decode("utf-8")
        manifest = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise LLMFlashError(f"corrupted manifest {where}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(manifest, dict):
        raise LLMFlashError(f"corrupted manifest {where}: the top level must be an object, got {_kind(manifest)}")
    return manifest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a manifest")


def check_format(manifest: dict, where: str) -> int:
    """The format name and version (an int among READABLE_VERSIONS), and the manifest's checksum."""
    c = _Check(where)
    if manifest.get("format") != "llmflash":
        raise LLMFlashError(f"{where} is not an llmflash manifest (format field is {manifest.get('format')!r})")
    version = c.has(manifest, "format_version", "")
    if not isinstance(version, int) or isinstance(version, bool):
        raise c.fail("format_version", f"must be an integer, got {_kind(version)}")
    if version not in READABLE_VERSIONS:
        raise LLMFlashError(
            f"{where} has format version {version}; this llmflash reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: convert the model again")
    stored = manifest.get(CHECKSUM_FIELD)
    if version >= 2:
        if stored is None:
            raise c.fail(CHECKSUM_FIELD, "is missing (required from format version 2)")
        if hashlib.sha256(canonical_bytes(manifest)).hexdigest() != stored:
            raise LLMFlashError(f"corrupted manifest {where}: checksum mismatch (its content differs from "
                                f"{CHECKSUM_FIELD}); restore the model or convert it again")
    else:
        unknown = sorted(set(manifest) - _V1_FIELDS)
        if unknown:
            raise c.fail(unknown[0], "is not a field of a version-1 manifest")
    return version


def validate_manifest(manifest: dict, root: Path, where: str) -> dict:
    """Check everything the runtime reads; returns resolved facts (config, names) for the caller."""
    version = check_format(manifest, where)
    strict = version < 2
    c = _Check(where)
    for key in ("dtype", "config", "files", "ffn", "tokenizer"):
        c.has(manifest, key, "")
    dtype = c.str(manifest["dtype"], "dtype", SUPPORTED_DTYPES)
    if "created_by" in manifest:
        c.str(manifest["created_by"], "created_by")
    if "conversion_seconds" in manifest:
        c.num(manifest["conversion_seconds"], "conversion_seconds", 0.0)
    if "source" in manifest:
        c.dict(manifest["source"], "source")
    if manifest.get("resident_dtype") is not None:  # int8/int4 models: resident matrices' dtype
        from llmflash.format import quantized

        c.str(manifest["resident_dtype"], "resident_dtype", ("float16", "bfloat16", "float32", "auto", *quantized.KINDS))
    if manifest.get("resident_blocks") is not None:  # resident matrices stored in blocks -> format
        from llmflash.format import quantized

        c.dict(manifest["resident_blocks"], "resident_blocks")
        for name, kind in manifest["resident_blocks"].items():
            c.str(kind, f"resident_blocks.{name}", quantized.KINDS)
    if manifest.get("quantization") is not None:  # int8/int4 models: what was kept, what requantized
        c.dict(manifest["quantization"], "quantization")
    if manifest.get("synthetic") is not None:  # tools/synth.py: random weights, said once at load
        c.dict(manifest["synthetic"], "synthetic")
    config = validate_config(manifest["config"], where)

    files = c.dict(manifest["files"], "files")
    if not files:
        raise c.fail("files", "is empty")
    for name, info in files.items():
        contained_file(root, name, "files entry", must_exist=False)
        c.dict(info, f"files[{name!r}]")
        c.int(c.has(info, "bytes", f"files[{name!r}]"), f"files[{name!r}].bytes", 0, MAX_FILE_BYTES)
        c.sha(c.has(info, "sha256", f"files[{name!r}]"), f"files[{name!r}].sha256")

    ffn = c.dict(manifest["ffn"], "ffn")
    if strict and set(ffn) - _FFN_FIELDS:
        raise c.fail(f"ffn.{sorted(set(ffn) - _FFN_FIELDS)[0]}", "is not a field of a version-1 manifest")
    ffn_file = ffn.get("file", "ffn.bin")
    contained_file(root, ffn_file, "ffn.file", must_exist=False)
    if ffn_file not in files:
        raise c.fail("ffn.file", f"{ffn_file!r} is not listed in files")
    alignment = c.int(c.has(ffn, "alignment", "ffn"), "ffn.alignment", 4096, 4096)
    from llmflash.format.layout import bundle_layout_for  # layout imports this module

    expected = bundle_layout_for(config, dtype).to_dict()
    if c.has(ffn, "bundle", "ffn") != expected:
        raise c.fail("ffn.bundle", f"does not match the config ({config.model_type}, hidden_size "
                     f"{config.hidden_size}, {dtype}): expected {json.dumps(expected)}")
    bundle_bytes = expected["bytes"]
    layers = c.list(c.has(ffn, "layers", "ffn"), "ffn.layers", MAX_LAYERS)
    if len(layers) != config.num_layers:
        raise c.fail("ffn.layers", f"has {len(layers)} entries, config.num_layers is {config.num_layers}")
    ffn_size = files[ffn_file]["bytes"]
    end = 0
    for i, r in enumerate(layers):
        f = f"ffn.layers[{i}]"
        c.dict(r, f)
        if strict and set(r) - _LAYER_FIELDS:
            raise c.fail(f"{f}.{sorted(set(r) - _LAYER_FIELDS)[0]}", "is not a field of a version-1 manifest")
        offset = c.int(c.has(r, "offset", f), f + ".offset", 0, MAX_FILE_BYTES)
        neurons = c.int(c.has(r, "neurons", f), f + ".neurons", 1, MAX_DIM)
        if neurons != config.intermediate_size:
            raise c.fail(f + ".neurons", f"is {neurons}, config.intermediate_size is {config.intermediate_size}")
        nbytes = c.int(c.has(r, "bytes", f), f + ".bytes", 1, MAX_FILE_BYTES)
        if nbytes != neurons * bundle_bytes:
            raise c.fail(f + ".bytes", f"is {nbytes}, {neurons} neurons x {bundle_bytes} bytes expected")
        if offset % alignment or offset < end:
            raise c.fail(f + ".offset", f"is {offset}: not {alignment}-aligned or overlapping the layer before")
        end = offset + nbytes
        if end > ffn_size:
            raise c.fail(f + ".bytes", f"reaches byte {end}, past the end of {ffn_file} ({ffn_size} bytes)")
        c.sha(c.has(r, "sha256", f), f + ".sha256")
        if r.get("order") is not None:
            _check_permutation(c, r["order"], neurons, f + ".order")
        if r.get("hot") is not None:
            hot = c.list(r["hot"], f + ".hot", neurons)
            for j, v in enumerate(hot):
                c.int(v, f"{f}.hot[{j}]", 0, neurons - 1)
            if len(set(hot)) != len(hot):
                raise c.fail(f + ".hot", "repeats a neuron")
        if r.get("window_union") is not None:
            for j, v in enumerate(c.list(r["window_union"], f + ".window_union", 64)):
                c.num(v, f"{f}.window_union[{j}]", 0.0, float(neurons))
            if not r["window_union"]:
                raise c.fail(f + ".window_union", "is empty")
    if ffn.get("layout") is not None:
        c.dict(ffn["layout"], "ffn.layout")
    checks = ffn.get("checks")
    if checks is not None:
        c.dict(checks, "ffn.checks")
        name = c.has(checks, "file", "ffn.checks")
        contained_file(root, name, "ffn.checks.file", must_exist=False)
        if name not in files:
            raise c.fail("ffn.checks.file", f"{name!r} is not listed in files")
        c.str(c.has(checks, "algorithm", "ffn.checks"), "ffn.checks.algorithm", BUNDLE_CHECK_ALGORITHMS)
        want = 8 * config.num_layers * config.intermediate_size
        if files[name]["bytes"] != want:
            raise c.fail(f"files[{name!r}].bytes", f"is {files[name]['bytes']}, {want} expected "
                         "(8 bytes per bundle)")

    if "resident.safetensors" not in files:
        raise c.fail("files", "does not list resident.safetensors")
    tok = c.dict(manifest["tokenizer"], "tokenizer")
    if strict and set(tok) - {"file", "chat_template", "bos_token", "eos_token"}:
        raise c.fail("tokenizer", "has an unknown field")
    tok_file = tok.get("file")
    if tok_file is not None:
        contained_file(root, tok_file, "tokenizer.file", must_exist=False)
        if tok_file not in files:
            raise c.fail("tokenizer.file", f"{tok_file!r} is not listed in files")
    for k in ("chat_template", "bos_token", "eos_token"):
        c.str(tok.get(k), f"tokenizer.{k}", optional=True)
    return {"version": version, "config": config, "ffn_file": ffn_file, "tokenizer_file": tok_file,
            "checks": checks}


def _check_permutation(c: _Check, order: Any, n: int, field: str) -> None:
    import numpy as np

    c.list(order, field, n)
    if len(order) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in order):
        raise c.fail(field, f"must list {n} integer neuron ids")
    arr = np.asarray(order, dtype=np.int64)
    if arr.min() < 0 or arr.max() >= n or len(np.unique(arr)) != n:
        raise c.fail(field, f"is not a permutation of 0..{n - 1}")


def check_resident_header(header: Any, file_size: int, config: ModelConfig, where: str,
                          blocks: dict[str, str] | None = None) -> list[tuple]:
    """Entries of a resident safetensors header, checked against the file size and the config.

    Returns (name, info) sorted by data offset. Refuses unknown dtypes, negative or overlapping
    offsets, sizes that disagree with the shape, missing tensors and shapes the config contradicts.
    U8 tensors are matrices stored in a block format (`blocks`, the manifest's resident_blocks:
    name -> int8/int4/int4m): [rows, row bytes], checked against the [rows, k] the config implies.
    """
    from llmflash.format import quantized

    if not isinstance(header, dict):
        raise LLMFlashError(f"cannot read {where}: the safetensors header is not an object")
    blocks = blocks or {}
    sizes = {"F16": 2, "BF16": 2, "F32": 4, **({"U8": 1} if blocks else {})}
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in sizes and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
            raise LLMFlashError(f"cannot read {where}: bad header entry for tensor {name!r}")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_FILE_BYTES
                   for v in [*shape, begin, end]):
            raise LLMFlashError(f"cannot read {where}: bad shape or offsets for tensor {name!r}")
        n = 1
        for s in shape:
            n *= s
        if end - begin != n * sizes[info["dtype"]] or end > file_size:
            raise LLMFlashError(f"cannot read {where}: tensor {name!r} has offsets that disagree with "
                                "its shape or the file size")
        entries.append((name, info))
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    expected = expected_resident_shapes(config)
    present = {name: tuple(info["shape"]) for name, info in entries}
    stored_as_blocks = {name for name, info in entries if info["dtype"] == "U8"}
    if stored_as_blocks != set(blocks):
        name = sorted(stored_as_blocks ^ set(blocks))[0]
        raise LLMFlashError(f"{where}: tensor {name} is {'' if name in stored_as_blocks else 'not '}stored in "
                            "blocks (U8), which the manifest's resident_blocks contradicts")
    for name in sorted(stored_as_blocks - expected.keys()):
        raise LLMFlashError(f"{where}: tensor {name} is stored in blocks (U8) but is no matrix the config implies")
    for name, shape in expected.items():
        if name not in present:
            raise LLMFlashError(f"{where} has no tensor {name}, which the config needs")
        if name in stored_as_blocks:
            if len(shape) != 2 or shape[1] % quantized.BLOCK:
                raise LLMFlashError(f"{where}: tensor {name} is stored in blocks, but its rows of {shape[-1]} "
                                    f"are not whole blocks of {quantized.BLOCK}")
            shape = (shape[0], quantized.row_bytes(blocks[name], shape[1]))
        if present[name] != shape:
            raise LLMFlashError(f"{where}: tensor {name} has shape {list(present[name])}, the config implies "
                                f"{list(shape)}")
    return entries
