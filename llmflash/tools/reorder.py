"""Co-activation layout: put neurons that fire together next to each other on flash.

This machine's disk is bound by reads per second, not bytes (docs/STORAGE.md §4), and a small model's
bundle (SmolLM2: 3.4-6.9 KiB) is far below the useful read size. If the neurons a token loads sit
side by side, the read planner merges them into fewer, larger reads. We record which neurons are
active on calibration text, chain them greedily by Jaccard similarity (each next slot gets the
unplaced neuron most often co-active with the last placed one, starting from the hottest), and
rewrite ffn.bin in that order. Neuron ids do not change (the manifest's per-layer `order` maps
slots to ids), so predictors and statistics stay valid. The hottest neurons are listed per layer
(`hot`) so the runtime can pin them (`--pin`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmflash.models.base import ObservedFFN
from llmflash.runtime.ffn import ffn_intermediate
from llmflash.errors import LLMFlashError
from llmflash.format.integrity import checks_name, write_bundle_checks
from llmflash.format.trace_file import MAX_WINDOW, window_union  # noqa: F401 (re-exported)
from llmflash.format.layout import FFN_FILE, MANIFEST, FlashModelDir, align_up, sha256_file, write_manifest
from llmflash.format.tempfiles import remove_stale

HOT_FRACTION = 0.25  # how many of the hottest neurons the manifest lists per layer


def activation_trace(engine, ids: list[int], sparsity: float = 0.5) -> list[np.ndarray]:
    """Per layer a bool [tokens, neurons] matrix of which neurons are active on `ids`.

    Active means non-zero for ReLU/FATReLU; for SiLU models, |act(gate)*up| above that token's
    `sparsity` quantile (the neurons a magnitude-threshold predictor would keep).
    """
    ffn = engine.ffn
    if not hasattr(ffn, "layers"):
        raise LLMFlashError("activation traces need a dense engine")
    trace: list[list[np.ndarray]] = [[] for _ in range(engine.config.num_layers)]
    exact = engine.config.hidden_act in ("relu", "fatrelu")

    def record(layer: int, x: torch.Tensor) -> None:
        h = ffn_intermediate(x, ffn.layers[layer], ffn.slices, ffn.act, ffn.threshold)
        if exact:
            active = h != 0
        else:
            mag = h.abs()
            active = mag > torch.quantile(mag.float(), sparsity, dim=1, keepdim=True)
        trace[layer].append(active.numpy())

    engine.model.ffn = ObservedFFN(ffn, record)
    try:
        window = engine.context - 1
        for start in tqdm(range(0, len(ids), window), desc="trace", unit="window",
                          disable=len(ids) <= window):
            engine.logits(ids[start:start + window])
    finally:
        engine.model.ffn = ffn
    return [np.concatenate(t) for t in trace]


def coactivation_order(active: np.ndarray) -> np.ndarray:
    """Slot order: a greedy chain through the Jaccard co-activation graph, hottest first."""
    a = active.astype(np.float32)
    co = a.T @ a
    freq = np.diag(co).copy()
    jaccard = co / np.maximum(freq[:, None] + freq[None, :] - co, 1e-9)
    n = len(freq)
    order = np.empty(n, dtype=np.int64)
    placed = np.zeros(n, dtype=bool)
    current = int(np.argmax(freq))
    for i in range(n):
        order[i] = current
        placed[current] = True
        if i + 1 < n:
            scores = np.where(placed, -1.0, jaccard[current])
            # ties (e.g. never-active neurons) broken by frequency, so cold ones end up together
            best = np.flatnonzero(scores == scores.max())
            current = int(best[np.argmax(freq[best])])
    return order


def hot_neurons(active: np.ndarray, fraction: float = HOT_FRACTION) -> list[int]:
    freq = active.mean(axis=0)
    k = max(1, int(round(fraction * active.shape[1])))
    return [int(i) for i in np.argsort(-freq, kind="stable")[:k]]


def rewrite_layout(model_dir: FlashModelDir, orders: list[np.ndarray], hot: list[list[int]],
                   source: str, unions: list[list[float]] | None = None) -> FlashModelDir:
    """Write ffn.bin in the new slot orders and swap it in atomically, manifest last."""
    path = model_dir.path
    manifest = json.loads(json.dumps(model_dir.manifest))  # validated when the directory was opened
    old_name = manifest["ffn"]["file"]
    old_checks = (manifest["ffn"].get("checks") or {}).get("file")
    remove_leftovers(model_dir)
    tmp_ffn = path / f".{FFN_FILE}.tmp-{os.getpid()}"
    tmp_checks = path / f".ffn.xxh3.tmp-{os.getpid()}"
    try:
        with open(tmp_ffn, "wb") as out:
            for layer, region in enumerate(tqdm(model_dir.layers, desc="rewrite", unit="layer")):
                rows = model_dir.read_layer_bundles(layer)
                current = region.permutation()  # slot -> neuron
                slot_of = np.argsort(current)
                new_rows = rows[torch.from_numpy(slot_of[orders[layer]])]
                data = new_rows.contiguous().view(torch.uint8).numpy().tobytes()
                assert out.tell() == region.offset and len(data) == region.nbytes
                out.write(data)
                out.write(b"\0" * (align_up(out.tell()) - out.tell()))
                entry = manifest["ffn"]["layers"][layer]
                entry["order"] = [int(i) for i in orders[layer]]
                entry["sha256"] = hashlib.sha256(data).hexdigest()
                entry["hot"] = hot[layer]
                if unions is not None:
                    entry["window_union"] = unions[layer]
            out.flush()
            os.fsync(out.fileno())
        digest = sha256_file(tmp_ffn)
        # A new file name per layout: the manifest's rename is the one atomic switch, so a crash
        # leaves either the old manifest with the old file or the new one with the new file.
        new_name = f"ffn-{digest[:12]}.bin"
        os.rename(tmp_ffn, path / new_name)
        del manifest["files"][old_name]
        manifest["files"][new_name] = {"bytes": (path / new_name).stat().st_size, "sha256": digest}
        manifest["ffn"]["file"] = new_name
        manifest["ffn"]["layout"] = {"kind": "coactivation", "source": source}
        # per-bundle digests of the new layout (format/integrity.py), renamed into place
        checks_file = checks_name(new_name)
        _, entry, checks = write_bundle_checks(path, new_name, manifest["ffn"]["layers"],
                                               model_dir.bundle.nbytes, name=tmp_checks.name)
        os.rename(tmp_checks, path / checks_file)
        if old_checks is not None:
            manifest["files"].pop(old_checks, None)
        manifest["files"][checks_file] = entry
        manifest["ffn"]["checks"] = dict(checks, file=checks_file)
        write_manifest(path, manifest)  # sealed, temporary name, fsync, rename: the one switch
        for name in {old_name, old_checks} - {new_name, checks_file, None}:
            (path / name).unlink(missing_ok=True)
        old_sha = model_dir.files.get(old_name, {}).get("sha256")
        if old_sha is not None:
            # neuron ids are unchanged, so calibration statistics and predictors stay valid
            from llmflash.format.sparsity_store import SparsityStore

            SparsityStore(FlashModelDir(path)).rekey(old_sha, digest)
    except BaseException:
        for f in (tmp_ffn, tmp_checks):
            f.unlink(missing_ok=True)
        raise
    return FlashModelDir(path)


_LAYOUT_FILE = re.compile(r"ffn(-[0-9a-f]{12})?\.(bin|xxh3)")


def remove_leftovers(model_dir: FlashModelDir) -> list[Path]:
    """What a killed reorder left: temporary files of dead processes, and bundle or checks files
    of a layout the manifest does not (or no longer) list."""
    path = model_dir.path
    removed = []
    for prefix in (f".{FFN_FILE}.", ".ffn.xxh3.", f".{MANIFEST}."):
        removed += remove_stale(path, prefix)
    for entry in os.scandir(path):
        if _LAYOUT_FILE.fullmatch(entry.name) and entry.name not in model_dir.files \
                and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def reorder(model: Path, text: Path, tokens: int = 4096) -> FlashModelDir:
    """Trace activations on `text`, reorder every layer by co-activation, record hot neurons."""
    from llmflash.runtime.engine import Engine

    engine = Engine(model)
    tok = engine.require_tokenizer()
    try:
        ids = tok.encode(Path(text).read_text(errors="replace"))[:tokens]
    except OSError as exc:
        raise LLMFlashError(f"cannot read text {text}: {exc}") from None
    if len(ids) < 16:
        raise LLMFlashError(f"{text} has only {len(ids)} tokens; give at least a few hundred")
    trace = activation_trace(engine, ids)
    orders = [coactivation_order(a) for a in tqdm(trace, desc="order", unit="layer")]
    hot = [hot_neurons(a) for a in trace]
    unions = [window_union(a) for a in trace]
    del engine
    return rewrite_layout(FlashModelDir(model), orders, hot,
                          source=f"{Path(text).name}, {len(ids)} tokens", unions=unions)
