//! Jinja chat templates, rendered the way transformers' `apply_chat_template` does.
//!
//! transformers compiles templates in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True, lstrip_blocks=True` and the `loopcontrols` extension,
//! replaces `tojson` with `json.dumps(x, ensure_ascii=False, ...)` (no HTML
//! escaping), and adds the globals `raise_exception` and `strftime_now`. It
//! renders with `messages`, `tools=None`, `documents=None`,
//! `add_generation_prompt` and the special tokens. This module replicates all of
//! that on minijinja, plus the Python string and dict methods templates call
//! (`.strip()`, `.startswith()`, `.items()`, ...) and Python's rendering of
//! `None`/`True`/`False`.

use std::fmt;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

use crate::error::{Error, Result};

/// One chat turn, as transformers takes it (`{"role": ..., "content": ...}`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Message {
        Message::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Message {
        Message::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new("assistant", content)
    }
}

/// A compiled Jinja chat template with the BOS/EOS texts it renders with.
/// Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// The environment holding the compiled template, or the syntax error.
    env: Arc<std::result::Result<Environment<'static>, String>>,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`. A syntax error is kept and returned by every
    /// [`ChatTemplate::render`] call, as [`Error::TemplateSyntax`].
    pub fn new(source: String, bos_token: String, eos_token: String) -> ChatTemplate {
        let mut env = environment();
        let env = match env.add_template_owned(TEMPLATE_NAME, source.clone()) {
            Ok(()) => Ok(env),
            Err(e) => Err(describe(&e)),
        };
        ChatTemplate {
            source,
            bos_token,
            eos_token,
            env: Arc::new(env),
        }
    }

    /// Renders `messages` like transformers' `apply_chat_template(..., tokenize=False)`:
    /// variables `messages` (maps with `role` and `content`), `add_generation_prompt`,
    /// `bos_token`, `eos_token`, and `tools` / `documents` set to `None`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`ChatTemplate::render`] with extra template variables, as `apply_chat_template`'s
    /// keyword arguments give them (`date_string`, `enable_thinking`, …); they may not
    /// replace the variables `render` sets.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let env = self
            .env
            .as_ref()
            .as_ref()
            .map_err(|message| Error::TemplateSyntax {
                message: message.clone(),
            })?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::TemplateSyntax {
                message: describe(&e),
            })?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageObject(m.clone())))
            .collect();
        let base = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => (),
            documents => (),
        };
        let ctx = if vars.is_empty() {
            base
        } else {
            let extra: std::collections::BTreeMap<String, Value> = vars
                .iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect();
            minijinja::context! { ..base, ..Value::from(extra) }
        };
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(message) => Error::TemplateRaised { message },
            None => Error::TemplateRender {
                message: describe(&e),
            },
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text bound to `bos_token` while rendering.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text bound to `eos_token` while rendering.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("compiles", &self.env.is_ok())
            .finish()
    }
}

/// A JSON value as a template value.
fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(json_value).collect::<Vec<_>>()),
        J::Object(m) => Value::from(
            m.iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect::<std::collections::BTreeMap<String, Value>>(),
        ),
    }
}

/// minijinja error with its template line, e.g. `unknown method: ... (in chat_template:1)`.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The message passed to `raise_exception`, if that is what failed.
fn raised_message(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(Raised(message)) = err.downcast_ref::<Raised>() {
            return Some(message.clone());
        }
        source = err.source();
    }
    None
}

/// Marker attached to the error `raise_exception` returns.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The environment transformers uses, rebuilt on minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(python_method);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(Raised(message)),
            )
        },
    );
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env
}

/// Renders `None`, `True` and `False` as Jinja2 on Python does.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    let text = match value.kind() {
        ValueKind::None => "None",
        ValueKind::Bool if value.is_true() => "True",
        ValueKind::Bool => "False",
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(text)
        .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
}

/// A message as a map with keys in Python's order (`role`, then `content`).
#[derive(Debug)]
struct MessageObject(Message);

impl Object for MessageObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

type MjResult<T> = std::result::Result<T, minijinja::Error>;

fn bad_args(method: &str, expected: &str) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{method}() takes {expected}"),
    )
}

fn string_arg<'a>(args: &'a [Value], i: usize, method: &str) -> MjResult<Option<&'a str>> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| bad_args(method, "a string argument")),
    }
}

fn python_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> MjResult<Value> {
    if let Some(s) = value.as_str() {
        return string_method(state, value, s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return map_method(value, method, args);
    }
    Err(minijinja::Error::from(ErrorKind::UnknownMethod))
}

fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

fn string_method(
    state: &mut State,
    value: &Value,
    s: &str,
    method: &str,
    args: &[Value],
) -> MjResult<Value> {
    let strip = |chars: Option<&str>, left: bool, right: bool| -> Value {
        let matches = |c: char| match chars {
            Some(set) => set.contains(c),
            None => python_isspace(c),
        };
        let mut out = s;
        if left {
            out = out.trim_start_matches(matches);
        }
        if right {
            out = out.trim_end_matches(matches);
        }
        Value::from(out)
    };
    let affix_test = |method: &str, test: &dyn Fn(&str) -> bool| -> MjResult<Value> {
        let arg = args.first().ok_or_else(|| bad_args(method, "a prefix"))?;
        if let Some(p) = arg.as_str() {
            return Ok(Value::from(test(p)));
        }
        for item in arg.try_iter()? {
            let p = item.as_str().ok_or_else(|| bad_args(method, "strings"))?;
            if test(p) {
                return Ok(Value::from(true));
            }
        }
        Ok(Value::from(false))
    };
    match method {
        "strip" => Ok(strip(string_arg(args, 0, method)?, true, true)),
        "lstrip" => Ok(strip(string_arg(args, 0, method)?, true, false)),
        "rstrip" => Ok(strip(string_arg(args, 0, method)?, false, true)),
        "startswith" => affix_test(method, &|p| s.starts_with(p)),
        "endswith" => affix_test(method, &|p| s.ends_with(p)),
        "split" | "rsplit" => {
            let sep = string_arg(args, 0, method)?;
            let maxsplit = args
                .get(1)
                .and_then(Value::as_i64)
                .filter(|&n| n >= 0)
                .map(|n| n as usize);
            let parts: Vec<Value> = match (sep, maxsplit) {
                (Some(""), _) => return Err(bad_args(method, "a non-empty separator")),
                (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                (Some(sep), Some(n)) if method == "split" => {
                    s.splitn(n + 1, sep).map(Value::from).collect()
                }
                (Some(sep), Some(n)) => {
                    let mut v: Vec<Value> = s.rsplitn(n + 1, sep).map(Value::from).collect();
                    v.reverse();
                    v
                }
                (None, _) => s
                    .split(python_isspace)
                    .filter(|w| !w.is_empty())
                    .map(Value::from)
                    .collect(),
            };
            Ok(Value::from(parts))
        }
        "upper" | "lower" | "title" | "capitalize" => {
            state.apply_filter(method, std::slice::from_ref(value))
        }
        "replace" => {
            let (Some(old), Some(new)) =
                (string_arg(args, 0, method)?, string_arg(args, 1, method)?)
            else {
                return Err(bad_args(method, "two strings"));
            };
            match args.get(2).and_then(Value::as_i64) {
                Some(n) if n >= 0 => Ok(Value::from(s.replacen(old, new, n as usize))),
                _ => Ok(Value::from(s.replace(old, new))),
            }
        }
        "find" => {
            let sub = string_arg(args, 0, method)?.ok_or_else(|| bad_args(method, "a string"))?;
            Ok(Value::from(match s.find(sub) {
                Some(byte) => s[..byte].chars().count() as i64,
                None => -1,
            }))
        }
        "count" => {
            let sub = string_arg(args, 0, method)?.ok_or_else(|| bad_args(method, "a string"))?;
            Ok(Value::from(if sub.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(sub).count()
            }))
        }
        "join" => {
            let items = args
                .first()
                .ok_or_else(|| bad_args(method, "an iterable"))?;
            let mut parts = Vec::new();
            for item in items.try_iter()? {
                parts.push(item.to_string());
            }
            Ok(Value::from(parts.join(s)))
        }
        "isdigit" => Ok(Value::from(
            !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()),
        )),
        "isalpha" => Ok(Value::from(
            !s.is_empty() && s.chars().all(char::is_alphabetic),
        )),
        "isalnum" => Ok(Value::from(
            !s.is_empty() && s.chars().all(char::is_alphanumeric),
        )),
        "isspace" => Ok(Value::from(!s.is_empty() && s.chars().all(python_isspace))),
        "islower" => Ok(Value::from(
            s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase),
        )),
        "isupper" => Ok(Value::from(
            s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase),
        )),
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

fn map_method(value: &Value, method: &str, args: &[Value]) -> MjResult<Value> {
    match method {
        "items" => {
            let mut pairs = Vec::new();
            for key in value.try_iter()? {
                let v = value.get_item(&key)?;
                pairs.push(Value::from(vec![key, v]));
            }
            Ok(Value::from(pairs))
        }
        "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
        "values" => {
            let mut out = Vec::new();
            for key in value.try_iter()? {
                out.push(value.get_item(&key)?);
            }
            Ok(Value::from(out))
        }
        "get" => {
            let key = args.first().ok_or_else(|| bad_args(method, "a key"))?;
            let v = value.get_item(key)?;
            Ok(if v.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                v
            })
        }
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`; no HTML escaping.
fn tojson(value: &Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> MjResult<Value> {
    let ensure_ascii = match ensure_ascii {
        Some(b) => b,
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(bad_args("tojson", "an integer or string indent")),
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => return Err(bad_args("tojson", "separators as two strings")),
                },
                _ => return Err(bad_args("tojson", "separators as two strings")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(value: &Value) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("Object of kind {} is not JSON serializable", value.kind()),
    )
}

fn write_json(out: &mut String, value: &Value, style: &JsonStyle, depth: usize) -> MjResult<()> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), style, depth, |out, i| {
                write_json(out, &items[i], style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let v = value.get_item(&key)?;
                entries.push((json_key(&key)?, v));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), style, depth, |out, i| {
                write_json_string(out, &entries[i].0, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, &entries[i].1, style, depth + 1)
            })?;
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Python converts non-string dict keys with `str()`-like rules.
fn json_key(key: &Value) -> MjResult<String> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => python_float_repr(f64::try_from(key.clone())?),
        _ => return Err(not_serializable(key)),
    })
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    style: &JsonStyle,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> MjResult<()>,
) -> MjResult<()> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent outside 1e-4..1e16.
pub(crate) fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if digits.len() <= point as usize {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

/// `strftime_now(format)`: the current time (UTC) formatted with the common
/// `strftime` directives (`%Y %m %d %H %M %S %y %j %b %B %a %A %p %I %%`, and
/// `%-d`-style unpadded forms). Unknown directives are kept literally.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats a Unix time (UTC).
pub(crate) fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    );
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(day_of_year, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[Message]) -> Result<String> {
        ChatTemplate::new(src.to_string(), "<s>".into(), "</s>".into()).render(messages, true)
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
        assert_eq!(render(src, &[Message::user("hi")]).unwrap(), "U:hi\n");
    }

    #[test]
    fn raise_exception_is_typed() {
        let src = "{{ raise_exception('roles must alternate') }}";
        let err = render(src, &[]).unwrap_err();
        assert!(
            matches!(err, Error::TemplateRaised { ref message } if message == "roles must alternate")
        );
    }

    #[test]
    fn syntax_error_is_reported_on_render() {
        let err = render("{% for %}", &[]).unwrap_err();
        assert!(matches!(err, Error::TemplateSyntax { .. }));
    }

    #[test]
    fn undefined_method_is_a_render_error() {
        let err = render("{{ messages.nonexistent_method() }}", &[]).unwrap_err();
        assert!(matches!(err, Error::TemplateRender { .. }));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson(indent=2) }}|{{ 'é<\"' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}";
        assert_eq!(
            render(src, &[Message::user("hi\n")]).unwrap(),
            "{\"role\": \"user\", \"content\": \"hi\\n\"}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}|\"é<\\\"\"|\"\\u00e9\""
        );
    }

    #[test]
    fn python_string_and_dict_methods() {
        let src = "{{ messages[0].content.strip() }}|{{ messages[0].content.startswith(('x', '  a')) }}|{{ 'a,b,c'.split(',', 1) | join('+') }}|{% for k, v in messages[0].items() %}{{ k }}={{ v | trim }};{% endfor %}|{{ messages[0].get('name', 'anon') }}|{{ none }}";
        assert_eq!(
            render(src, &[Message::user("  a b ")]).unwrap(),
            "a b|True|a+b,c|role=user;content=a b;|anon|None"
        );
    }

    #[test]
    fn float_repr_matches_python() {
        for (f, want) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (-0.0, "-0.0"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn strftime_known_date() {
        // 2024-07-23 13:05:09 UTC, a Tuesday.
        assert_eq!(
            strftime("%d %b %Y|%-d %B|%A %H:%M:%S|%j|%%", 1_721_739_909),
            "23 Jul 2024|23 July|Tuesday 13:05:09|205|%"
        );
    }
}
