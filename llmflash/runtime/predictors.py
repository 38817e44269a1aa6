"""Activation predictors (docs/PAPER.md §3): which FFN neurons of a layer matter for an input.

Two kinds, stored in the same file (`kind` in its meta):

* "lowrank" (the paper's): per layer d_model -> r -> d_ffn, sigmoid, described below;
* "quant": low-bit (GPTQ, 2-4 bits) copies of the layer's gate and up rows (quant.py); the score of a
  neuron is |act(g^) * u^| from the estimates g^ = Q_g x, u^ = Q_u x, the same nonlinear form as the
  magnitude that defines "active" for SwiGLU models, which a linear map + sigmoid cannot express
  (|u| is sign-symmetric in x). For ReLU models the score is the estimated pre-activation.
  Nothing is trained by gradient descent: GPTQ quantizes against the second moment of the layer's
  calibration FFN inputs, and the decision threshold is tuned as for the low-rank kind. The default
  kind unless a rank is given (see resolve_kind).

Low-rank kind:

A layer's predictor sees that layer's FFN input x (the post-attention norm output) and scores every
neuron: z = B (A x + a) + b, p = sigmoid(z). It is trained on the dense model's own activations:

* labels: activation != 0 for ReLU / FATReLU (FATReLU's threshold is inside the activation), and
  for other activations (SwiGLU, GeGLU) the calibrated magnitude criterion: |act(gate) * up| > t_l
  (or |act(gate)| > t_l, the CATS variant), t_l reaching the requested sparsity in layer l;
* loss: binary cross-entropy with positives and negatives weighted to equal total weight
  (0.5 / p and 0.5 / (1 - p), p = the layer's positive rate);
* inputs are standardised per channel during training; the scaling is folded into A and a after.

The decision threshold is tuned per layer on held-out calibration tokens: the lowest score that
keeps `target_recall` of the truly active neurons (ReLU models), or the score that selects a
`budget` fraction of the neurons (non-ReLU models, where "active" is a top-fraction by magnitude
and what matters is how much is computed). The rank is raised (doubled) for a layer whose measured
result falls short: selection above `max_selected_ratio` x the active set (ReLU) or recall below
`min_recall` (budget mode), as long as the predictors stay within `size_budget` of the model size.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from llmflash.runtime.ffn import activate
from llmflash.errors import LLMFlashError
from llmflash.runtime import lowbit as quant
from llmflash.runtime.layer_weights import RELU_ACTS
from llmflash.format.sparsity_store import PREDICTORS_FILE, SparsityStore
from llmflash.format.layout import FlashModelDir

STORE_DTYPE = torch.float16
BUDGET_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LAYOUT = 2  # predictors.safetensors layout: 1 = low-rank only (no "layout" in meta), 2 = kind in meta
KINDS = ("lowrank", "quant")
# quant kind, automatic bit widths (gate, up): the most bits that fit the size budget
AUTO_BITS = ((4, 4), (4, 3), (3, 3), (3, 2), (2, 2), (2, 1), (1, 1))
LOG_FLOOR = 1e-30


INT4_GROUP = 64  # columns per scale group of torch's packed int4 kernel (one row step repeated)


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class LowBitMatrix:
    """One packed low-bit matrix [N, d] and the fastest way this build of torch multiplies by it.

    Codes of up to 4 bits go into torch's packed-int4 CPU kernel (the one int4 weight-only
    quantization uses), which multiplies without materialising the weights: measured 0.05-0.09 ms
    per SmolLM2 matrix and token against 1-1.5 ms to dequantize by table lookup and multiply in
    float32, at a relative error of ~0.5% of the largest output (bfloat16 activations and scales).
    The kernel stores 4 bits per weight, so a 2- or 3-bit matrix takes 4 bits in DRAM (`nbytes`
    says so). Elsewhere the table-lookup dequantization of quant.py is used.
    """

    def __init__(self, packed: list[torch.Tensor], step: torch.Tensor, bits: int, d: int, dtype: torch.dtype):
        self.bits, self.d, self.dtype = bits, d, dtype
        self.rows = int(step.shape[0])
        self.stored_bytes = sum(t.numel() for t in packed) + 2 * step.numel()
        self.w4 = self.scales = None
        if bits <= 4 and d % INT4_GROUP == 0 and int4_kernel_available():
            codes = quant.unpack(packed, bits, d)  # int32 [N, d], values < 2**bits <= 16
            # the kernel computes (code - 8) * scale + zero; ours is (code - (2**bits - 1) / 2) * step
            step32 = step.float()
            zero = (8 - (2 ** bits - 1) / 2) * step32
            self.w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            self.scales = (torch.stack([step32, zero], -1)[None].expand(d // INT4_GROUP, -1, -1)
                           .to(torch.bfloat16).contiguous())
            self.packed, self.step = [], None
        else:
            self.packed, self.step = packed, step.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, d] -> x @ W^T [M, N] in self.dtype."""
        if self.w4 is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.d).to(torch.bfloat16).contiguous(), self.w4, INT4_GROUP, self.scales)
            return y.to(self.dtype)
        return F.linear(x.to(self.dtype), quant.dequantize(self.packed, self.step, self.bits, self.d, self.dtype))

    def tensors(self) -> list[torch.Tensor]:
        if self.w4 is not None:
            return [self.w4, self.scales]
        return [*self.packed, self.step]


class QuantLayer:
    """One layer of a quant predictor: low-bit gate (or fc1) and up rows, and their biases."""

    def __init__(self, t: dict[str, torch.Tensor], bits: tuple[int, int], d: int, dtype: torch.dtype):
        self.bits = bits
        self.d = d
        self.dtype = dtype
        nf = (len(quant.fields(bits[0])), len(quant.fields(bits[1])) if bits[1] else 0)
        self.gate = LowBitMatrix([t[f"qg.{i}"] for i in range(nf[0])], t["sg"], bits[0], d, dtype)
        self.bg = t["bg"].to(dtype) if "bg" in t else None
        self.up = (LowBitMatrix([t[f"qu.{i}"] for i in range(nf[1])], t["su"], bits[1], d, dtype)
                   if bits[1] else None)
        self.bu = t["bu"].to(dtype) if bits[1] and "bu" in t else None

    def estimates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.gate.matmul(x)
        if self.bg is not None:
            g = g + self.bg
        if self.up is None:
            return g, None
        u = self.up.matmul(x)
        return g, u if self.bu is None else u + self.bu

    def tensors(self):
        parts = self.gate.tensors() + (self.up.tensors() if self.up is not None else [])
        return parts + [t for t in (self.bg, self.bu) if t is not None]

    def stored_nbytes(self) -> int:
        biases = sum(t.numel() for t in (self.bg, self.bu) if t is not None)
        return self.gate.stored_bytes + (self.up.stored_bytes if self.up is not None else 0) + 2 * biases


class PredictorSet:
    """All layers' predictors, resident in DRAM, with their tuned decision thresholds.

    `logits(layer, x)` is the score that runtime.selectors.PredictorSelector compares with the
    layer's threshold (selected where score >= threshold): the low-rank logit z, or for the quant kind the log of
    the estimated magnitude (non-ReLU) / the estimated pre-activation minus the activation
    threshold (ReLU)."""

    def __init__(self, A: list[torch.Tensor], a: list[torch.Tensor], B: list[torch.Tensor],
                 b: list[torch.Tensor], z_threshold: list[float], meta: dict,
                 dtype: torch.dtype = torch.float32, quant_layers: list[QuantLayer] | None = None):
        self.A = [t.to(dtype) for t in A]
        self.a = [t.to(dtype) for t in a]
        self.B = [t.to(dtype) for t in B]
        self.b = [t.to(dtype) for t in b]
        self.q = quant_layers
        self.kind = "quant" if quant_layers is not None else "lowrank"
        self.z_threshold = list(z_threshold)
        self.meta = meta
        self.dtype = dtype
        self.hidden_act = meta.get("hidden_act", "none")
        self.activation = meta.get("activation", "silu")
        self.act_threshold = float(meta.get("act_threshold", 0.0))
        self.criterion = meta.get("criterion") or "glu"

    # -- loading ---------------------------------------------------------------------------------
    def use_budget(self, budget: float) -> None:
        """Switch every layer's decision threshold to the one that selected `budget` of the neurons
        on held-out calibration tokens (budgets of BUDGET_GRID only)."""
        key = f"{budget:.2f}"
        try:
            self.z_threshold = [float(v["z_by_budget"][key]) for v in self.meta["validation"]]
        except KeyError:
            raise LLMFlashError(f"no thresholds for budget {budget}; choose one of "
                                f"{', '.join(f'{q:.1f}' for q in BUDGET_GRID)}") from None

    @classmethod
    def load(cls, model_dir: FlashModelDir, dtype: torch.dtype = torch.float32) -> "PredictorSet":
        store = SparsityStore(model_dir)
        tensors, meta = store.read_tensors(PREDICTORS_FILE)
        file = store.path / PREDICTORS_FILE
        layout = meta.get("layout", 1)
        kind = meta.get("kind", "lowrank")
        if not isinstance(layout, int) or layout > LAYOUT or kind not in KINDS:
            raise LLMFlashError(f"{file} has predictor layout {layout!r} / kind {kind!r}, which this llmflash "
                                f"does not read (layout <= {LAYOUT}, kinds {', '.join(KINDS)}); "
                                "run `llmflash train-predictors` again")
        L = model_dir.config.num_layers
        d = model_dir.config.hidden_size
        try:
            thresholds = [float(t) for t in meta["z_threshold"]]
            if kind == "quant":
                bits = [tuple(v) for v in meta["bits"]]
                layers = []
                for l in range(L):
                    pre = f"layers.{l}."
                    t = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
                    layers.append(QuantLayer(t, bits[l], d, dtype))
                    if layers[-1].gate.rows != model_dir.layers[l].neurons:
                        raise LLMFlashError(f"{file} layer {l} has the wrong shape for {model_dir.path}")
                meta.setdefault("activation", model_dir.config.hidden_act)
                meta.setdefault("act_threshold", model_dir.config.act_threshold)
                return cls([], [], [], [], thresholds, meta, dtype, quant_layers=layers)
            parts = [[tensors[f"layers.{l}.{n}"] for l in range(L)] for n in ("A", "a", "B", "b")]
        except KeyError as exc:
            raise LLMFlashError(f"{file} lacks {exc}; run `llmflash calibrate`") from None
        for l in range(L):
            if parts[2][l].shape[0] != model_dir.layers[l].neurons or parts[0][l].shape[1] != d:
                raise LLMFlashError(f"{file} layer {l} has the wrong shape for {model_dir.path}")
        return cls(*parts, thresholds, meta, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.q) if self.q is not None else len(self.A)

    def ranks(self) -> list[int | None]:
        """Per-layer rank (low-rank kind; None for the quant kind)."""
        if self.q is not None:
            return [None] * len(self.q)
        return [int(t.shape[0]) for t in self.A]

    def describe(self, layer: int) -> str:
        """Short per-layer size label: "r64" or "q4/3" (gate / up bits)."""
        if self.q is not None:
            g, u = self.q[layer].bits
            return f"q{g}/{u}" if u else f"q{g}"
        return f"r{self.A[layer].shape[0]}"

    # -- inference -------------------------------------------------------------------------------
    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.q is not None:
            return quant_score(self.q[layer].estimates(x), self.activation, self.act_threshold, self.criterion)
        h = F.linear(x, self.A[layer], self.a[layer])
        if self.hidden_act == "relu":
            h = F.relu(h)
        return F.linear(h, self.B[layer], self.b[layer])

    def probabilities(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted probability that each neuron is active: [T, n_neurons] (neuron order).
        Quant kind: sigmoid of the score relative to the layer's threshold (0.5 at the threshold)."""
        if self.q is not None:
            return torch.sigmoid(self.logits(layer, x) - self.z_threshold[layer])
        return torch.sigmoid(self.logits(layer, x))

    def nbytes(self) -> int:
        """Bytes held resident (low-rank: in the compute dtype the set was loaded with; quant: the
        codes as the int4 kernel holds them (or as stored, where it is missing), with scales and
        biases)."""
        if self.q is not None:
            return sum(t.numel() * t.element_size() for ql in self.q for t in ql.tensors())
        return sum(t.numel() * t.element_size() for ts in (self.A, self.a, self.B, self.b) for t in ts)

    def stored_nbytes(self) -> int:
        """Bytes of the weights as stored (float16, packed codes for the quant kind)."""
        if self.q is not None:
            return sum(ql.stored_nbytes() for ql in self.q)
        return sum(t.numel() for ts in (self.A, self.a, self.B, self.b) for t in ts) * 2


def quant_score(est: tuple[torch.Tensor, torch.Tensor | None], act: str, act_threshold: float,
                criterion: str) -> torch.Tensor:
    """Score of the quant kind from the estimates (g^, u^ or None): ReLU / FATReLU: g^ - threshold
    (active where > 0); otherwise log |act(g^) * u^| (glu) or log |act(g^)| (cats, or no up)."""
    g, u = est
    if act in RELU_ACTS:
        return g - (act_threshold if act == "fatrelu" else 0.0)
    a = activate(g, act, act_threshold)
    if u is not None and criterion == "glu":
        a = a * u
    return torch.log(a.abs().clamp_min(LOG_FLOOR))


