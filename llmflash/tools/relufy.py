"""Relufication: swap a gated FFN's activation to ReLU (or FATReLU) and distil it back to quality.

Recipe (the one that made the project's 90 %-sparse relufied SmolLM2-135M test model, shortened):

1. swap act(gate) -> relu(gate) (or FATReLU with threshold T: x if x > T else 0);
2. refit (optional, default on): per layer, a ridge least-squares fit of the down projection so that
   down(relu(gate x) * up x) matches the original FFN output on the original model's FFN inputs;
   it recovers most of what the swap loses, in seconds;
3. fine-tune the FFN weights (gate, up, down) and all RMSNorm weights with
   KL(teacher || student) over the vocabulary at every position + ce_weight x next-token
   cross-entropy (+ l1 x mean |activation| if asked), AdamW, cosine learning rate, fp32 on CPU.
   The teacher is the source model, unchanged. Attention and embeddings stay frozen.

Checkpoints (every --checkpoint-every steps) go beside DST as `.DST.relufy-ckpt.<step>.safetensors`
(parameters and AdamW moments) plus `.DST.relufy-ckpt.json` (step, options key, scheduler and
optimiser settings, report, the tensors file's name and sha256; renamed last, so a crash leaves
the previous checkpoint whole); no pickle is ever loaded. A rerun
with the same options resumes from the last one. The result is written through the converter (a
temporary Hugging Face directory -> `convert`), so DST is an ordinary model directory. Perplexity
and the exact-zero fraction of the FFN activations are measured on held-out text before (the
original model and the plain swap) and after.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmflash.runtime.ffn import BundleSlices, activate, ffn_intermediate
from llmflash.runtime.engine import load_tokenizer
from llmflash.errors import LLMFlashError
from llmflash.models import build_model
from llmflash.runtime.layer_weights import layer_weights
from llmflash.tools.text import read_text
from llmflash.format.layout import FlashModelDir
from llmflash.format.tempfiles import remove_stale
from llmflash.models.base import FFNProvider, ObservedFFN


@dataclass
class RelufyOptions:
    steps: int = 100
    lr: float = 1e-4
    seq_len: int = 256
    batch: int = 4
    threshold: float = 0.0  # > 0: FATReLU
    refit: bool = True
    refit_tokens: int = 4096
    ridge: float = 1e-3
    l1: float = 0.0
    ce_weight: float = 0.1
    checkpoint_every: int = 25
    eval_tokens: int = 2048
    eval_window: int = 512
    train_tokens: int | None = None
    seed: int = 0
    warmup: float = 0.05


class _NoCache:
    """A KV 'cache' for one full-sequence forward: keeps nothing, so autograd sees plain tensors."""

    length = 0

    def append(self, layer, start, k, v):
        return k, v


class _StudentFFN(FFNProvider):
    """Trainable bundles (neuron order) through the engine's own FFN code; counts exact zeros."""

    def __init__(self, rows: list[torch.Tensor], slices: BundleSlices, act: str, threshold: float):
        self.rows, self.slices, self.act, self.threshold = rows, slices, act, threshold
        self.l1_terms: list[torch.Tensor] = []
        self.track_l1 = False
        self.zeros = 0
        self.total = 0
        self.count = False

    def gate_act(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        s, r = self.slices, self.rows[layer]
        g = F.linear(x, r[:, s.gate], None if s.gate_bias is None else r[:, s.gate_bias].reshape(-1))
        return activate(g, self.act, self.threshold)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        r = self.rows[layer]
        h = ffn_intermediate(x, r, self.slices, self.act, self.threshold)
        if self.count:
            a = self.gate_act(layer, x)
            self.zeros += int((a == 0).sum())
            self.total += a.numel()
        if self.track_l1:
            self.l1_terms.append(self.gate_act(layer, x).abs().mean())
        return h @ r[:, self.slices.down]


class _TeacherFFN(_StudentFFN):
    pass


def _windows(ids: list[int], bos: int | None, size: int, limit: int) -> list[list[int]]:
    body = size - (1 if bos is not None else 0)
    out, used = [], 0
    for i in range(0, len(ids), body):
        chunk = ids[i:i + body]
        if len(chunk) < 8 or used >= limit:
            break
        chunk = chunk[: limit - used]
        out.append(([bos] if bos is not None else []) + chunk)
        used += len(chunk)
    return out


@torch.no_grad()
def _perplexity(model, ffn, windows: list[list[int]]) -> tuple[float, float]:
    ffn.count, ffn.zeros, ffn.total = True, 0, 0
    nll, n = 0.0, 0
    for w in windows:
        logits = model.forward(torch.tensor(w), _NoCache())
        logp = torch.log_softmax(logits[:-1].float(), -1)
        nll -= float(logp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        n += len(w) - 1
    ffn.count = False
    return math.exp(nll / n), ffn.zeros / max(ffn.total, 1)


@torch.no_grad()
def _distill_loss(teacher, student, windows: list[list[int]]) -> float:
    """Mean KL(teacher || student) per position on the evaluation windows."""
    total, n = 0.0, 0
    for w in windows:
        ids = torch.tensor(w)
        t = torch.log_softmax(teacher.forward(ids, _NoCache()).float(), -1)
        s = torch.log_softmax(student.forward(ids, _NoCache()).float(), -1)
        total += float((t.exp() * (t - s)).sum())
        n += len(w)
    return total / n


def _hf_config(c, act: str, threshold: float) -> dict:
    hf = {
        "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": act,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id[0] if len(c.eos_token_id) == 1 else c.eos_token_id,
    }
    if c.sliding_window:
        hf.update(sliding_window=c.sliding_window, use_sliding_window=True)
    if act == "fatrelu":
        hf["hidden_act_param"] = threshold
    return hf


def _write_model(src: FlashModelDir, dst: Path, resident: dict[str, torch.Tensor], rows: list[torch.Tensor],
                 slices: BundleSlices, act: str, threshold: float, force: bool) -> FlashModelDir:
    """Write a Hugging Face directory beside DST and convert it into DST with the source dtype."""
    from safetensors.torch import save_file

    from llmflash.conversion.writer import convert

    c = src.config
    tmp = dst.parent / f".{dst.name}.relufy-hf-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().float().contiguous() for k, v in resident.items()}
        for l, r in enumerate(rows):
            r = r.detach().float()
            p = f"model.layers.{l}.mlp."
            tensors[p + "gate_proj.weight"] = r[:, slices.gate].contiguous()
            tensors[p + "up_proj.weight"] = r[:, slices.up].contiguous()
            tensors[p + "down_proj.weight"] = r[:, slices.down].t().contiguous()
            if slices.gate_bias is not None:
                tensors[p + "gate_proj.bias"] = r[:, slices.gate_bias].reshape(-1).contiguous()
                tensors[p + "up_proj.bias"] = r[:, slices.up_bias].reshape(-1).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(_hf_config(c, act, threshold)))
        tok = src.manifest.get("tokenizer") or {}
        if tok.get("file"):
            shutil.copy(src.path / tok["file"], tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": tok.get("bos_token"), "eos_token": tok.get("eos_token"),
                 "chat_template": tok.get("chat_template")}))
        return convert(tmp, dst, dtype=src.dtype, force=force, progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refit_down(teacher, teacher_ffn, student_ffn: _StudentFFN, windows, ridge: float) -> None:
    """Least-squares down projection per layer: student h -> teacher FFN output, on teacher inputs."""
    L = len(student_ffn.rows)
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    inner = teacher.ffn
    teacher.ffn = ObservedFFN(inner, lambda layer, x: xs[layer].append(x.detach()))
    with torch.no_grad():
        for w in windows:
            teacher.forward(torch.tensor(w), _NoCache())
    teacher.ffn = inner
    with torch.no_grad():
        for l in range(L):
            X = torch.cat(xs[l])
            Y = teacher_ffn(l, X)
            r = student_ffn.rows[l]
            H = ffn_intermediate(X, r, student_ffn.slices, student_ffn.act, student_ffn.threshold).double()
            G = H.T @ H
            lam = ridge * float(G.diagonal().mean().clamp_min(1e-12))
            G.diagonal().add_(lam)
            D = torch.linalg.solve(G, H.T @ Y.double())
            r[:, student_ffn.slices.down] = D.to(r.dtype)


def _save_checkpoint(ckpt: Path, state: dict, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """Tensors to safetensors, the rest to JSON naming the tensors' sha256; the JSON is renamed
    last, so it always describes a complete tensors file."""
    import hashlib

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        tensors[f"params.{i}"] = p.detach().contiguous()
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(-1).contiguous() if v.dim() == 0 else v.detach().contiguous()
    pid = os.getpid()
    # one tensors file per step, named in the JSON: the JSON's rename is the one switch, so a
    # crash at any point leaves the previous checkpoint complete
    tensors_path = ckpt.with_name(f"{ckpt.stem}.{state['step']}.safetensors")
    tmp_t = ckpt.with_name(f"{ckpt.stem}.safetensors.tmp-{pid}")
    tmp_j = ckpt.with_name(f"{ckpt.name}.tmp-{pid}")
    try:
        save_file(tensors, str(tmp_t))
        sha = hashlib.sha256(tmp_t.read_bytes()).hexdigest()
        meta = dict(state, tensors_file=tensors_path.name, tensors_sha256=sha, params=len(params),
                    opt={"param_groups": opt_state["param_groups"],
                         "scalars": sorted(f"opt.{i}.{k}" for i, st in opt_state["state"].items()
                                           for k, v in st.items() if v.dim() == 0)})
        tmp_j.write_text(json.dumps(meta))
        os.replace(tmp_t, tensors_path)
        os.replace(tmp_j, ckpt)
    except BaseException:  # full disk, SIGINT/SIGTERM: the last complete checkpoint stays
        tmp_t.unlink(missing_ok=True)
        tmp_j.unlink(missing_ok=True)
        raise
    _remove_checkpoint_tensors(ckpt, keep=tensors_path.name)


def _remove_checkpoint_tensors(ckpt: Path, keep: str | None = None) -> None:
    for p in ckpt.parent.glob(f"{ckpt.stem}.*.safetensors"):
        if p.name != keep:
            p.unlink(missing_ok=True)


def _load_checkpoint(ckpt: Path, n_params: int) -> dict:
    """The state _save_checkpoint wrote, checked: the tensors file must match the JSON's sha256."""
    import hashlib

    from safetensors.torch import load

    try:
        meta = json.loads(ckpt.read_text())
        name = meta["tensors_file"]
        if not isinstance(name, str) or "/" in name or not name.startswith(ckpt.stem + "."):
            raise ValueError(f"bad tensors_file {name!r}")
        data = ckpt.with_name(name).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LLMFlashError(f"cannot read checkpoint {ckpt}: {exc}; pass --restart") from None
    if not isinstance(meta, dict) or hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256") \
            or meta.get("params") != n_params:
        raise LLMFlashError(f"checkpoint {ckpt} does not match its tensors file {ckpt.with_name(name)}; "
                            "pass --restart")
    tensors = load(data)
    scalars = set(meta["opt"]["scalars"])
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = t.reshape(()) if name in scalars else t
    meta["params"] = [tensors[f"params.{i}"] for i in range(n_params)]
    meta["opt"] = {"state": state, "param_groups": meta["opt"]["param_groups"]}
    return meta


def relufy(src: Path | str, dst: Path | str, text: Path | str, opts: RelufyOptions,
           eval_text: Path | str | None = None, resume: bool = True, force: bool = False,
           progress: bool = True, log=print) -> dict:
    from tqdm import tqdm

    src_dir = FlashModelDir(src)
    dst = Path(dst)
    c = src_dir.config
    if not c.gated:
        raise LLMFlashError(f"relufy needs a gated FFN (Llama family); {src_dir.path} is {c.model_type}, "
                            "whose FFN is already ReLU")
    if c.hidden_act in ("relu", "fatrelu") and opts.threshold <= 0:
        raise LLMFlashError(f"{src_dir.path} already uses {c.hidden_act}")
    if dst.exists() and not force:
        raise LLMFlashError(f"{dst} already exists; pass --force to replace it")
    if opts.steps < 0:
        raise LLMFlashError("--steps must be >= 0")
    act = "fatrelu" if opts.threshold > 0 else "relu"
    tokenizer = load_tokenizer(src_dir)
    if tokenizer is None:
        raise LLMFlashError(f"{src_dir.path} has no tokenizer; relufy needs text")
    torch.manual_seed(opts.seed)
    max_chars = None if opts.train_tokens is None else (opts.train_tokens + opts.eval_tokens) * 12
    ids = tokenizer.encode(read_text(text, max_chars=max_chars or 8_000_000), add_special_tokens=False)
    bos = c.bos_token_id
    window = min(opts.eval_window, c.max_position_embeddings - 1)
    if eval_text is None:  # hold the text's tail out of training
        if len(ids) < opts.eval_tokens + 4 * opts.seq_len:
            raise LLMFlashError(f"{text} is too short to hold out {opts.eval_tokens} evaluation tokens; "
                                "give --eval-text or a longer text")
        eval_ids, ids = ids[-opts.eval_tokens:], ids[:-opts.eval_tokens]
        eval_source = f"{text} (last {opts.eval_tokens} tokens, held out of training)"
    else:
        eval_ids = tokenizer.encode(read_text(eval_text, max_chars=opts.eval_tokens * 12), add_special_tokens=False)
        eval_source = str(eval_text)
    if opts.train_tokens:
        ids = ids[:opts.train_tokens]
    seq = min(opts.seq_len, c.max_position_embeddings - 1) - (1 if bos is not None else 0)
    if len(ids) <= seq + 1:
        raise LLMFlashError(f"{text} gives only {len(ids)} training tokens; need more than {seq + 1}")
    eval_windows = _windows(eval_ids, bos, window, opts.eval_tokens)
    train_ids = torch.tensor(ids, dtype=torch.long)

    # teacher: the source model as is; student: same resident weights, trainable bundles + norms
    resident = src_dir.load_resident(torch.float32)
    layers = [layer_weights(src_dir, l) for l in range(c.num_layers)]
    slices = layers[0].slices
    teacher_ffn = _TeacherFFN([w.rows for w in layers], slices, c.hidden_act, c.act_threshold)
    max_len = max(seq + 1, window) + 1
    teacher = build_model(c, resident, teacher_ffn, max_len, torch.float32)
    rows = [w.rows.clone().requires_grad_(True) for w in layers]
    norm_names = [n for n in resident if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    student_w = dict(resident)
    for n in norm_names:
        student_w[n] = resident[n].clone().requires_grad_(True)
    student_ffn = _StudentFFN(rows, slices, act, opts.threshold)
    sc = dataclasses.replace(c, hidden_act=act, act_threshold=opts.threshold)
    student = build_model(sc, student_w, student_ffn, max_len, torch.float32)
    params = rows + [student_w[n] for n in norm_names]

    ckpt = dst.parent / f".{dst.name}.relufy-ckpt.json"
    # temporary files of a killed run (its Hugging Face staging directory, checkpoint halves)
    remove_stale(dst.parent, f".{dst.name}.", r"(?:relufy-hf-|relufy-ckpt\.\w+\.tmp-)(\d+)")
    key = {"src_ffn_sha256": src_dir.files.get("ffn.bin", {}).get("sha256"), "options": asdict(opts),
           "text": str(Path(text).resolve())}
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total = max(opts.steps, 1)
    warm = max(1, int(opts.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
    start_step, report = 0, None
    if resume and ckpt.exists():
        try:
            state = _load_checkpoint(ckpt, len(params))
        except LLMFlashError:
            raise
        except Exception as exc:
            raise LLMFlashError(f"cannot read checkpoint {ckpt}: {exc}; pass --restart") from None
        if state.get("key") != key:
            raise LLMFlashError(f"checkpoint {ckpt} was made with other options or source; pass --restart "
                                "to discard it or repeat the same options")
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_step, report = state["step"], state["report"]
        log(f"resuming from {ckpt} at step {start_step}")

    if report is None:
        teacher_ppl, teacher_zero = _perplexity(teacher, teacher_ffn, eval_windows)
        swap_ppl, swap_zero = _perplexity(student, student_ffn, eval_windows)
        report = {"before": {"perplexity": teacher_ppl, "exact_zero_fraction": teacher_zero,
                             "activation": c.hidden_act},
                  "swapped": {"perplexity": swap_ppl, "exact_zero_fraction": swap_zero,
                              "kl_to_original": _distill_loss(teacher, student, eval_windows)}}
        log(f"before: perplexity {teacher_ppl:.3f}, exact zeros {teacher_zero:.3f}; "
            f"plain {act} swap: perplexity {swap_ppl:.3f}, exact zeros {swap_zero:.3f}")
        if opts.refit:
            refit_windows = _windows(ids, bos, window, opts.refit_tokens)
            _refit_down(teacher, teacher_ffn, student_ffn, refit_windows, opts.ridge)
            ppl, zero = _perplexity(student, student_ffn, eval_windows)
            report["refit"] = {"perplexity": ppl, "exact_zero_fraction": zero,
                               "kl_to_original": _distill_loss(teacher, student, eval_windows)}
            log(f"after down-projection refit: perplexity {ppl:.3f}, exact zeros {zero:.3f}")
        report["losses"] = []

    gen = torch.Generator()
    bar = tqdm(total=opts.steps, initial=start_step, desc="relufy", unit="step", disable=not progress)
    started = time.perf_counter()
    for step in range(start_step, opts.steps):
        gen.manual_seed(opts.seed * 1_000_003 + step)
        starts = torch.randint(0, len(train_ids) - seq, (opts.batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        total_loss = 0.0
        for s0 in starts.tolist():
            body = train_ids[s0:s0 + seq]
            seq_ids = torch.cat([torch.tensor([bos]), body]) if bos is not None else body
            with torch.no_grad():
                t_logp = torch.log_softmax(teacher.forward(seq_ids, _NoCache()).float(), -1)
            student_ffn.l1_terms = []
            student_ffn.track_l1 = opts.l1 > 0
            s_logp = torch.log_softmax(student.forward(seq_ids, _NoCache()).float(), -1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            ce = F.nll_loss(s_logp[:-1], seq_ids[1:])
            loss = kl + opts.ce_weight * ce
            if opts.l1 > 0:
                loss = loss + opts.l1 * torch.stack(student_ffn.l1_terms).mean()
            (loss / opts.batch).backward()
            total_loss += float(loss.detach()) / opts.batch
        student_ffn.track_l1 = False
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        report["losses"].append(total_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.4f}")
        done = step + 1
        if done % opts.checkpoint_every == 0 or done == opts.steps:
            _save_checkpoint(ckpt, {"key": key, "step": done, "sched": sched.state_dict(), "report": report},
                             params, opt)
    bar.close()

    ppl, zero = _perplexity(student, student_ffn, eval_windows)
    report["after"] = {"perplexity": ppl, "exact_zero_fraction": zero, "activation": act,
                       "threshold": opts.threshold, "kl_to_original": _distill_loss(teacher, student, eval_windows)}
    report.update(steps=opts.steps, eval_text=eval_source, eval_tokens=sum(len(w) - 1 for w in eval_windows),
                  train_text=str(Path(text).resolve()), options=asdict(opts),
                  train_seconds=round(time.perf_counter() - started, 1))
    log(f"after {opts.steps} steps: perplexity {ppl:.3f}, exact zeros {zero:.3f}, "
        f"KL to the original {report['after']['kl_to_original']:.4f}")
    new_resident = dict(resident)
    for n in norm_names:
        new_resident[n] = student_w[n]
    # rows are in neuron order (layer_weights undid any slot permutation); the converter writes them so
    out = _write_model(src_dir, dst, new_resident, rows, slices, act, opts.threshold, force)
    (out.path / "sparsity").mkdir(exist_ok=True)
    tmp = out.path / "sparsity" / ".relufy.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out.path / "sparsity" / "relufy.json")
    ckpt.unlink(missing_ok=True)
    _remove_checkpoint_tensors(ckpt)
    return report


__all__ = ["RelufyOptions", "relufy"]
