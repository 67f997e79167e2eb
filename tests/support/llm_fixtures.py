"""Tiny random causal language models, and transformers' greedy generations with
them: the fixtures of Harness's text-generation tests.

Usage: python llm_fixtures.py OUT_DIR

Writes under OUT_DIR one folder per checkpoint, each a Hub repo as
`save_pretrained` writes it (safetensors, config.json, generation_config.json,
tokenizer.json, tokenizer_config.json):

- `llama/`: LlamaForCausalLM, grouped-query attention, `llama3` rope scaling, two
  EOS ids. Its config.json is rewritten in the layout real Llama 3.1 repos have
  (`rope_scaling` and `rope_theta` at the top, `torch_dtype`), so the engine reads
  that layout too; the other folders keep transformers 5's (`rope_parameters`,
  `dtype`).
- `mistral/`: MistralForCausalLM, no sliding window, saved in several shards with
  `model.safetensors.index.json`.
- `qwen2/`: Qwen2ForCausalLM, bias on q/k/v, tied embeddings, rope_theta 1e6.
- `unsupported/`: GPT2LMHeadModel, for the refusal.

Each supported folder has a chat template, kept as the repos it stands for keep
it: llama's (Llama-2-chat's) and mistral's (Mistral-7B-Instruct-v0.2's) under the
`chat_template` key of tokenizer_config.json, qwen2's (ChatML) in
chat_template.jinja; `unsupported/` has none.

And, for each supported folder, `reference.json`: transformers' greedy
generation (f32, eager attention, each prompt alone) for a dozen prompts; under
`chats`, for a few conversations, the template rendered by transformers
(`apply_chat_template(add_generation_prompt=True)`), its ids and the greedy
continuation of them; mistral's also holds under `chat_refusal` the error its
template raises for a system message. Each
model's EOS rows of `lm_head` are a scaled copy of the row of a token its greedy
paths emit, so some generations stop on an EOS id (for llama, on either of its
two) and others run to `max_new_tokens`. OUT_DIR/manifest.json lists the folders.

Deterministic (fixed seeds), offline, and a few seconds on two cores.
"""

import json
import os
import random
import shutil
import sys

import jinja2
import torch

torch.set_num_threads(1)  # tiny matrices: more threads only contend

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

VOCAB = 600
BOS, EOS, PAD, EOT = "<s>", "</s>", "<pad>", "<|eot_id|>"
SPECIALS = [BOS, EOS, PAD, EOT]  # ids 0, 1, 2, 3
MAX_NEW_TOKENS = 24
INIT_STD = 0.25
# The smallest gap allowed between the best and second-best logit at any greedy
# step of a reference, so that an engine within float32 rounding of transformers
# (about 1e-5 here) makes the same choices. The seeds below are ones that give it.
GAP_MIN = 1e-3
# How much an EOS row of lm_head scales the row it copies: where the copied
# token would be the greedy choice (with a positive logit), the EOS id wins.
EOS_ROW_SCALE = 1.05

PROMPTS = [
    "Hello",
    "The cat",
    "Once upon a time, there was a",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "café au lait and a naïve croissant",
    "日本 is a country in Asia, and Tokyo is its capital.",
    "1 2 3 4 5 6 7",
    "def main():\n    print(",
    "Ünïcödé → ✓ 😀 and a résumé",
    "The old river wound through the valley, past the mill and the church, "
    "where the children played every morning before school.",
    "In the small town by the sea, the baker woke before dawn to light the ovens. "
    "By noon the market was full of people, "
    "and the café served coffee to travellers from 日本.",
]


# Chat templates, verbatim from the Hub repos (the same texts as the unit tests of
# src/tasks/generation/chat.rs). The fixtures keep them where those repos do:
# llama's and mistral's in tokenizer_config.json (key `chat_template`), qwen2's in
# chat_template.jinja (transformers 5's layout).
# meta-llama/Llama-2-7b-chat-hf: <<SYS>> in the first turn, `.strip()`.
LLAMA_2_CHAT_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}"
    r"{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}"
    r"{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.2 as released: refuses a system message.
MISTRAL_CHAT_TEMPLATE = (
    r"{{ bos_token }}{% for message in messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if message['role'] == 'user' %}"
    r"{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    r"{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    r"{% endif %}{% endfor %}"
)
# Qwen/Qwen2-7B-Instruct: ChatML, a default system message.
QWEN2_CHAT_TEMPLATE = (
    r"{% for message in messages %}"
    r"{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    r"{% endif %}"
)
CHAT_TEMPLATES = {
    "llama": ("tokenizer_config.json", LLAMA_2_CHAT_TEMPLATE),
    "mistral": ("tokenizer_config.json", MISTRAL_CHAT_TEMPLATE),
    "qwen2": ("chat_template.jinja", QWEN2_CHAT_TEMPLATE),
}
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly."}
MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And the capital of 日本?"},
]
NON_ASCII = [{"role": "user", "content": "Grüße aus Köln — 日本語?"}]
# The conversations of each supported folder's `chats`; and the one mistral's
# template refuses (`chat_refusal`).
CHATS = {
    "llama": [[SYSTEM] + MULTI_TURN, NON_ASCII],
    "mistral": [MULTI_TURN, NON_ASCII],
    "qwen2": [[SYSTEM] + MULTI_TURN, NON_ASCII],
}
CHAT_REFUSALS = {"mistral": [SYSTEM] + MULTI_TURN}


def training_sentences():
    """A few hundred varied sentences, non-ASCII ones among them."""
    rng = random.Random(1234)
    subjects = ["The cat", "A dog", "My friend", "The teacher", "Our neighbour", "The old man",
                "A young woman", "The children", "The engineer", "Her brother", "The bird", "A student"]
    verbs = ["walked to", "looked at", "talked about", "painted", "visited", "remembered",
             "found", "lost", "wrote about", "dreamed of", "cleaned", "built"]
    objects = ["the river", "a small house", "the market", "the blue car", "an old book",
               "the mountain", "a quiet garden", "the city", "the café", "the school",
               "a strange letter", "the train station"]
    tails = ["yesterday.", "this morning.", "in the rain.", "before dinner.", "with great care.",
             "for the first time.", "again and again.", "without a word.", "at noon.", "last summer."]
    fixed = [
        "Once upon a time, there was a princess who lived in a castle.",
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France? Paris is the capital of France.",
        "Tokyo is the capital of 日本, and 日本 is a country in Asia.",
        "She ordered a café au lait and a croissant at the café.",
        "His naïve question made everyone smile.",
        "The résumé listed three jobs and two degrees.",
        "Zoë and Chloë went to the coöperative.",
        "München, Zürich and Köln are cities with umlauts.",
        "El niño comió una manzana en la mañana.",
        "Привет, как дела?",
        "日本語の文章です。",
        "def main():\n    print(\"hello world\")\n",
        "for i in range(10):\n    total += i\n",
        "1 2 3 4 5 6 7 8 9 10",
        "The year 2024 had 366 days.",
        "Emoji are fun 😀 and so are arrows → and checks ✓.",
        "Hello, world! Hello again.",
    ]
    sentences = list(fixed)
    for _ in range(320):
        sentences.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}")
    for _ in range(60):
        words = [rng.choice(objects).split()[-1] for _ in range(rng.randint(3, 8))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return sentences


def make_tokenizer():
    """A byte-level BPE of about VOCAB tokens that puts <s> first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_sentences(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[EOT],
        model_max_length=256,
    )
    ids = {s: fast.convert_tokens_to_ids(s) for s in SPECIALS}
    assert list(ids.values()) == [0, 1, 2, 3], ids
    return fast


def randomize(model, seed):
    """Weights with a larger spread than the default init, so greedy paths vary;
    norms' weights around 1 and biases non-zero so that forgetting them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def greedy(model, ids, eos_ids, pad_id, max_new_tokens):
    """transformers' greedy generation of `ids` alone: the new ids, and the
    smallest gap between the best and second-best logit along the way."""
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids):].tolist()
    gaps = []
    for step in out.logits:
        top = torch.topk(step[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return new, min(gaps)


def pick_eos_sources(paths, count):
    """`count` distinct tokens that greedy paths emit after their first step, in
    some paths but not all (ids >= 4, so no special token): the rows the EOS rows
    copy."""
    seen = {}
    for i, path in enumerate(paths):
        for pos, t in enumerate(path):
            if pos >= 2 and t >= len(SPECIALS):
                seen.setdefault(t, set()).add(i)
    # Tokens in few paths first (a third of them or less), most used among those.
    ranked = sorted(seen.items(), key=lambda kv: (abs(len(kv[1]) - max(2, len(paths) // 4)), kv[0]))
    chosen = []
    for t, where in ranked:
        if all(not (where & seen[c]) for c in chosen):
            chosen.append(t)
        if len(chosen) == count:
            break
    assert len(chosen) == count, f"no {count} tokens to stop on in {paths}"
    return chosen


def build(arch, tokenizer, out_dir, seed):
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        pad_token_id=2,
    )
    if arch == "llama":
        eos_ids = [1, 3]
        config = LlamaConfig(
            **common,
            num_hidden_layers=3,
            eos_token_id=eos_ids,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        cls = LlamaForCausalLM
    elif arch == "mistral":
        eos_ids = [1]
        config = MistralConfig(
            **common,
            num_hidden_layers=2,
            eos_token_id=1,
            tie_word_embeddings=False,
            sliding_window=None,
            rope_theta=10000.0,
        )
        cls = MistralForCausalLM
    elif arch == "qwen2":
        eos_ids = [1]
        config = Qwen2Config(
            **common,
            num_hidden_layers=2,
            eos_token_id=1,
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_theta=1000000.0,
        )
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)

    # Where the greedy paths go without EOS rows, to choose what they copy.
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    paths = [greedy(model, x, [vocab + 1], 2, MAX_NEW_TOKENS)[0] for x in ids]
    sources = pick_eos_sources(paths, len(eos_ids))
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        for eos, src in zip(eos_ids, sources):
            w[eos] = w[src] * EOS_ROW_SCALE

    folder = os.path.join(out_dir, arch)
    gen = GenerationConfig(
        bos_token_id=0,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=2,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.generation_config = gen
    shard = "100KB" if arch == "mistral" else "50GB"
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    if arch == "llama":
        legacy_llama_config(folder)
    add_chat_template(arch, folder)

    # The references, from the folder as saved (what the engine will read).
    saved = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    saved_gen = json.load(open(os.path.join(folder, "generation_config.json")))
    refs = []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        new, gap = greedy(saved, prompt_ids, eos_ids, 2, MAX_NEW_TOKENS)
        refs.append({
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "greedy_ids": new,
            "greedy_text": tokenizer.decode(new, skip_special_tokens=True),
            "max_new_tokens": MAX_NEW_TOKENS,
            "stopped_on_eos": bool(new) and new[-1] in eos_ids,
            "min_logit_gap": gap,
        })
    check(arch, refs, eos_ids)
    chats, refusal = chat_references(arch, folder, saved, tokenizer, eos_ids)
    extra = {"chat_refusal": refusal} if refusal else {}
    json.dump(
        {
            "architecture": cls.__name__,
            "eos_token_ids": eos_ids,
            "bos_token_id": 0,
            "pad_token_id": 2,
            "eos_rows_copy": dict(zip(map(str, eos_ids), sources)),
            "eos_row_scale": EOS_ROW_SCALE,
            "generation_config": saved_gen,
            "dtype": "float32",
            "attn_implementation": "eager",
            "references": refs,
            "chats": chats,
            **extra,
        },
        open(os.path.join(folder, "reference.json"), "w", encoding="utf-8"),
        ensure_ascii=False,
        indent=1,
    )
    return {"folder": arch, "architecture": cls.__name__, "supported": True,
            "stops": sum(r["stopped_on_eos"] for r in refs)}


def add_chat_template(arch, folder):
    """The folder's chat template, where the repos it stands for keep it: a
    `chat_template` key in tokenizer_config.json, or chat_template.jinja."""
    where, template = CHAT_TEMPLATES[arch]
    assert not os.path.exists(os.path.join(folder, "chat_template.jinja"))
    if where == "chat_template.jinja":
        with open(os.path.join(folder, where), "w", encoding="utf-8") as f:
            f.write(template)
        return
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def chat_references(arch, folder, model, tokenizer, eos_ids):
    """For each conversation of CHATS[arch]: the folder's template rendered by
    transformers (the tokenizer read back from the folder) with the assistant's
    turn opened, its ids (`tokenizer(rendered, add_special_tokens=False)`, what
    `apply_chat_template(tokenize=True)` gives) and the model's greedy
    continuation of them, as the prompt references are made. And the error the
    template raises for CHAT_REFUSALS[arch], if any."""
    chat_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert chat_tokenizer.chat_template == CHAT_TEMPLATES[arch][1], arch
    chats = []
    for messages in CHATS[arch]:
        rendered = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = chat_tokenizer(rendered, add_special_tokens=False).input_ids
        applied = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        assert ids == list(applied["input_ids"]), (arch, ids, applied)
        if arch in ("llama", "mistral"):  # the template writes <s> (and </s> after an answer)
            assert ids[0] == 0 and (1 in ids) == any(m["role"] == "assistant" for m in messages), ids
        assert len(ids) + MAX_NEW_TOKENS <= 256, (arch, len(ids))
        new, gap = greedy(model, ids, eos_ids, 2, MAX_NEW_TOKENS)
        assert gap >= GAP_MIN, f"{arch}: a greedy choice after a chat is a near tie: {gap}"
        chats.append({
            "messages": messages,
            "rendered": rendered,
            "ids": ids,
            "greedy_ids": new,
            "greedy_text": tokenizer.decode(new, skip_special_tokens=True),
            "max_new_tokens": MAX_NEW_TOKENS,
            "stopped_on_eos": bool(new) and new[-1] in eos_ids,
            "min_logit_gap": gap,
        })
    refusal = None
    if arch in CHAT_REFUSALS:
        messages = CHAT_REFUSALS[arch]
        try:
            chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.exceptions.TemplateError as e:
            refusal = {"messages": messages, "error": str(e)}
        assert refusal, f"{arch}: the template took {messages}"
    return chats, refusal


def legacy_llama_config(folder):
    """config.json as real Llama 3.1 repos have it: `rope_theta` and
    `rope_scaling` at the top rather than transformers 5's `rope_parameters`,
    and `torch_dtype` rather than `dtype`."""
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    json.dump(config, open(path, "w"), indent=2, sort_keys=True)


def check(arch, refs, eos_ids):
    lengths = [len(r["prompt_ids"]) for r in refs]
    assert min(lengths) <= 3 and max(lengths) >= 70, (arch, lengths)
    paths = {tuple(r["greedy_ids"]) for r in refs}
    assert len(paths) == len(refs), f"{arch}: greedy paths repeat"
    for r in refs:
        assert len(set(r["greedy_ids"])) >= min(4, len(r["greedy_ids"])), (arch, r)
    stops = [r["greedy_ids"][-1] for r in refs if r["stopped_on_eos"]]
    assert set(stops) == set(eos_ids), f"{arch}: stops on {stops}, want each of {eos_ids}"
    assert any(not r["stopped_on_eos"] for r in refs), f"{arch}: every generation stops early"
    gaps = [r["min_logit_gap"] for r in refs]
    assert min(gaps) >= GAP_MIN, f"{arch}: a greedy choice is a near tie: {gaps}"


def build_unsupported(tokenizer, out_dir, seed):
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    folder = os.path.join(out_dir, "unsupported")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"folder": "unsupported", "architecture": "GPT2LMHeadModel", "supported": False}


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for name in ["llama", "mistral", "qwen2", "unsupported"]:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    tokenizer = make_tokenizer()
    entries = [
        build("llama", tokenizer, out_dir, 11),
        build("mistral", tokenizer, out_dir, 12),
        build("qwen2", tokenizer, out_dir, 13),
        build_unsupported(tokenizer, out_dir, 4),
    ]
    json.dump({"folders": entries, "vocab_size": len(tokenizer), "max_new_tokens": MAX_NEW_TOKENS},
              open(os.path.join(out_dir, "manifest.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
