//! Loading from GGUF metadata (`tokenizer.ggml.*`, as written by llama.cpp's converters).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{Error, Result};
use crate::pretokenize::PreTokenizer;
use crate::tokenizer::{Parts, TokenKind, Tokenizer};

const MODEL: &str = "tokenizer.ggml.model";
const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const PRE: &str = "tokenizer.ggml.pre";
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";
const PAD: &str = "tokenizer.ggml.padding_token_id";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const SCORES: &str = "tokenizer.ggml.scores";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

type Metadata = HashMap<String, Value>;

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn string_array(md: &Metadata, key: &str) -> Result<Vec<String>> {
    let items = match md.get(key) {
        None => return Err(Error::missing(key)),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(Error::wrong_type(key, "an array of strings")),
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Error::wrong_type(key, "an array of strings")),
        })
        .collect()
}

fn opt_string(md: &Metadata, key: &str) -> Result<Option<String>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::wrong_type(key, "a string")),
    }
}

fn opt_id(md: &Metadata, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => as_u64(v)
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| Error::wrong_type(key, "a token id (unsigned integer)")),
    }
}

fn opt_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::wrong_type(key, "a boolean")),
    }
}

/// Splits a GGUF merge rule `"left right"` at the first space after the first
/// character, as llama.cpp does.
pub(crate) fn split_merge(rule: &str) -> Option<(String, String)> {
    let first = rule.chars().next()?.len_utf8();
    let at = rule[first..].find(' ')? + first;
    Some((rule[..at].to_string(), rule[at + 1..].to_string()))
}

pub(crate) fn from_gguf(content: &Content) -> Result<Tokenizer> {
    let md = &content.metadata;
    let spm = match opt_string(md, MODEL)?.as_deref() {
        Some("gpt2") => false,
        Some("llama") => true,
        Some(other) => {
            return Err(Error::Unsupported {
                what: format!(
                    "`{MODEL}` = `{other}` (implemented: `gpt2`, byte-level BPE, and `llama`, \
                     SentencePiece BPE)"
                ),
            });
        }
        None => return Err(Error::missing(MODEL)),
    };
    let tokens = string_array(md, TOKENS)?;
    let kinds = match md.get(TOKEN_TYPE) {
        None => vec![TokenKind::Normal; tokens.len()],
        Some(Value::Array(types)) => {
            if types.len() != tokens.len() {
                return Err(Error::invalid(
                    TOKEN_TYPE,
                    format!("{} entries for {} tokens", types.len(), tokens.len()),
                ));
            }
            types
                .iter()
                .map(|t| match as_u64(t) {
                    // 2 = unknown: llama.cpp treats it like a control token.
                    Some(2 | 3) => Ok(TokenKind::Control),
                    Some(4) => Ok(TokenKind::UserDefined),
                    // 1 = normal, 5 = unused, 6 = byte; 0 = undefined.
                    Some(0 | 1 | 5 | 6) => Ok(TokenKind::Normal),
                    Some(other) => Err(Error::invalid(
                        TOKEN_TYPE,
                        format!("unknown token type {other}"),
                    )),
                    None => Err(Error::wrong_type(TOKEN_TYPE, "an array of integers")),
                })
                .collect::<Result<Vec<_>>>()?
        }
        Some(_) => return Err(Error::wrong_type(TOKEN_TYPE, "an array of integers")),
    };
    if spm {
        return from_gguf_spm(md, tokens, kinds);
    }
    let merges = string_array(md, MERGES)?
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            split_merge(rule).ok_or_else(|| {
                Error::invalid(MERGES, format!("merge #{i} `{rule}` is not `left right`"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // llama.cpp falls back to its `default` pre-tokenizer when the key is absent.
    let pre_name = opt_string(md, PRE)?.unwrap_or_else(|| "default".to_string());
    let pre = PreTokenizer::from_preset(&pre_name)?;
    let ignore_merges = pre.name == "llama3";
    Tokenizer::build(Parts {
        tokens,
        kinds,
        merges,
        merges_field: MERGES,
        pre,
        ignore_merges,
        bos: opt_id(md, BOS)?,
        eos: opt_id(md, EOS)?,
        pad: opt_id(md, PAD)?,
        add_bos: opt_bool(md, ADD_BOS)?.unwrap_or(false),
        chat_template: opt_string(md, CHAT_TEMPLATE)?,
        // llama.cpp does not normalise text for BPE vocabularies.
        nfc: false,
        sp: None,
    })
    .map_err(|e| match e {
        // `build` names its fields generically; give the GGUF key instead.
        Error::InvalidField { field, message } => Error::InvalidField {
            field: match field.as_str() {
                "bos_token_id" => BOS.to_string(),
                "eos_token_id" => EOS.to_string(),
                "pad_token_id" => PAD.to_string(),
                "tokens" => TOKENS.to_string(),
                _ => field,
            },
            message,
        },
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_rules_split_after_first_char() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("Ġt he"), Some(("Ġt".into(), "he".into())));
        assert_eq!(split_merge("nospace"), None);
        assert_eq!(split_merge(""), None);
    }
}

/// llama.cpp's SentencePiece vocabulary (`tokenizer.ggml.model` = `llama`): pieces with
/// scores and no merge list. llama.cpp merges the adjacent pair whose joined piece is in the
/// vocabulary with the highest score (leftmost on ties), falls back to `<0xNN>` byte pieces,
/// and puts `▁` before every stretch of text that starts the input or follows a special
/// token (`add_space_prefix`, default true). That is BPE with a merge `(a, b)` for every
/// piece `a + b` of the vocabulary, ranked by the joined piece's score, which is how
/// `transformers` converts the same model to `tokenizer.json`; so it is built that way here.
fn from_gguf_spm(md: &Metadata, tokens: Vec<String>, kinds: Vec<TokenKind>) -> Result<Tokenizer> {
    let scores: Vec<f32> = match md.get(SCORES) {
        None => return Err(Error::missing(SCORES)),
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| match x {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(Error::wrong_type(SCORES, "an array of floats")),
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(Error::wrong_type(SCORES, "an array of floats")),
    };
    if scores.len() != tokens.len() {
        return Err(Error::invalid(
            SCORES,
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    // Types: 2 = unknown (kept as the fallback for bytes without a piece).
    let unk = match md.get(TOKEN_TYPE) {
        Some(Value::Array(types)) => types
            .iter()
            .position(|t| as_u64(t) == Some(2))
            .map(|i| tokens[i].clone()),
        _ => None,
    };
    let normal: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| kinds[*i] == TokenKind::Normal)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut ranked: Vec<(f32, usize, String, String)> = Vec::new();
    for (&piece, &id) in &normal {
        if crate::sentencepiece::byte_token(piece).is_some() {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if normal.contains_key(a) && normal.contains_key(b) {
                ranked.push((scores[id], id, a.to_string(), b.to_string()));
            }
        }
    }
    // Highest score first; then by piece id and split point, for a fixed order.
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.len().cmp(&y.2.len()))
    });
    let merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let prepend = if opt_bool(md, ADD_SPACE_PREFIX)?.unwrap_or(true) {
        crate::sentencepiece::Prepend::Always
    } else {
        crate::sentencepiece::Prepend::Never
    };
    Tokenizer::build(Parts {
        tokens,
        kinds,
        merges,
        merges_field: SCORES,
        pre: PreTokenizer::none(),
        ignore_merges: false,
        bos: opt_id(md, BOS)?,
        eos: opt_id(md, EOS)?,
        pad: opt_id(md, PAD)?,
        add_bos: opt_bool(md, ADD_BOS)?.unwrap_or(true),
        chat_template: opt_string(md, CHAT_TEMPLATE)?,
        nfc: false,
        sp: Some(crate::sentencepiece::SpForm {
            prepend,
            split: false,
            as_normalizer: true,
            unk,
        }),
    })
}
