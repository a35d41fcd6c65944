//! SentencePiece-style BPE as `tokenizer.json` gives it (Llama 2, Mistral, TinyLlama): spaces
//! become `▁`, a `▁` is prepended to the text, there is no pre-tokenization into words, merges
//! run over characters, and a character the vocabulary lacks falls back to its UTF-8 bytes
//! (`<0x41>` tokens, `byte_fallback`).
//!
//! Two spellings are read, as `tokenizers` writes them: the normalizers
//! `Sequence[Prepend("▁"), Replace(" ", "▁")]` with no pre-tokenizer (newer conversions), and
//! a `Metaspace` pre-tokenizer (`replacement` `▁`, `prepend_scheme` `always`/`first`/`never`,
//! `split`) with no normalizer (older ones). Either way, text is prepared per segment between
//! special tokens, as `tokenizers` normalizes and pre-tokenizes each such segment.

use serde_json::{Value, json};

use crate::error::{Error, Result};

const SPACE: char = '\u{2581}';

/// Where `▁` is prepended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prepend {
    /// To every segment between special tokens (the `Prepend` normalizer; Metaspace `always`).
    Always,
    /// Only to a segment that starts the text (Metaspace `first`).
    First,
    Never,
}

/// How a SentencePiece-style `tokenizer.json` prepares text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpForm {
    pub(crate) prepend: Prepend,
    /// Metaspace `split`: words start at each `▁`.
    pub(crate) split: bool,
    /// Spelled as normalizers rather than as a Metaspace pre-tokenizer.
    pub(crate) as_normalizer: bool,
    /// The unknown token, used where a byte has no token either.
    pub(crate) unk: Option<String>,
}

fn unsupported(what: String) -> Error {
    Error::Unsupported { what }
}

impl SpForm {
    /// The form of a `tokenizer.json` whose model has `byte_fallback`; anything else in its
    /// normalizer or pre-tokenizer is refused naming it.
    pub(crate) fn from_json(root: &Value) -> Result<SpForm> {
        let model = &root["model"];
        let unk = match model.get("unk_token") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(Error::wrong_type("model.unk_token", "a string")),
        };
        let normalizer = root.get("normalizer").filter(|v| !v.is_null());
        let pre = root.get("pre_tokenizer").filter(|v| !v.is_null());
        let ty = |v: &Value| {
            v.get("type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        match (normalizer, pre) {
            (Some(n), None) => {
                let list = match n.get("normalizers").and_then(Value::as_array) {
                    Some(l) if ty(n) == "Sequence" => l.clone(),
                    _ => vec![n.clone()],
                };
                let mut prepend = Prepend::Never;
                let mut replaced = false;
                for m in &list {
                    match ty(m).as_str() {
                        "Prepend" if m["prepend"] == json!(SPACE.to_string()) && !replaced => {
                            prepend = Prepend::Always;
                        }
                        "Replace"
                            if m["pattern"] == json!({"String": " "})
                                && m["content"] == json!(SPACE.to_string()) =>
                        {
                            replaced = true;
                        }
                        other => {
                            return Err(unsupported(format!(
                                "normalizer `{other}` {m} in a SentencePiece-style tokenizer \
                                 (implemented: Prepend \"▁\" then Replace \" \" → \"▁\")"
                            )));
                        }
                    }
                }
                if !replaced {
                    return Err(unsupported(
                        "a SentencePiece-style normalizer without Replace \" \" → \"▁\"".into(),
                    ));
                }
                Ok(SpForm {
                    prepend,
                    split: false,
                    as_normalizer: true,
                    unk,
                })
            }
            (None, Some(p)) if ty(p) == "Metaspace" => {
                if p.get("replacement").and_then(Value::as_str) != Some("\u{2581}") {
                    return Err(unsupported(format!(
                        "`pre_tokenizer.replacement` {} (only \"▁\")",
                        p["replacement"]
                    )));
                }
                let prepend = match p.get("prepend_scheme").and_then(Value::as_str) {
                    Some("always") => Prepend::Always,
                    Some("first") => Prepend::First,
                    Some("never") => Prepend::Never,
                    None => match p.get("add_prefix_space").and_then(Value::as_bool) {
                        Some(false) => Prepend::Never,
                        _ => Prepend::Always,
                    },
                    Some(other) => {
                        return Err(unsupported(format!(
                            "`pre_tokenizer.prepend_scheme` `{other}`"
                        )));
                    }
                };
                Ok(SpForm {
                    prepend,
                    split: p.get("split").and_then(Value::as_bool).unwrap_or(true),
                    as_normalizer: false,
                    unk,
                })
            }
            (n, p) => Err(unsupported(format!(
                "a byte-fallback tokenizer with normalizer {} and pre_tokenizer {} \
                 (implemented: the normalizers Prepend/Replace, or a Metaspace pre-tokenizer)",
                n.map(ty).unwrap_or_else(|| "null".into()),
                p.map(ty).unwrap_or_else(|| "null".into()),
            ))),
        }
    }

    /// One segment of text (between special tokens) as the model sees it: spaces as `▁`, and
    /// `▁` prepended where the form says (`first`: the segment starts the text).
    pub(crate) fn prepare(&self, segment: &str, starts_text: bool) -> String {
        let mut out = String::with_capacity(segment.len() + 3);
        let prepend = match self.prepend {
            Prepend::Always => true,
            Prepend::First => starts_text,
            Prepend::Never => false,
        };
        // `tokenizers`' Metaspace does not prepend to a segment that already starts with `▁`.
        let has_space = segment.starts_with(' ') || segment.starts_with(SPACE);
        if prepend && !segment.is_empty() && !(!self.as_normalizer && has_space) {
            out.push(SPACE);
        }
        for c in segment.chars() {
            out.push(if c == ' ' { SPACE } else { c });
        }
        out
    }

    /// The words BPE runs on: the whole prepared text, or with `split` pieces that each start
    /// at a `▁`.
    pub(crate) fn words<'a>(&self, text: &'a str) -> Vec<&'a str> {
        if !self.split {
            return vec![text];
        }
        let mut words = Vec::new();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c == SPACE && i > start {
                words.push(&text[start..i]);
                start = i;
            }
        }
        if start < text.len() {
            words.push(&text[start..]);
        }
        words
    }

    /// The `normalizer`, `pre_tokenizer` and `decoder` entries of `tokenizer.json`.
    pub(crate) fn to_json(&self) -> (Value, Value, Value) {
        let scheme = match self.prepend {
            Prepend::Always => "always",
            Prepend::First => "first",
            Prepend::Never => "never",
        };
        if self.as_normalizer {
            let mut normalizers = Vec::new();
            if self.prepend == Prepend::Always {
                normalizers.push(json!({"type": "Prepend", "prepend": SPACE.to_string()}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE.to_string()}),
            );
            (
                json!({"type": "Sequence", "normalizers": normalizers}),
                Value::Null,
                json!({"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": SPACE.to_string()}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ]}),
            )
        } else {
            let meta = json!({
                "type": "Metaspace",
                "replacement": SPACE.to_string(),
                "prepend_scheme": scheme,
                "split": self.split,
            });
            (
                Value::Null,
                meta.clone(),
                json!({"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, meta]}),
            )
        }
    }
}

/// The byte a `<0xNN>` token stands for.
pub(crate) fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The bytes a normal token of a SentencePiece vocabulary stands for.
pub(crate) fn token_bytes(token: &str) -> Vec<u8> {
    match byte_token(token) {
        Some(b) => vec![b],
        None => token.replace(SPACE, " ").into_bytes(),
    }
}
