"""A `tokenizers` tokenizer.json rebuilt from a GGUF file's tokenizer.ggml.* metadata.

A GGUF carries no tokenizer.json: only the vocabulary (tokens, scores, token types), the merges of
a byte-level BPE and the special-token ids. Two kinds are rebuilt here, the same way transformers'
GGUF loader does (it is the reference the tests compare against, on the real files):

- `tokenizer.ggml.model = "gpt2"`: byte-level BPE (SmolLM2, Llama 3, Qwen). Merges are in the file;
  the pre-tokenizer split follows `tokenizer.ggml.pre`.
- `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma,
  Phi-3). The file has no merges: SentencePiece merges the adjacent pair whose result scores best,
  which is a BPE whose merges are every split of every token, ordered by the merged token's score
  (Gemma: by the token's position in the file, as its scores do not follow merge order). Spaces
  are spelled "▁"; bytes without a token go through the `<0xNN>` byte tokens.

Token types (llama.cpp's): 3 control -> special added token, 4 user-defined -> added token matched
whole in the raw text, 6 byte. The tokens named by the bos/eos/unk/pad ids are special too.
BOS/EOS are inserted as `tokenizer.ggml.add_bos_token` / `add_eos_token` say (a SentencePiece
vocabulary that does not say adds BOS, as llama.cpp does).

Anything malformed (a missing or mistyped field, lengths that disagree, an id out of range, a
merge that names no token) raises LLMFlashError with one line naming the field and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llmflash.conversion.source import TokenizerSpec
from llmflash.errors import LLMFlashError

# llama.cpp's tokenizer.ggml.token_type values.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_TOKEN_TYPES = {0, 1, 2, 3, 4, 5, 6}

SPACE = "\u2581"  # SentencePiece's spelling of a space

# GPT-2's split regex, as tokenizers' ByteLevel(use_regex=True) applies it.
_PRE_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
# llama.cpp splits every digit off first, then applies the GPT-2 regex (llama-vocab.cpp, the case
# for LLAMA_VOCAB_PRE_TYPE_SMOLLM & co). That is also what SmolLM2's own tokenizer.json does:
# Digits(individual_digits=True) then ByteLevel.
_PRE_DIGITS_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Llama 3's tiktoken-style regex; llama.cpp also sets ignore_merges for it (whole-word vocab hits
# win over merges), as does Llama 3's tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral"}
# Qwen2/Qwen3's split (Qwen2's tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "megrez"}

# Architectures whose SentencePiece vocabulary is spelled and ordered Gemma's way.
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}

Meta = Callable[[str], Any]  # metadata key -> plain Python value, or None when absent


def tokenizer_spec(meta: Meta, arch: str, path: Path) -> TokenizerSpec:
    """The TokenizerSpec (tokenizer.json text, chat template, BOS/EOS) a GGUF's metadata describes."""
    model = meta("tokenizer.ggml.model")
    if model is None:
        raise LLMFlashError(f"no tokenizer in GGUF file {path} (tokenizer.ggml.model missing)")
    tokens = _string_list(meta, "tokenizer.ggml.tokens", path)
    types = meta("tokenizer.ggml.token_type")
    if types is None:
        types = [TOKEN_NORMAL] * len(tokens)
    _check_list(types, len(tokens), "tokenizer.ggml.token_type", path, int)
    bad = next((t for t in types if t not in _TOKEN_TYPES), None)
    if bad is not None:
        raise LLMFlashError(f"GGUF field tokenizer.ggml.token_type has unknown type {bad} in {path}")

    def special(key: str) -> tuple[int | None, str | None]:
        value = meta(f"tokenizer.ggml.{key}")
        if value is None:
            return None, None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
            raise LLMFlashError(
                f"GGUF field tokenizer.ggml.{key} = {value!r} is not a token id "
                f"(vocabulary of {len(tokens)}) in {path}"
            )
        return value, tokens[value]

    bos_id, bos = special("bos_token_id")
    eos_id, eos = special("eos_token_id")
    unk_id, unk = special("unknown_token_id")
    pad_id, pad = special("padding_token_id")
    add_bos = meta("tokenizer.ggml.add_bos_token")
    add_eos = bool(meta("tokenizer.ggml.add_eos_token") or False)

    if model == "gpt2":
        merges = meta("tokenizer.ggml.merges")
        if merges is None:
            raise LLMFlashError(f"byte-level BPE tokenizer without tokenizer.ggml.merges in {path}")
        _check_list(merges, None, "tokenizer.ggml.merges", path, str)
        pre = meta("tokenizer.ggml.pre") or "default"
        tokenizer, pre_used = _byte_level_bpe(tokens, merges, types, pre, path)
        add_bos = bool(add_bos)
        extra = {"gguf_pre_tokenizer": pre, "pre_tokenizer_used": pre_used}
    elif model == "llama":
        tokenizer, kind = _sentencepiece_bpe(meta, tokens, types, arch, unk, path)
        # Specials named by id are special tokens even when not typed control (<unk> is type 2).
        named = [t for t in (bos, eos, unk, pad) if t is not None]
        if kind == "gemma" and "<mask>" in tokens:
            named.append("<mask>")  # GemmaTokenizer's mask token
        _add_specials(tokenizer, named, tokens, types)
        add_bos = True if add_bos is None else bool(add_bos)  # llama.cpp's default for SPM
        extra = {"sentencepiece": kind}
    else:
        raise LLMFlashError(
            f"unsupported tokenizer model {model!r} (tokenizer.ggml.model) in {path}: supported are "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)"
        )
    if add_bos and bos is None:
        add_bos = False  # as transformers: nothing to add
    if add_eos and eos is None:
        add_eos = False
    _set_post_processor(tokenizer, bos if add_bos else None, bos_id, eos if add_eos else None,
                        eos_id, path)
    chat_template = meta("tokenizer.chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise LLMFlashError(f"GGUF field tokenizer.chat_template is not a string in {path}")
    return TokenizerSpec(
        tokenizer_json=tokenizer.to_str(),
        chat_template=chat_template,
        bos_token=bos,
        eos_token=eos,
        extra={"add_bos_token": add_bos, "add_eos_token": add_eos, "pad_token": pad,
               "unk_token": unk, "tokenizer_model": model, **extra},
    )


# ------------------------------------------------------------------------------- validation


def _check_list(value: Any, length: int | None, field: str, path: Path, kind: type) -> None:
    if not isinstance(value, list):
        raise LLMFlashError(f"GGUF field {field} is not an array in {path}")
    if length is not None and len(value) != length:
        raise LLMFlashError(
            f"GGUF field {field} has {len(value)} entries for {length} tokens in {path}"
        )
    ok = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else \
        (lambda v: isinstance(v, kind) and not isinstance(v, bool))
    bad = next((i for i, v in enumerate(value) if not ok(v)), None)
    if bad is not None:
        raise LLMFlashError(
            f"GGUF field {field} entry {bad} is {type(value[bad]).__name__}, not {kind.__name__}, in {path}"
        )


def _string_list(meta: Meta, field: str, path: Path) -> list[str]:
    value = meta(field)
    if value is None:
        raise LLMFlashError(f"GGUF field {field} missing in {path}")
    _check_list(value, None, field, path, str)
    if not value:
        raise LLMFlashError(f"GGUF field {field} is empty in {path}")
    return value


# ----------------------------------------------------------------------- SentencePiece BPE


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, best-scoring merged token first.

    transformers' `generate_merges` with vocab_scores, step for step (the same ties, the same
    stable sorts), so the BPE built from it merges in exactly the order the reference's does.
    """
    merges: list[tuple[str, str, float]] = []
    for merge, score in scores.items():
        local = []
        for i in range(1, len(merge)):
            left, right = merge[:i], merge[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(meta: Meta, tokens: list[str], types: list[int], arch: str, unk: str | None,
                       path: Path) -> tuple[Any, str]:
    """BPE with byte fallback over a SentencePiece vocabulary; returns (tokenizer, kind).

    kind "gemma": spaces are replaced by "▁" in a normalizer and no prefix space is added, tokens
    of 2+ raw spaces are respelled as "▁"s, merges follow file order. kind "phi3": a "▁" prefix
    and the space replacement come from a normalizer. kind "llama": a Metaspace pre-tokenizer that
    prefixes the first word with "▁" unless tokenizer.ggml.add_space_prefix is false.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = "gemma" if arch in _GEMMA_ARCHS else "phi3" if arch == "phi3" else "llama"
    for index, kind_of in enumerate(types):
        if kind_of == TOKEN_BYTE and not _is_byte_token(tokens[index]):
            raise LLMFlashError(
                f"GGUF field tokenizer.ggml.tokens entry {index} {tokens[index]!r} is typed byte "
                f"(tokenizer.ggml.token_type 6) but is not spelled <0xNN> in {path}"
            )
    if kind == "gemma":
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        raw = meta("tokenizer.ggml.scores")
        if raw is None:
            raise LLMFlashError(
                f"GGUF field tokenizer.ggml.scores missing in {path}: a SentencePiece vocabulary "
                "needs its scores to order merges"
            )
        _check_list(raw, len(tokens), "tokenizer.ggml.scores", path, float)
        scores = {t: float(s) for t, s in zip(tokens, raw)}
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_scores(vocab, scores)
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
                         unk_token=unk if kind == "gemma" else None)
    except Exception as exc:
        raise LLMFlashError(f"inconsistent SentencePiece vocabulary (tokenizer.ggml.tokens) in {path}: "
                            f"{exc}") from None
    tokenizer = Tokenizer(bpe)
    strip = True
    if kind == "gemma":
        tokenizer.normalizer = normalizers.Replace(" ", SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        strip = False
    elif kind == "phi3":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                                     normalizers.Replace(" ", SPACE)])
    else:
        prefix = meta("tokenizer.ggml.add_space_prefix")
        strip = prefix is None or bool(prefix)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme="first" if strip else "never", split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, kind


def _is_byte_token(text: str) -> bool:
    if len(text) != 6 or not (text.startswith("<0x") and text.endswith(">")):
        return False
    try:
        int(text[3:5], 16)
    except ValueError:
        return False
    return True


def _add_specials(tokenizer: Any, named: list[str], tokens: list[str], types: list[int]) -> None:
    """Named specials and control tokens as special added tokens; user-defined ones as added tokens.

    A user-defined token is added only when the vocabulary spells it as the file does (Gemma's
    space-run tokens were respelled and are reached through the normalizer instead).
    """
    from tokenizers import AddedToken

    special = list(dict.fromkeys(named + [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL and t]))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = tokenizer.get_vocab()
    user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED and t in vocab]
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


# ----------------------------------------------------------------------- byte-level BPE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies use.

    A GGUF stores byte-level tokens already spelled in it; a token that is not (some files write
    user tokens as raw text) has to be respelled to be reachable by the BPE model.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str,
                    path: Path) -> tuple[Any, str]:
    """The BPE model, pre-tokenizer, decoder and added tokens of a byte-level vocabulary.

    Returns the tokenizer and the name of the pre-tokenizer family used ("digits+gpt2", "gpt2",
    "llama3", "qwen2"); an unknown tokenizer.ggml.pre falls back to GPT-2's split, as transformers
    does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    special: list[Any] = []
    user: list[Any] = []
    for index, (text, kind) in enumerate(zip(tokens, types)):
        in_alphabet = set(text) <= alphabet
        if kind == TOKEN_USER_DEFINED and text:
            # Matched whole in the raw text (as llama.cpp does), so the vocab key stays raw text;
            # ByteLevel decoding passes tokens with non-alphabet characters through as UTF-8.
            key = text
            user.append(AddedToken(text, normalized=False, special=False))
        elif in_alphabet:
            key = text
            if kind == TOKEN_CONTROL and text:
                special.append(AddedToken(text, normalized=False, special=True))
        else:
            # Raw text outside the byte alphabet: respelled so BPE can reach it. A control token
            # here is a llama.cpp mislabel; like transformers, it is not made an added token.
            key = "".join(spelling[b] for b in text.encode("utf-8"))
        vocab.setdefault(key, index)  # on a clash the first id wins; later ones are unreachable

    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise LLMFlashError(f"malformed BPE merge {merge!r} in GGUF field tokenizer.ggml.merges of {path}")
        pairs.append((parts[0], parts[1]))

    if pre in _PRE_LLAMA3 or pre in _PRE_QWEN2:
        family = "llama3" if pre in _PRE_LLAMA3 else "qwen2"
        ignore_merges = family == "llama3"
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    elif pre in _PRE_DIGITS_GPT2:
        family, ignore_merges = "digits+gpt2", False
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    else:
        family, ignore_merges = "gpt2", False
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                 use_regex=True)
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                         fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    except Exception as exc:  # a merge naming a token not in the vocabulary
        raise LLMFlashError(
            f"inconsistent BPE vocabulary/merges (tokenizer.ggml.merges) in {path}: {exc}"
        ) from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    return tokenizer, family


def _set_post_processor(tokenizer: Any, bos: str | None, bos_id: int | None, eos: str | None,
                        eos_id: int | None, path: Path) -> None:
    """BOS/EOS insertion as tokenizer.ggml.add_bos_token / add_eos_token ask for."""
    from tokenizers import processors

    if (bos is not None and bos_id is None) or (eos is not None and eos_id is None):
        raise LLMFlashError(f"add_bos/add_eos set without the token id in {path}")
    first = [t for t in (bos,) if t is not None]
    last = [t for t in (eos,) if t is not None]
    # List form, so a token with a space in it stays one piece of the template.
    single = first + ["$A"] + last
    pair = single + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last]
    special = list(dict.fromkeys((t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None))
    try:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )
    except Exception as exc:  # e.g. a token containing ':' that the template syntax cannot hold
        raise LLMFlashError(f"cannot build the BOS/EOS template for {path}: {exc}") from None
