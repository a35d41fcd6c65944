//! Reading prompt files: JSONL with an `id` and one of `prompt`, `messages` or `instruction`.

use std::path::{Path, PathBuf};

use kd_tokenizer::{Message, Tokenizer};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What a record asks the teacher to do with it.
#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    /// Raw text (`prompt`), with an optional existing `response` for scoring.
    Text {
        prompt: String,
        response: Option<String>,
    },
    /// A chat (`messages`, or an `instruction` turned into one user turn). In scoring mode the
    /// last message must be the assistant's response.
    Chat { messages: Vec<Message> },
}

/// One input record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub id: String,
    /// 1-based line number in the input file.
    pub line: usize,
    pub content: Content,
}

impl Record {
    /// Whether the record carries a response to score: a `response` field, or messages
    /// ending with an assistant turn after at least one other turn.
    pub fn has_response(&self) -> bool {
        match &self.content {
            Content::Text { response, .. } => response.is_some(),
            Content::Chat { messages } => {
                messages.len() >= 2 && messages.last().is_some_and(|m| m.role == "assistant")
            }
        }
    }
}

/// The records of an input file plus what identifies the file.
#[derive(Debug)]
pub struct Input {
    pub path: PathBuf,
    pub sha256: String,
    pub records: Vec<Record>,
    /// Lines that failed to parse and were skipped (only with `skip_bad_lines`).
    pub skipped: Vec<(usize, String)>,
}

/// Reads a JSONL prompt file. A malformed line is an error naming the file and line, unless
/// `skip_bad_lines`, in which case it is recorded in [`Input::skipped`]. Blank lines are ignored.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<Input> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let sha256 = hex(&Sha256::digest(&bytes));
    // A UTF-8 byte-order mark (as some editors write) is not part of the first record.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))
            .and_then(|s| {
                let s = s.trim();
                if s.is_empty() {
                    Ok(None)
                } else {
                    parse_record(s, line).map(Some)
                }
            });
        match parsed {
            Ok(None) => {}
            Ok(Some(rec)) => {
                if let Some(first) = seen.insert(rec.id.clone(), line) {
                    let what = format!("duplicate id `{}` (first on line {first})", rec.id);
                    if skip_bad_lines {
                        skipped.push((line, what));
                        continue;
                    }
                    return Err(Error::BadLine {
                        path: path.to_path_buf(),
                        line,
                        what,
                    });
                }
                records.push(rec);
            }
            Err(what) if skip_bad_lines => skipped.push((line, what)),
            Err(what) => {
                return Err(Error::BadLine {
                    path: path.to_path_buf(),
                    line,
                    what,
                });
            }
        }
    }
    if records.is_empty() {
        return Err(Error::EmptyInput {
            path: path.to_path_buf(),
        });
    }
    Ok(Input {
        path: path.to_path_buf(),
        sha256,
        records,
        skipped,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn str_field<'a>(v: &'a Value, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("field `{key}` must be a string")),
    }
}

fn parse_record(s: &str, line: usize) -> std::result::Result<Record, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    let id = match v.get("id") {
        None | Some(Value::Null) => {
            // A stable id from the content (serde_json orders object keys), independent of the
            // line's position in the file.
            let canon = serde_json::to_string(&v).expect("value serializes");
            hex(&Sha256::digest(canon.as_bytes()))[..16].to_string()
        }
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("field `id` must be a non-empty string or a number".into()),
    };
    let response = str_field(&v, "response")?.map(str::to_string);
    let content = if let Some(p) = str_field(&v, "prompt")? {
        Content::Text {
            prompt: p.to_string(),
            response,
        }
    } else if let Some(m) = v.get("messages") {
        let arr = m.as_array().ok_or("field `messages` must be a list")?;
        let mut messages = Vec::with_capacity(arr.len());
        for (j, m) in arr.iter().enumerate() {
            let role = str_field(m, "role")
                .map_err(|e| format!("messages[{j}]: {e}"))?
                .ok_or(format!("messages[{j}]: missing field `role`"))?;
            let content = str_field(m, "content")
                .map_err(|e| format!("messages[{j}]: {e}"))?
                .ok_or(format!("messages[{j}]: missing field `content`"))?;
            messages.push(Message {
                role: role.to_string(),
                content: content.to_string(),
            });
        }
        if messages.is_empty() {
            return Err("field `messages` is empty".into());
        }
        if let Some(r) = response {
            messages.push(Message {
                role: "assistant".into(),
                content: r,
            });
        }
        Content::Chat { messages }
    } else if let Some(instr) = str_field(&v, "instruction")? {
        let input = match str_field(&v, "input")? {
            Some(s) => s.to_string(),
            None => v
                .get("instances")
                .and_then(|i| i.get(0))
                .and_then(|i| i.get("input"))
                .and_then(|i| i.as_str())
                .unwrap_or("")
                .to_string(),
        };
        let user = if input.trim().is_empty() {
            instr.to_string()
        } else {
            format!("{instr}\n\n{input}")
        };
        let mut messages = vec![Message {
            role: "user".into(),
            content: user,
        }];
        if let Some(r) = response {
            messages.push(Message {
                role: "assistant".into(),
                content: r,
            });
        }
        Content::Chat { messages }
    } else {
        return Err(
            "missing field: one of `prompt`, `messages` or `instruction` is required".into(),
        );
    };
    Ok(Record { id, line, content })
}

/// A record turned into token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub prompt: Vec<u32>,
    /// The existing response to score (scoring mode only).
    pub response: Option<Vec<u32>>,
}

/// How records become token ids.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    pub chat_template: bool,
    pub score: bool,
}

/// Turns a record into prompt (and, for scoring, response) ids. With the chat template, a
/// `prompt` becomes one user turn; without it, `messages` are joined as "role: content" lines.
/// In scoring mode the response ends at the first end-of-turn token the template emits.
pub fn encode(
    rec: &Record,
    tok: &Tokenizer,
    opts: EncodeOptions,
) -> std::result::Result<Encoded, String> {
    let (mut messages, mut response_text) = match &rec.content {
        Content::Text { prompt, response } => (
            vec![Message {
                role: "user".into(),
                content: prompt.clone(),
            }],
            response.clone(),
        ),
        Content::Chat { messages } => (messages.clone(), None),
    };
    if opts.score && response_text.is_none() {
        match messages.last() {
            Some(m) if m.role == "assistant" && messages.len() >= 2 => {
                response_text = Some(m.content.clone());
                messages.pop();
            }
            _ => {
                return Err(
                    "scoring needs a `response` field or messages ending with an assistant turn"
                        .into(),
                );
            }
        }
    }
    if !opts.score {
        response_text = None;
        if matches!(messages.last(), Some(m) if m.role == "assistant") {
            return Err("the last message is an assistant turn: use --score to score it, or drop it to generate".into());
        }
    }
    if !opts.chat_template {
        let prompt_text = match &rec.content {
            Content::Text { prompt, .. } => prompt.clone(),
            Content::Chat { .. } => messages
                .iter()
                .map(|m| format!("{}: {}\n", m.role, m.content))
                .collect::<String>(),
        };
        // As `tokenizer(text)` does: BOS first when the tokenizer says so (Llama 2 and 3).
        let mut prompt = tok.encode(&prompt_text, false);
        if tok.add_bos_token()
            && let Some(bos) = tok.bos_id()
        {
            prompt.insert(0, bos);
        }
        let response = response_text.map(|r| tok.encode(&r, false));
        return Ok(Encoded { prompt, response });
    }
    let tmpl = tok
        .chat_template()
        .ok_or("the tokenizer has no chat template (pass --no-chat-template)")?;
    let prompt_str = tmpl
        .render(&messages, true)
        .map_err(|e| format!("chat template: {e}"))?;
    let prompt = tok.encode(&prompt_str, true);
    let response = match response_text {
        None => None,
        Some(r) => {
            messages.push(Message {
                role: "assistant".into(),
                content: r,
            });
            let full_str = tmpl
                .render(&messages, false)
                .map_err(|e| format!("chat template: {e}"))?;
            let full = tok.encode(&full_str, true);
            if full.len() <= prompt.len() || full[..prompt.len()] != prompt[..] {
                return Err(
                    "the chat template does not render the response after the prompt".into(),
                );
            }
            let mut resp = full[prompt.len()..].to_vec();
            let stops = tok.stop_ids();
            if let Some(p) = resp.iter().position(|t| stops.contains(t)) {
                resp.truncate(p + 1);
            }
            Some(resp)
        }
    };
    Ok(Encoded { prompt, response })
}
