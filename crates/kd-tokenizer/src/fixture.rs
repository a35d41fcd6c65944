//! A deterministic 300-token tokenizer for tests across the workspace.

use crate::byte_level::byte_to_char;
use crate::tokenizer::Tokenizer;

/// SmolLM2-Instruct's chat template (ChatML with a default system prompt),
/// verbatim from the teacher GGUF's `tokenizer.chat_template`.
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Merge rules of the fixture, in rank order (vocabulary form: `Ġ` is a space, `Ċ` a newline).
const TINY_MERGES: [(&str, &str); 41] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("o", "r"),
    ("Ġ", "w"),
    ("Ġ", "o"),
    ("Ġ", "c"),
    ("i", "s"),
    ("e", "s"),
    ("a", "n"),
    ("i", "t"),
    ("Ġ", "b"),
    ("Ġ", "f"),
    ("Ġ", "p"),
    ("Ġ", "m"),
    ("a", "l"),
    ("a", "r"),
    ("in", "g"),
    ("Ġ", "d"),
    ("e", "d"),
    ("o", "u"),
    ("l", "e"),
    ("Ġ", "h"),
    ("Ġ", "i"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġo", "f"),
    ("Ġt", "o"),
    ("Ġi", "s"),
    ("Ġ", "Ġ"),
    ("Ċ", "Ċ"),
    ("u", "s"),
    ("a", "s"),
];

impl Tokenizer {
    /// Test fixture: a deterministic 300-token byte-level BPE tokenizer shaped
    /// like SmolLM2's, for tests that must not need the real teacher.
    ///
    /// * ids 0, 1, 2: control tokens `<|endoftext|>`, `<|im_start|>` (BOS),
    ///   `<|im_end|>` (EOS and padding), as in SmolLM2;
    /// * ids 3..=258: the 256 single bytes, in byte order (byte `b` is id `b + 3`);
    /// * ids 259..=299: 41 merges of common English pairs (`Ġt`, `he`, `Ġthe`, `Ġand`, ...).
    ///
    /// Pre-tokenizer `smollm`; chat template [`SMOLLM2_CHAT_TEMPLATE`]. Every
    /// string round-trips through `encode` / `decode`.
    pub fn tiny_for_tests() -> Tokenizer {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .map(String::from)
            .to_vec();
        tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
        let merges: Vec<(String, String)> = TINY_MERGES
            .iter()
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect();
        tokens.extend(merges.iter().map(|(l, r)| format!("{l}{r}")));
        Tokenizer::from_parts(tokens, merges, &[0, 1, 2], "smollm")
            .and_then(|t| t.with_bos(Some(1)))
            .and_then(|t| t.with_eos(Some(2)))
            .and_then(|t| t.with_pad(Some(2)))
            .map(|t| t.with_chat_template(Some(SMOLLM2_CHAT_TEMPLATE.to_string())))
            .expect("the fixture vocabulary is consistent")
    }
}
