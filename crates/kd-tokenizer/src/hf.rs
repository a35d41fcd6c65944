//! Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) import and export.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::pretokenize::PreTokenizer;
use crate::tokenizer::{Parts, TokenKind, Tokenizer};

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn field<'a>(value: &'a Value, name: &str) -> Result<&'a Value> {
    let mut cur = value;
    for part in name.split('.') {
        cur = cur.get(part).ok_or_else(|| Error::missing(name))?;
    }
    Ok(cur)
}

fn is_null_or_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

fn parse_tokenizer_json(root: &Value) -> Result<Parts> {
    let model = field(root, "model")?;
    if let Some(kind) = model.get("type")
        && kind.as_str() != Some("BPE")
    {
        return Err(Error::Unsupported {
            what: format!("`model.type` = {kind} (only BPE is supported)"),
        });
    }
    let sp = if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        Some(crate::sentencepiece::SpForm::from_json(root)?)
    } else {
        None
    };
    for name in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if !is_null_or_empty(model.get(name)) {
            return Err(Error::Unsupported {
                what: format!("`model.{name}`"),
            });
        }
    }
    // No normalizer, NFC (Qwen), or a sequence of those (SentencePiece's are read above).
    let nfc = sp.is_none() && normalizer_is_nfc(root.get("normalizer"))?;
    let pre = match root.get("pre_tokenizer") {
        // SentencePiece-style: no split into words beyond its own (see `SpForm`).
        _ if sp.is_some() => PreTokenizer::none(),
        None | Some(Value::Null) => {
            return Err(Error::Unsupported {
                what: "a tokenizer without `pre_tokenizer` (not byte-level)".into(),
            });
        }
        Some(p) => PreTokenizer::from_hf_json(p, "pre_tokenizer")?,
    };

    let (tokens, kinds) = vocabulary(root)?;

    let merges = merges(root)?;
    let ignore_merges = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Parts {
        tokens,
        kinds,
        merges,
        merges_field: "model.merges",
        pre,
        ignore_merges,
        bos: None,
        eos: None,
        pad: None,
        add_bos: false,
        chat_template: None,
        nfc,
        sp,
    })
}

/// Whether `normalizer` asks for NFC: none, `NFC`, or a `Sequence` of those; any other is
/// refused.
fn normalizer_is_nfc(normalizer: Option<&Value>) -> Result<bool> {
    Ok(match normalizer {
        None | Some(Value::Null) => false,
        Some(n) => {
            let ty = |n: &Value| {
                n.get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            let list = match n.get("normalizers").and_then(Value::as_array) {
                Some(list) if ty(n) == "Sequence" => list.clone(),
                _ => vec![n.clone()],
            };
            let mut nfc = false;
            for m in &list {
                match ty(m).as_str() {
                    "NFC" => nfc = true,
                    other => {
                        return Err(Error::Unsupported {
                            what: format!("normalizer `{other}` (implemented: NFC)"),
                        });
                    }
                }
            }
            nfc
        }
    })
}

/// The tokens and their kinds by id: `model.vocab` plus `added_tokens`, which may extend it;
/// ids must be contiguous.
fn vocabulary(root: &Value) -> Result<(Vec<String>, Vec<TokenKind>)> {
    let vocab = field(root, "model.vocab")?
        .as_object()
        .ok_or_else(|| Error::wrong_type("model.vocab", "an object of token → id"))?;
    let added = match root.get("added_tokens") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(list)) => list.as_slice(),
        Some(_) => return Err(Error::wrong_type("added_tokens", "an array")),
    };
    // Ids must be contiguous, so none can reach the number of entries; checking
    // that first also keeps a corrupt id from allocating gigabytes.
    let limit = vocab.len() + added.len();
    let mut slots: Vec<Option<(String, TokenKind)>> = Vec::new();
    let mut put =
        |id: u64, text: &str, kind: TokenKind, field: &str, overwrite: bool| -> Result<()> {
            let id = usize::try_from(id)
                .ok()
                .filter(|&i| i < limit)
                .ok_or_else(|| {
                    Error::invalid(
                        field,
                        format!("id {id} for `{text}` is beyond the {limit} tokens listed"),
                    )
                })?;
            if slots.len() <= id {
                slots.resize(id + 1, None);
            }
            match &slots[id] {
                Some((other, _)) if !overwrite && other != text => Err(Error::invalid(
                    field,
                    format!("id {id} is given to both `{other}` and `{text}`"),
                )),
                _ => {
                    slots[id] = Some((text.to_string(), kind));
                    Ok(())
                }
            }
        };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::wrong_type(format!("model.vocab[{text:?}]"), "an id"))?;
        put(id, text, TokenKind::Normal, "model.vocab", false)?;
    }
    for (i, tok) in added.iter().enumerate() {
        let f = format!("added_tokens[{i}]");
        let id = tok
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::missing(format!("{f}.id")))?;
        let content = tok
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::missing(format!("{f}.content")))?;
        let special = tok.get("special").and_then(Value::as_bool).unwrap_or(false);
        let kind = if special {
            TokenKind::Control
        } else {
            TokenKind::UserDefined
        };
        put(id, content, kind, &f, true)?;
    }
    let mut tokens = Vec::with_capacity(slots.len());
    let mut kinds = Vec::with_capacity(slots.len());
    for (id, slot) in slots.into_iter().enumerate() {
        let (t, k) = slot.ok_or_else(|| {
            Error::invalid(
                "model.vocab",
                format!("no token has id {id} (ids must be contiguous)"),
            )
        })?;
        tokens.push(t);
        kinds.push(k);
    }
    Ok((tokens, kinds))
}

/// `model.merges`, as pairs: each a `"left right"` string or a `[left, right]` array.
fn merges(root: &Value) -> Result<Vec<(String, String)>> {
    field(root, "model.merges")?
        .as_array()
        .ok_or_else(|| Error::wrong_type("model.merges", "an array"))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = || {
                Error::invalid(
                    "model.merges",
                    format!("merge #{i} is neither `\"left right\"` nor `[left, right]`"),
                )
            };
            match m {
                Value::String(s) => crate::gguf::split_merge(s).ok_or_else(bad),
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            }
        })
        .collect::<Result<Vec<_>>>()
}

/// `bos_token` etc. in tokenizer_config.json: a string, an AddedToken object, or null.
fn config_token(config: &Value, name: &str) -> Result<Option<String>> {
    match config.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(obj @ Value::Object(_)) => obj
            .get("content")
            .and_then(Value::as_str)
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| Error::missing(format!("{name}.content"))),
        Some(_) => Err(Error::wrong_type(name, "a string or {\"content\": ...}")),
    }
}

fn config_template(config: &Value) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        // Named templates: [{"name": "default", "template": "..."}, ...].
        Some(Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter()
                    .find(|t| want.is_none_or(|w| t.get("name").and_then(Value::as_str) == Some(w)))
            };
            let chosen = named(Some("default")).or_else(|| named(None));
            match chosen.map(|t| t.get("template").and_then(Value::as_str)) {
                None => Ok(None),
                Some(Some(s)) => Ok(Some(s.to_string())),
                Some(None) => Err(Error::missing("chat_template[].template")),
            }
        }
        Some(_) => Err(Error::wrong_type(
            "chat_template",
            "a string or a list of named templates",
        )),
    }
}

/// The special token a `TemplateProcessing` post-processor puts before a single sequence
/// (Llama 2's `<s>`, Llama 3's `<|begin_of_text|>`), looking inside a `Sequence`.
fn leading_special(post: &Value) -> Option<String> {
    match post.get("type").and_then(Value::as_str)? {
        "Sequence" => post
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(leading_special),
        "TemplateProcessing" => {
            let first = post.get("single")?.as_array()?.first()?;
            first
                .get("SpecialToken")?
                .get("id")?
                .as_str()
                .map(str::to_string)
        }
        _ => None,
    }
}

pub(crate) fn from_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    let root = read_json(path)?;
    let mut tok = parse_tokenizer_json(&root)
        .and_then(Tokenizer::build)
        .map_err(|e| e.in_file(path))?;
    // `tokenizer(text)` in transformers runs the post-processor: a leading special token is
    // a BOS the prompt starts with (tokenizer_config.json's `add_bos_token` may still say
    // otherwise).
    if let Some(text) = root.get("post_processor").and_then(leading_special)
        && let Some(id) = tok.token_id(&text)
    {
        tok = tok.with_bos(Some(id))?.with_add_bos(true);
    }

    let config_path = path.with_file_name("tokenizer_config.json");
    let mut template = None;
    if config_path.is_file() {
        let config = read_json(&config_path)?;
        let apply = |tok: Tokenizer| -> Result<(Tokenizer, Option<String>)> {
            let id_of = |name: &str| -> Result<Option<u32>> {
                match config_token(&config, name)? {
                    None => Ok(None),
                    Some(text) => tok.token_id(&text).map(Some).ok_or_else(|| {
                        Error::invalid(name, format!("`{text}` is not in the vocabulary"))
                    }),
                }
            };
            let (bos, eos, pad) = (
                id_of("bos_token")?,
                id_of("eos_token")?,
                id_of("pad_token")?,
            );
            let template = config_template(&config)?;
            let add_bos = match config.get("add_bos_token") {
                None | Some(Value::Null) => tok.add_bos_token(),
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(Error::wrong_type("add_bos_token", "a boolean")),
            };
            let bos = bos.or(tok.bos_id());
            let tok = tok
                .with_bos(bos)?
                .with_eos(eos)?
                .with_pad(pad)?
                .with_add_bos(add_bos);
            Ok((tok, template))
        };
        let (t, tpl) = apply(tok).map_err(|e| e.in_file(&config_path))?;
        tok = t;
        template = tpl;
    }
    // Newer transformers save the template beside, and prefer it.
    let jinja_path = path.with_file_name("chat_template.jinja");
    if jinja_path.is_file() {
        template = Some(
            std::fs::read_to_string(&jinja_path).map_err(|source| Error::Io {
                path: jinja_path.clone(),
                source,
            })?,
        );
    }
    Ok(tok.with_chat_template(template))
}

pub(crate) fn to_tokenizer_json(tok: &Tokenizer) -> Value {
    let tokens = tok.tokens();
    let kinds = tok.kinds();
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        // A duplicated string keeps its first id, as the lookup does.
        if !vocab.contains_key(t) {
            vocab.insert(t.clone(), json!(id));
        }
    }
    let added: Vec<Value> = tokens
        .iter()
        .zip(kinds)
        .enumerate()
        .filter(|(_, (_, k))| **k != TokenKind::Normal)
        .map(|(id, (t, k))| {
            json!({
                "id": id,
                "content": t,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *k == TokenKind::Control,
            })
        })
        .collect();
    let pairs: Vec<(&str, &str)> = tok
        .merge_ids()
        .iter()
        .map(|&(l, r)| (tokens[l as usize].as_str(), tokens[r as usize].as_str()))
        .collect();
    // The legacy "left right" form is read by every `tokenizers` version, but
    // cannot hold a token with a space; fall back to pairs then.
    let merges: Vec<Value> = if pairs
        .iter()
        .any(|(l, r)| l.contains(' ') || r.contains(' '))
    {
        pairs.iter().map(|(l, r)| json!([l, r])).collect()
    } else {
        pairs
            .iter()
            .map(|(l, r)| json!(format!("{l} {r}")))
            .collect()
    };
    let mut out = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": if tok.nfc() { json!({"type": "NFC"}) } else { Value::Null },
        "pre_tokenizer": tok.pre().to_hf_json(),
        "post_processor": match (tok.add_bos_token(), tok.bos_id().and_then(|b| tok.vocab_string(b))) {
            (true, Some(bos)) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id()], "tokens": [bos]}},
            }),
            _ => Value::Null,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": tok.ignore_merges(),
            "vocab": vocab,
            "merges": merges,
        },
    });
    if let Some(sp) = tok.sentencepiece() {
        let (normalizer, pre, decoder) = sp.to_json();
        out["normalizer"] = normalizer;
        out["pre_tokenizer"] = pre;
        out["decoder"] = decoder;
        out["model"]["byte_fallback"] = true.into();
        out["model"]["fuse_unk"] = true.into();
        out["model"]["unk_token"] = sp.unk.clone().into();
    }
    out
}

pub(crate) fn to_tokenizer_config_json(tok: &Tokenizer) -> Value {
    let text = |id: Option<u32>| id.and_then(|id| tok.vocab_string(id)).map(str::to_string);
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos_token(),
        "add_eos_token": false,
        "bos_token": text(tok.bos_id()),
        "eos_token": text(tok.eos_id()),
        "pad_token": text(tok.pad_id()),
        "unk_token": null,
        "clean_up_tokenization_spaces": false,
        "chat_template": tok.chat_template().map(|t| t.source().to_string()),
    })
}

pub(crate) fn write_hf_files(tok: &Tokenizer, dir: &Path) -> Result<()> {
    for (name, value) in [
        ("tokenizer.json", to_tokenizer_json(tok)),
        ("tokenizer_config.json", to_tokenizer_config_json(tok)),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&value).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })?;
    }
    Ok(())
}
