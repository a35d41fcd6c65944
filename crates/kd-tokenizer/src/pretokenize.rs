//! Pre-tokenization: splitting text into words before BPE runs on each.
//!
//! A pre-tokenizer is a list of steps in the shape of Hugging Face's
//! `pre_tokenizer` JSON (`Digits`, `Split`, `ByteLevel`), applied in order; each
//! step splits every piece produced by the previous one, keeping all text.
//! llama.cpp's named presets (`tokenizer.ggml.pre`) are expressed in the same
//! steps so that a GGUF tokenizer and its exported `tokenizer.json` agree.

use std::borrow::Cow;
use std::ops::Range;

use fancy_regex::Regex;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// GPT-2's word regex (what Hugging Face's `ByteLevel(use_regex=true)` applies).
pub(crate) const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's word regex, as llama.cpp spells it (explicit case classes rather
/// than `(?i:...)`, which would also fold e.g. `ſ` to `s`).
/// The same pattern as Llama 3's own `tokenizer.json` writes it, with a case-insensitive
/// group: a file with it is the `llama3` preset.
const LLAMA3_HF_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's word regex: like Llama 3's but one digit per word.
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Names accepted for `tokenizer.ggml.pre`, for error messages.
pub(crate) const SUPPORTED_PRESETS: &str = "smollm, starcoder, refact, command-r, codeshell, \
     gpt2, gpt-2, phi-2, mpt, olmo, llama3, llama-v3, llama-bpe, qwen2, stablelm2, default";

/// How a `Split` step treats the text its pattern matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SplitBehavior {
    /// Matches and the text between them both become pieces.
    Isolated,
    /// Matches are dropped; the text between them becomes pieces.
    Removed,
}

impl SplitBehavior {
    fn as_str(self) -> &'static str {
        match self {
            SplitBehavior::Isolated => "Isolated",
            SplitBehavior::Removed => "Removed",
        }
    }
}

/// One pre-tokenization step.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// Split off digits (`char::is_numeric`, i.e. `\p{N}`): each alone, or in runs.
    Digits { individual: bool },
    /// Split on a regex (or, with `literal`, a plain string).
    Split {
        pattern: String,
        literal: bool,
        regex: Regex,
        behavior: SplitBehavior,
    },
    /// Byte-level step: optional leading space, then GPT-2's word regex if `use_regex`.
    ByteLevel {
        add_prefix_space: bool,
        use_regex: bool,
        regex: Regex,
    },
}

impl PartialEq for Step {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Step::Digits { individual: a }, Step::Digits { individual: b }) => a == b,
            (
                Step::Split {
                    pattern: p1,
                    literal: l1,
                    behavior: b1,
                    ..
                },
                Step::Split {
                    pattern: p2,
                    literal: l2,
                    behavior: b2,
                    ..
                },
            ) => p1 == p2 && l1 == l2 && b1 == b2,
            (
                Step::ByteLevel {
                    add_prefix_space: a1,
                    use_regex: u1,
                    ..
                },
                Step::ByteLevel {
                    add_prefix_space: a2,
                    use_regex: u2,
                    ..
                },
            ) => a1 == a2 && u1 == u2,
            _ => false,
        }
    }
}

fn compile(pattern: &str) -> Result<Regex> {
    // Large inputs (say 100 KB of spaces) must not hit the backtracking limit.
    fancy_regex::RegexBuilder::new(pattern)
        .backtrack_limit(10_000_000)
        .build()
        .map_err(|e| Error::Regex {
            pattern: pattern.to_string(),
            message: e.to_string(),
        })
}

impl Step {
    fn digits(individual: bool) -> Step {
        Step::Digits { individual }
    }

    fn split(pattern: &str, literal: bool, behavior: SplitBehavior) -> Result<Step> {
        let source = if literal {
            fancy_regex::escape(pattern).into_owned()
        } else {
            pattern.to_string()
        };
        Ok(Step::Split {
            pattern: pattern.to_string(),
            literal,
            regex: compile(&source)?,
            behavior,
        })
    }

    fn byte_level(add_prefix_space: bool, use_regex: bool) -> Result<Step> {
        Ok(Step::ByteLevel {
            add_prefix_space,
            use_regex,
            regex: compile(GPT2_PATTERN)?,
        })
    }

    /// Splits `piece` and appends the parts to `out`.
    fn apply<'a>(
        &self,
        piece: Cow<'a, str>,
        ranges: &mut Vec<Range<usize>>,
        out: &mut Vec<Cow<'a, str>>,
    ) {
        ranges.clear();
        match self {
            Step::Digits { individual } => digit_ranges(&piece, *individual, ranges),
            Step::Split {
                regex, behavior, ..
            } => regex_ranges(regex, &piece, *behavior, ranges),
            Step::ByteLevel {
                add_prefix_space,
                use_regex,
                regex,
            } => {
                let piece = if *add_prefix_space && !piece.starts_with(' ') {
                    Cow::Owned(format!(" {piece}"))
                } else {
                    piece
                };
                if *use_regex {
                    regex_ranges(regex, &piece, SplitBehavior::Isolated, ranges);
                    push_ranges(piece, ranges, out);
                } else if !piece.is_empty() {
                    out.push(piece);
                }
                return;
            }
        }
        push_ranges(piece, ranges, out);
    }

    fn to_json(&self) -> Value {
        match self {
            Step::Digits { individual } => {
                json!({"type": "Digits", "individual_digits": individual})
            }
            Step::Split {
                pattern,
                literal,
                behavior,
                ..
            } => {
                let pattern = if *literal {
                    json!({ "String": pattern })
                } else {
                    json!({ "Regex": pattern })
                };
                json!({"type": "Split", "pattern": pattern, "behavior": behavior.as_str(), "invert": false})
            }
            Step::ByteLevel {
                add_prefix_space,
                use_regex,
                ..
            } => json!({
                "type": "ByteLevel",
                "add_prefix_space": add_prefix_space,
                "trim_offsets": true,
                "use_regex": use_regex,
            }),
        }
    }
}

fn push_ranges<'a>(piece: Cow<'a, str>, ranges: &[Range<usize>], out: &mut Vec<Cow<'a, str>>) {
    if ranges.len() == 1 && ranges[0] == (0..piece.len()) {
        out.push(piece);
        return;
    }
    for r in ranges {
        out.push(match &piece {
            Cow::Borrowed(s) => Cow::Borrowed(&s[r.clone()]),
            Cow::Owned(s) => Cow::Owned(s[r.clone()].to_owned()),
        });
    }
}

fn digit_ranges(s: &str, individual: bool, out: &mut Vec<Range<usize>>) {
    let mut start = 0;
    let mut prev_numeric = None;
    for (i, c) in s.char_indices() {
        let numeric = c.is_numeric();
        let boundary = match prev_numeric {
            None => false,
            Some(p) => p != numeric || (numeric && individual),
        };
        if boundary {
            out.push(start..i);
            start = i;
        }
        prev_numeric = Some(numeric);
    }
    if start < s.len() {
        out.push(start..s.len());
    }
}

fn regex_ranges(re: &Regex, s: &str, behavior: SplitBehavior, out: &mut Vec<Range<usize>>) {
    let mut last = 0;
    for m in re.find_iter(s) {
        let Ok(m) = m else {
            // Backtracking limit: keep the rest whole rather than lose text.
            break;
        };
        if m.start() == m.end() {
            continue;
        }
        if m.start() > last {
            out.push(last..m.start());
        }
        if behavior == SplitBehavior::Isolated {
            out.push(m.start()..m.end());
        }
        last = m.end();
    }
    if last < s.len() {
        out.push(last..s.len());
    }
}

/// A configured pre-tokenizer.
#[derive(Clone, Debug)]
pub(crate) struct PreTokenizer {
    /// Preset name (`smollm`, `gpt2`, ...) or `custom`.
    pub(crate) name: String,
    pub(crate) steps: Vec<Step>,
}

impl PreTokenizer {
    /// No pre-tokenization: SentencePiece-style tokenizers split text themselves.
    pub(crate) fn none() -> PreTokenizer {
        PreTokenizer {
            name: "sentencepiece".into(),
            steps: Vec::new(),
        }
    }

    /// llama.cpp's preset for a `tokenizer.ggml.pre` value.
    pub(crate) fn from_preset(name: &str) -> Result<PreTokenizer> {
        use SplitBehavior::Isolated;
        let (canonical, steps) = match name {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => (
                "smollm",
                vec![Step::digits(true), Step::byte_level(false, true)?],
            ),
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" => {
                ("gpt2", vec![Step::byte_level(false, true)?])
            }
            "llama3" | "llama-v3" | "llama-bpe" => (
                "llama3",
                vec![
                    Step::split(LLAMA3_PATTERN, false, Isolated)?,
                    Step::byte_level(false, false)?,
                ],
            ),
            "qwen2" | "stablelm2" => (
                "qwen2",
                vec![
                    Step::split(QWEN2_PATTERN, false, Isolated)?,
                    Step::byte_level(false, false)?,
                ],
            ),
            // llama.cpp's fallback for BPE vocabularies without a known `pre`.
            "default" => (
                "default",
                vec![
                    Step::split(r"[\p{P}\$\+<=>\^~\|]+", false, Isolated)?,
                    Step::split(GPT2_PATTERN, false, Isolated)?,
                    Step::split(r"\p{N}+", false, Isolated)?,
                    Step::split(r"[0-9][0-9][0-9]", false, Isolated)?,
                    Step::byte_level(false, false)?,
                ],
            ),
            other => {
                return Err(Error::UnknownPreTokenizer {
                    name: other.to_string(),
                    supported: SUPPORTED_PRESETS,
                });
            }
        };
        Ok(PreTokenizer {
            name: canonical.to_string(),
            steps,
        })
    }

    /// Interprets a Hugging Face `pre_tokenizer` JSON value (`field` names it in errors).
    pub(crate) fn from_hf_json(value: &Value, field: &str) -> Result<PreTokenizer> {
        let mut steps = Vec::new();
        parse_hf_step(value, field, &mut steps)?;
        if !steps.iter().any(|s| matches!(s, Step::ByteLevel { .. })) {
            return Err(Error::Unsupported {
                what: format!(
                    "`{field}` without a ByteLevel step (only byte-level BPE is supported)"
                ),
            });
        }
        let preset = ["smollm", "gpt2", "llama3", "qwen2", "default"]
            .into_iter()
            .find(|preset| PreTokenizer::from_preset(preset).is_ok_and(|p| p.steps == steps));
        let name = match preset {
            Some(name) => name,
            None if steps == Self::llama3_as_written()? => "llama3",
            None => "custom",
        }
        .to_string();
        Ok(PreTokenizer { name, steps })
    }

    /// The steps of Llama 3's own `tokenizer.json`: the `llama3` preset with the pattern
    /// spelled as that file spells it.
    fn llama3_as_written() -> Result<Vec<Step>> {
        Ok(vec![
            Step::split(LLAMA3_HF_PATTERN, false, SplitBehavior::Isolated)?,
            Step::byte_level(false, false)?,
        ])
    }

    /// The Hugging Face `pre_tokenizer` JSON for these steps.
    pub(crate) fn to_hf_json(&self) -> Value {
        match self.steps.as_slice() {
            [single] => single.to_json(),
            steps => json!({
                "type": "Sequence",
                "pretokenizers": steps.iter().map(Step::to_json).collect::<Vec<_>>(),
            }),
        }
    }

    /// Splits `text` into words; concatenated they give back `text` (plus any
    /// prefix spaces a `ByteLevel(add_prefix_space)` step adds).
    pub(crate) fn split<'a>(&self, text: &'a str) -> Vec<Cow<'a, str>> {
        let mut pieces = vec![Cow::Borrowed(text)];
        let mut next = Vec::new();
        let mut ranges = Vec::new();
        for step in &self.steps {
            for piece in pieces.drain(..) {
                step.apply(piece, &mut ranges, &mut next);
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        pieces.retain(|p| !p.is_empty());
        pieces
    }
}

fn parse_hf_step(value: &Value, field: &str, steps: &mut Vec<Step>) -> Result<()> {
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::missing(format!("{field}.type")))?;
    let flag = |name: &str, default: bool| -> Result<bool> {
        match value.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(Error::wrong_type(format!("{field}.{name}"), "a boolean")),
        }
    };
    match kind {
        "Sequence" => {
            let list = value
                .get("pretokenizers")
                .ok_or_else(|| Error::missing(format!("{field}.pretokenizers")))?
                .as_array()
                .ok_or_else(|| Error::wrong_type(format!("{field}.pretokenizers"), "an array"))?;
            for (i, item) in list.iter().enumerate() {
                parse_hf_step(item, &format!("{field}.pretokenizers[{i}]"), steps)?;
            }
        }
        "Digits" => steps.push(Step::digits(flag("individual_digits", false)?)),
        "ByteLevel" => steps.push(Step::byte_level(
            flag("add_prefix_space", true)?,
            flag("use_regex", true)?,
        )?),
        "Split" => {
            if flag("invert", false)? {
                return Err(Error::Unsupported {
                    what: format!("`{field}.invert` = true"),
                });
            }
            let behavior = match value.get("behavior").and_then(Value::as_str) {
                Some("Isolated") => SplitBehavior::Isolated,
                Some("Removed") => SplitBehavior::Removed,
                Some(other) => {
                    return Err(Error::Unsupported {
                        what: format!("`{field}.behavior` = {other}"),
                    });
                }
                None => return Err(Error::missing(format!("{field}.behavior"))),
            };
            let pattern = value
                .get("pattern")
                .ok_or_else(|| Error::missing(format!("{field}.pattern")))?;
            let (source, literal) = if let Some(re) = pattern.get("Regex").and_then(Value::as_str) {
                (re, false)
            } else if let Some(s) = pattern.get("String").and_then(Value::as_str) {
                (s, true)
            } else {
                return Err(Error::wrong_type(
                    format!("{field}.pattern"),
                    "{\"Regex\": ...} or {\"String\": ...}",
                ));
            };
            steps.push(Step::split(source, literal, behavior)?);
        }
        other => {
            return Err(Error::Unsupported {
                what: format!("pre-tokenizer type `{other}` in `{field}`"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        PreTokenizer::from_preset(pre)
            .unwrap()
            .split(text)
            .into_iter()
            .map(Cow::into_owned)
            .collect()
    }

    #[test]
    fn gpt2_splits_words_and_keeps_whitespace() {
        assert_eq!(
            words("gpt2", "Hello, world!  it's 2026\n"),
            ["Hello", ",", " world", "!", " ", " it", "'s", " 2026", "\n"]
        );
    }

    #[test]
    fn smollm_isolates_every_digit() {
        assert_eq!(
            words("smollm", "in 2026."),
            ["in", " ", "2", "0", "2", "6", "."]
        );
    }

    #[test]
    fn llama3_groups_three_digits() {
        assert_eq!(words("llama3", "x 12345"), ["x", " ", "123", "45"]);
    }

    #[test]
    fn unknown_preset_is_named() {
        let err = PreTokenizer::from_preset("nonsense").unwrap_err();
        assert!(matches!(err, Error::UnknownPreTokenizer { ref name, .. } if name == "nonsense"));
    }

    #[test]
    fn presets_round_trip_through_hf_json() {
        for preset in ["smollm", "gpt2", "llama3", "qwen2", "default"] {
            let pre = PreTokenizer::from_preset(preset).unwrap();
            let back = PreTokenizer::from_hf_json(&pre.to_hf_json(), "pre_tokenizer").unwrap();
            assert_eq!(back.name, preset);
            assert_eq!(back.steps, pre.steps);
        }
    }

    #[test]
    fn byte_level_prefix_space() {
        let pre = PreTokenizer {
            name: "custom".into(),
            steps: vec![Step::byte_level(true, true).unwrap()],
        };
        let got: Vec<_> = pre
            .split("hi there")
            .into_iter()
            .map(Cow::into_owned)
            .collect();
        assert_eq!(got, [" hi", " there"]);
    }
}
