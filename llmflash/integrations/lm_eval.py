"""lm-evaluation-harness model `llmflash`: zero-shot tasks over the llmflash API.

    pip install 'llmflash[eval]'
    python -m llmflash.integrations.lm_eval --model llmflash \\
        --model_args pretrained=MODEL_DIR,mode=dense,sparsity=predictor,density=0.5 --tasks piqa,arc_easy

Importing this module registers the model with lm-eval (`@register_model("llmflash")`); lm-eval
0.4 has no plugin discovery, so its own `lm_eval` command does not know the name: the module's
`python -m` entry point imports it and then runs lm-eval's command line unchanged (every lm-eval
flag works). From Python: `import llmflash.integrations.lm_eval` then
`lm_eval.simple_evaluate(model="llmflash", model_args=...)`.

model_args: pretrained (or path) = a converted model directory; mode, memory, window, sparsity,
density, dtype, threads, reader, pin, context, predictor_cost, lookahead, reads = llmflash.load's
arguments;
add_bos_token (default: what the tokenizer does by default, as lm-eval's "hf" model); max_length
(default: the model's context). Likelihoods come from
Model.logits over the whole sequence: in dense mode with a selector (sparsity=predictor|magnitude|
exact) every token sees only its selected neurons, as when it is decoded alone, which is the
paper's sparse-accuracy setting; flash mode's multi-token passes compute the exact FFN, so use
mode=dense with a sparsity for accuracy comparisons and flash mode for generate_until.
Tokenization follows lm-eval's "hf" model (TemplateLM: context and continuation encoded together,
no special tokens), so scores match transformers on the same weights.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only into an empty registry: load them first)
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

LOAD_ARGS = ("mode", "memory", "window", "sparsity", "density", "dtype", "threads", "reader", "pin", "context",
             "predictor_cost", "lookahead", "reads")


@register_model("llmflash")
class LLMFlashLM(TemplateLM):
    """lm-eval's LM interface over `llmflash.load(...)`."""

    backend = "causal"

    def __init__(self, pretrained: str | None = None, path: str | None = None, add_bos_token: bool | None = None,
                 max_length: int | None = None, **kwargs: Any):
        super().__init__()
        import llmflash

        model_dir = pretrained or path
        if model_dir is None:
            raise ValueError("llmflash: give the converted model directory as pretrained=DIR in --model_args")
        load = {k: kwargs.pop(k) for k in LOAD_ARGS if kwargs.get(k) is not None}
        for key in ("memory", "sparsity", "mode", "dtype", "reader", "predictor_cost", "reads"):  # "50" -> 50
            if key in load:
                load[key] = str(load[key])
        if "lookahead" in load:  # lm-eval passes True/False as bools, anything else as given
            load["lookahead"] = str(load["lookahead"]).lower() in ("1", "true", "yes", "on")
        # batch_size, max_batch_size, device ... come from lm-eval's own flags: one sequence at a time on CPU
        self.model = llmflash.load(model_dir, **load)
        self.tok = self.model.require_tokenizer()
        self.add_bos_token = add_bos_token
        # Model.logits takes at most context - 1 tokens (one position is left to predict)
        self._max_length = int(max_length) if max_length else self.model.context_length - 1

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        ids = self.tok.eos_ids or list(self.model.config.eos_token_id or [])
        return int(ids[0])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tok.bos_token and self.tok.tk.token_to_id(self.tok.bos_token)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the "hf" model: the flag if given, else add_bos_token if set, else the tokenizer's own
        default (its post-processor), except for text that already starts with the BOS token."""
        add = add_special_tokens
        if add is None:
            add = True if self.add_bos_token is None else self.add_bos_token
            bos = self.tok.decode([self.prefix_token_id], skip_special_tokens=False)
            if bos and string.startswith(bos):
                add = False
        return self.tok.encode(string, add_special_tokens=add)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of `continuation` after `context`, and whether it is the greedy one."""
        import torch

        ids = (context + continuation)[-(self.max_length + 1):][:-1]
        logits = self.model.logits(ids).float()
        logprobs = torch.log_softmax(logits[-len(continuation):], dim=-1)
        target = torch.tensor(continuation, dtype=torch.long)
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return float(logprobs.gather(1, target[:, None]).sum()), greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in tqdm(requests, desc="llmflash loglikelihood", disable=disable_tqdm):
            answer = self._score(context, continuation)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of the context (as the "hf" model)."""
        out = []
        for (string,) in tqdm([r.args for r in requests], desc="llmflash rolling", disable=disable_tqdm):
            windows = map(utils.make_disjoint_window,
                          utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                          prefix_token=self.prefix_token_id,
                                                          max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(context, continuation)[0] for context, continuation in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) generation cut at the first `until` string."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="llmflash generate",
                                        disable=disable_tqdm):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
            top_p = float(kwargs.pop("top_p", 1.0)) if do_sample else 1.0
            seed = kwargs.pop("seed", None)
            max_gen = max(1, min(max_gen, self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            if not ids:
                ids = [self.prefix_token_id]
            generation = self.model.generate(ids, max_gen, temperature=temperature, top_p=top_p, seed=seed,
                                             stop=until)
            # decoded whole and cut at each stop string, as the "hf" model does (a character cut short
            # by max_gen_toks then reads as U+FFFD there too)
            text = self.tok.decode(generation.token_ids)
            for term in until:
                if term:
                    text = text.split(term)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None


def main() -> None:
    """lm-eval's command line with the `llmflash` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
