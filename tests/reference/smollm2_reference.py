#!/usr/bin/env python3
"""Writes tests/reference/smollm2-135m-instruct-q4_1/*.jsonl: the real teacher's tokenizer ids,
chat renderings, greedy continuations and top-20 log-probs, computed by implementations other
than this project's (Python transformers on the GGUF dequantized to float32, with log_softmax in
float64; llama.cpp through llama-cpp-python for the tokenizer cross-check).

Run by hand when the teacher or the cases change (the JSONL files are committed):

    ./scripts/setup.sh                                   # the teacher into data/models/
    pip install torch transformers gguf llama-cpp-python
    python3 tests/reference/smollm2_reference.py

Measured with transformers 4.5x and llama-cpp-python 0.3.36. The teacher's chat template adds
its default system message when a conversation has none; the GGUF says add_bos_token = false,
so no BOS is added.
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
MODELS = os.path.join(ROOT, "data", "models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(HERE, "smollm2-135m-instruct-q4_1")
TOP = 20
MAX_NEW = 32

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nmany",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀👩\u200d👩\u200d👧\u200d👦 and symbols ±≠≤≥∞",
    "def f(x):\n    return x**2  # square\n",
    'fn main() { println!("{}", 42); }',
    "Numbers: 3.14159, 1,000,000 and 2026-11-27",
    "don't won't it's we'll they're I'M",
    "a" * 40,
    "   ",
    "",
    "<|im_start|>user\nhi<|im_end|>",
    "URL: https://example.com/path?q=1&r=two#frag",
    "mixed CASE and camelCaseWords snake_case_words",
]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COLORS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three primary colors."},
]
SKY = [
    {"role": "user", "content": "Explain why the sky is blue in two sentences."},
    {
        "role": "assistant",
        "content": "Sunlight is scattered by the molecules in the air, and blue light is "
        "scattered much more than red light because it has a shorter wavelength. So when we "
        "look up, we see blue light coming from every direction.",
    },
]
HAIKU = [{"role": "user", "content": "Write a haiku about autumn."}]
FRENCH = [{"role": "user", "content": "Translate to French: The cat sleeps on the warm window sill."}]

# (messages, add_generation_prompt) rendered by the template.
CHATS = [(FRANCE, True), (FRANCE, False), (COLORS, True), (COLORS, False), (SKY, False),
         (HAIKU, True), (HAIKU, False), (FRENCH, True), (FRENCH, False)]
# Greedy prompts; the log-prob cases are these with their greedy answers, and SKY with its
# given answer (in that order: case0 FRANCE, case1 COLORS, case2 SKY, case3 HAIKU, case4 FRENCH).
GREEDY = [FRANCE, COLORS, HAIKU, FRENCH]


def write(name, rows):
    with open(os.path.join(OUT, name), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, torch_dtype=torch.float32)
    model.eval()
    from llama_cpp import Llama

    cpp = Llama(os.path.join(MODELS, GGUF), vocab_only=True, verbose=False)

    rows = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        theirs = cpp.tokenize(text.encode(), add_bos=False, special=True)
        rows.append({"text": text, "ids": ids, "llama_cpp_agrees": list(theirs) == ids})
    write("tokenizer-cases.jsonl", rows)

    def render(messages, gen):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        return text, tok.encode(text, add_special_tokens=False)

    write("chat-template-cases.jsonl", [
        {"messages": m, "add_generation_prompt": g, "rendered": render(m, g)[0], "ids": render(m, g)[1]}
        for m, g in CHATS
    ])

    end = tok.convert_tokens_to_ids("<|im_end|>")
    greedy = []
    for messages in GREEDY:
        prompt = render(messages, True)[1]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=end, pad_token_id=end)
        ids = out[0, len(prompt):].tolist()
        greedy.append({"messages": messages, "prompt_ids": prompt, "greedy_ids": ids,
                       "text": tok.decode(ids)})
    write("greedy-cases.jsonl", greedy)

    sequences = [(g["prompt_ids"], g["prompt_ids"] + g["greedy_ids"]) for g in greedy]
    sky = (render(SKY[:1], True)[1], render(SKY, False)[1])
    sequences.insert(2, sky)
    cases = []
    for i, (prompt, ids) in enumerate(sequences):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        positions = []
        for t in range(len(prompt) - 1, len(ids) - 1):
            top = torch.topk(lp[t], TOP)
            positions.append({"t": t, "next": ids[t + 1], "next_logprob": lp[t, ids[t + 1]].item(),
                              "top_ids": top.indices.tolist(), "top_logprobs": top.values.tolist()})
        cases.append({"id": f"case{i}", "input_ids": ids, "prompt_len": len(prompt),
                      "positions": positions})
    write("teacher-logprobs.jsonl", cases)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
