#!/usr/bin/env python3
"""Writes crates/kd-tokenizer/tests/data/chat_reference.json: chat templates of several model
families rendered by `transformers` (`apply_chat_template(..., tokenize=False)`) on a set of
conversations, with and without the generation prompt, including the conversations a
template refuses (`raise_exception`) with its message. The tokenizer tests render the same
with our template engine and compare strings.

Needs transformers and the tokenizer files of scripts/fetch_tokenizers.sh (run by hand; the
JSON is committed):

    ./scripts/fetch_tokenizers.sh
    python3 scripts/chat_reference.py

Templates: Llama 2 Chat (meta-llama/Llama-2-7b-chat-hf's, `raise_exception`), Llama 3
Instruct and Qwen3 (from their tokenizer_config.json: namespaces, loop controls, string
methods), and Llama 3.1's (`strftime_now`, `tojson`; rendered with a fixed `date_string` so the
reference does not depend on the day).
"""
import json
import os
import sys

import transformers
from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOK = os.path.join(ROOT, "data", "tokenizers")

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Llama 3.1 Instruct's template without its tool-calling branches (which need `tools`),
# keeping what every plain conversation goes through: the date from `strftime_now` unless
# `date_string` is given, `tojson`-free system header, and `| trim`.
LLAMA31 = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Name three colours.  "}],
    [{"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write `print(\"héllo\")` in Python.\n\nThanks 🙂"}],
    [{"role": "system", "content": "Answer in JSON: {\"a\": [1, 2]}"},
     {"role": "user", "content": "東京?"},
     {"role": "assistant", "content": "<think>\nplace\n</think>\n\nJapan's capital."}],
    # Two user turns in a row: Llama 2's template refuses this.
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
]


def render(tok, template, conv, gen, **kw):
    try:
        out = tok.apply_chat_template(conv, chat_template=template, tokenize=False,
                                      add_generation_prompt=gen, **kw)
        return {"rendered": out}
    except Exception as e:  # raise_exception surfaces as a TemplateError
        return {"error": str(e)}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        ROOT, "crates", "kd-tokenizer", "tests", "data", "chat_reference.json")
    families = []
    for name, tok_dir, template, kw in [
        ("llama2-chat", "llama2", LLAMA2, {}),
        ("llama3-instruct", "llama3", None, {}),
        ("llama3.1-instruct", "llama3", LLAMA31, {"date_string": "30 Nov 2026"}),
        ("qwen3", "qwen3", None, {}),
    ]:
        tok = AutoTokenizer.from_pretrained(os.path.join(TOK, tok_dir))
        source = template or tok.chat_template
        cases = []
        for conv in CONVERSATIONS:
            for gen in (True, False):
                cases.append(dict(messages=conv, add_generation_prompt=gen,
                                  **render(tok, source, conv, gen, **kw)))
        families.append(dict(name=name, template=source, bos_token=tok.bos_token or "",
                             eos_token=tok.eos_token or "", variables=kw, cases=cases))
    with open(out, "w") as f:
        json.dump(dict(generated_by="scripts/chat_reference.py",
                       transformers=transformers.__version__, families=families),
                  f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {sum(len(f['cases']) for f in families)} renderings to {out}")


if __name__ == "__main__":
    main()
