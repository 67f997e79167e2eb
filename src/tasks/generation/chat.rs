//! Chat templates: a generation request's chat messages rendered into the text
//! the model was trained on, with the model repo's own Jinja template, exactly as
//! Hugging Face `transformers` renders it (`apply_chat_template(messages,
//! add_generation_prompt=True, tokenize=False)`). The caller then tokenizes the
//! text without adding special tokens (the template writes them itself), which is
//! what `apply_chat_template(..., tokenize=True)` does.
//!
//! `transformers` (5.x, `utils/chat_template_utils.py`) renders with jinja2's
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
//! `loopcontrols` extension and its `{% generation %}` tag, its own `tojson` filter
//! (`json.dumps(ensure_ascii=False)`, no HTML escaping), and the globals
//! `raise_exception`, `strftime_now`, `dict` and `namespace`. The template sees
//! `messages`, `tools` and `documents` (both `None` here), `add_generation_prompt`,
//! and the tokenizer's named special tokens (`special_tokens_map`: `bos_token`,
//! `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`,
//! those that are set). This module does the same with `minijinja`, with
//! `minijinja-contrib`'s Python methods (`.strip()`, `.split()`, `.items()`...),
//! and with jinja2's output of `None`, `True` and lists (`{{ x }}` writes Python's
//! `str(x)`).
//!
//! Known differences from jinja2 (none in the templates of the major model
//! families): a tuple (`(1, 2)`, `dictsort`'s pairs) prints as a list; minijinja
//! accepts a few filters and methods jinja2 lacks (`|split`), where jinja2 refuses
//! the template; variables `set` inside `{% generation %}` leak out of it; a
//! failing template's message is minijinja's, not jinja2's (except
//! `raise_exception`'s, which is the template's own); `strftime_now` formats the
//! time in UTC (Python: the machine's local time, UTC on a server), with `%c`,
//! `%x`, `%X` in the C locale.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use harness_client::ChatMessage;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};

/// The name of the template in its environment (error messages show it).
const NAME: &str = "chat_template";

/// The special tokens `transformers` hands a template (`special_tokens_map`: the
/// tokenizer's `SPECIAL_TOKENS_ATTRIBUTES` that are set).
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A model's chat template, compiled, with the special tokens it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`... as tokenizer_config.json sets them.
    special_tokens: BTreeMap<&'static str, String>,
    /// Where the template came from, for error messages.
    origin: &'static str,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

/// The message `raise_exception(message)` raised, carried through minijinja's
/// error as its source.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// The chat template of a model repo, from the texts of its
    /// `tokenizer_config.json` and `chat_template.jinja` (`None`: the repo has no
    /// such file). As `transformers` 5 does, `chat_template.jinja` wins over the
    /// `chat_template` key of tokenizer_config.json, which is a template or a list
    /// of `{"name", "template"}` (the one named `default` is used). `Ok(None)`:
    /// the repo has no template. `Err`: tokenizer_config.json is not JSON, or the
    /// template is malformed or does not compile; the message says which and
    /// where.
    pub fn from_files(
        tokenizer_config: Option<&str>,
        template_file: Option<&str>,
    ) -> Result<Option<ChatTemplate>, String> {
        let config: Option<serde_json::Value> = tokenizer_config
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|e| format!("tokenizer_config.json is not valid JSON: {e}"))
            })
            .transpose()?;
        let (source, origin) = match template_file {
            Some(text) => (text.to_string(), "chat_template.jinja"),
            None => match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(entry) => (
                    config_template(entry)?,
                    "the chat_template of tokenizer_config.json",
                ),
            },
        };
        let special_tokens = match &config {
            Some(config) => special_tokens(config)?,
            None => BTreeMap::new(),
        };
        let env = environment(source).map_err(|e| {
            format!(
                "the model's chat template ({origin}) does not compile: {}",
                describe(&e)
            )
        })?;
        Ok(Some(ChatTemplate {
            env,
            special_tokens,
            origin,
        }))
    }

    /// Where the template came from: `chat_template.jinja` or tokenizer_config.json.
    pub fn origin(&self) -> &'static str {
        self.origin
    }

    /// `messages` rendered, with the assistant's turn opened after them when
    /// `add_generation_prompt` (when the template supports it). `Err`: why the
    /// template refused them, as the caller should read it: the template's own
    /// `raise_exception` message verbatim (such as Mistral's `Conversation roles
    /// must alternate user/assistant/user/assistant/...` for a system message),
    /// no messages, or a failure of the template itself.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        if messages.is_empty() {
            return Err("a chat needs at least one message".to_string());
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut context: Vec<(&str, Value)> = self
            .special_tokens
            .iter()
            .map(|(name, token)| (*name, Value::from(token.as_str())))
            .collect();
        context.extend([
            ("messages", Value::from(messages)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        self.render_context(Value::from_pairs(context))
    }

    fn render_context(&self, context: Value) -> Result<String, String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| format!("the chat template is missing: {e}"))?;
        template.render(context).map_err(|e| match raised(&e) {
            Some(message) => message.to_string(),
            None => format!(
                "the model's chat template ({}) failed: {}",
                self.origin,
                describe(&e)
            ),
        })
    }
}

/// The template of tokenizer_config.json's `chat_template`: a string, or the one
/// named `default` of a list of `{"name", "template"}`.
fn config_template(entry: &serde_json::Value) -> Result<String, String> {
    match entry {
        serde_json::Value::String(text) => Ok(text.clone()),
        serde_json::Value::Array(list) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(template.to_string()),
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => {
                        return Err(format!(
                            "tokenizer_config.json's chat_template list has an entry that is \
                             not {{\"name\": ..., \"template\": ...}}: {item}"
                        ))
                    }
                }
            }
            Err(format!(
                "tokenizer_config.json has several chat templates ({}) and none named \
                 \"default\": add a chat_template.jinja to the repo",
                names.join(", ")
            ))
        }
        other => Err(format!(
            "tokenizer_config.json's chat_template is neither a template nor a list of them: {other}"
        )),
    }
}

/// tokenizer_config.json's named special tokens: each a string, or an
/// `AddedToken` object with its `content`.
fn special_tokens(config: &serde_json::Value) -> Result<BTreeMap<&'static str, String>, String> {
    let mut tokens = BTreeMap::new();
    for name in SPECIAL_TOKENS {
        let token = match config.get(name) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(token)) => token.clone(),
            Some(object) => match object.get("content").and_then(|c| c.as_str()) {
                Some(token) => token.to_string(),
                None => {
                    return Err(format!(
                        "tokenizer_config.json's {name} is neither a string nor an added token \
                         with a content: {object}"
                    ))
                }
            },
        };
        tokens.insert(name, token);
    }
    Ok(tokens)
}

/// The message of the `raise_exception` that `error` comes from, if it does.
fn raised(error: &Error) -> Option<&str> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(Raised(message)) = e.downcast_ref::<Raised>() {
            return Some(message);
        }
        source = e.source();
    }
    None
}

/// An error of minijinja's with what caused it (a line of the template).
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        let _ = write!(text, ": {e}");
        source = e.source();
    }
    text
}

/// The environment `transformers` renders templates in, holding `source`.
fn environment(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_formatter(python_formatter);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    // jinja2's tests where they differ from minijinja's: a string and a mapping
    // are sequences, undefined is iterable, none is not.
    env.add_test("sequence", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Undefined
        )
    });
    env.add_test("iterable", |v: &Value| {
        !v.is_none() && (v.is_undefined() || v.kind() == ValueKind::String || v.try_iter().is_ok())
    });
    // A template is the repo's code: bounded, so that one that loops for ever
    // fails its request instead of holding a thread.
    env.set_fuel(Some(RENDER_FUEL));
    env.add_template_owned(NAME, generation_tags(&source))?;
    Ok(env)
}

/// Instructions a rendering may run: real templates take a few hundred per
/// message, so this is thousands of messages' worth.
const RENDER_FUEL: u64 = 50_000_000;

/// `raise_exception(message)`: fails the rendering with `message`.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// `{{ value }}` as jinja2 writes it: Python's `str(value)` for `None`, booleans,
/// lists and dicts; strings and numbers as minijinja writes them.
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            py_repr(&mut text, value, 0)?;
            out.write_str(&text).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Nesting of lists and dicts that `{{ }}` and `tojson` write, at most.
const MAX_DEPTH: usize = 256;

/// Python's `repr(value)`.
fn py_repr(out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "value nested too deep",
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => match f64_of(value) {
            Some(f) => out.push_str(&py_float(f, false)),
            None => out.push_str(&value.to_string()),
        },
        ValueKind::String => py_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item, depth + 1)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key, depth + 1)?;
                out.push_str(": ");
                py_repr(out, &value.get_item(&key)?, depth + 1)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// A float value as an `f64`; `None` for integers (written as they are).
fn f64_of(value: &Value) -> Option<f64> {
    if value.is_integer() {
        None
    } else {
        f64::try_from(value.clone()).ok()
    }
}

/// Python's `repr(str)`: single quotes unless the text has one and no double
/// quote; backslashes, that quote and control characters escaped.
fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let n = c as u32;
                if n < 0x100 {
                    let _ = write!(out, "\\x{n:02x}");
                } else {
                    let _ = write!(out, "\\u{n:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)` (`json.dumps` writes floats the same, but
/// `NaN`/`Infinity` where repr writes `nan`/`inf`): the shortest digits that
/// round-trip, positional for exponents -4 to 15, `1e+16` style beyond.
fn py_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.to_string();
    }
    if f.is_infinite() {
        let sign = if f < 0.0 { "-" } else { "" };
        return format!("{sign}{}", if json { "Infinity" } else { "inf" });
    }
    // `{:e}` writes the shortest round-trip digits: `-1.2345e-7`.
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
        let text = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{text}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// The `tojson` filter as `transformers` defines it: `json.dumps(value,
/// ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, each
/// argument settable by keyword; no HTML escaping (jinja2's own filter escapes
/// `<>&'`).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson's indent must be a number or a string",
                    ))
                }
            },
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson's separators must be two strings",
                    ))
                }
            }
        }
        // Python's defaults: ", " without an indent, "," with one.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json = Json {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    json.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` settings.
struct Json {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl Json {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "value nested too deep",
            ));
        }
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => match f64_of(value) {
                Some(f) => out.push_str(&py_float(f, true)),
                None => out.push_str(&value.to_string()),
            },
            ValueKind::String => self.string(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((self.key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.string(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("Object of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// A dict key as `json.dumps` writes it: strings as they are, numbers,
    /// booleans and None as their JSON.
    fn key(&self, key: &Value) -> Result<String, Error> {
        Ok(match key.kind() {
            ValueKind::String => key.as_str().unwrap_or_default().to_string(),
            ValueKind::None => "null".to_string(),
            ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
            ValueKind::Number => match f64_of(key) {
                Some(f) => py_float(f, true),
                None => key.to_string(),
            },
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("keys must be str, int, float, bool or None, not {kind}"),
                ))
            }
        })
    }

    /// A JSON string as Python writes it: `"`, `\` and control characters below
    /// U+0020 escaped; beyond ASCII as it is (or `\uXXXX` with `ensure_ascii`).
    fn string(&self, out: &mut String, s: &str) {
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
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// transformers' `{% generation %}...{% endgeneration %}` (which marks the
/// assistant's text for its masks and renders its body unchanged) made into
/// `{% if true %}...{% endif %}`, which renders the same and trims the same
/// whitespace: minijinja has no such tag.
fn generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The close after the open's two bytes (`{%}` is text, not a tag's end).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(body) => (&inner[..1], body),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => {
                let _ = write!(out, "{{%{open} if true {close}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{open} endif {close}%}}");
            }
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `strftime_now(format)`: the time now, formatted as Python's
/// `datetime.now().strftime(format)` does (in UTC).
fn strftime_now(format: &str) -> Result<String, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("the clock is before 1970: {e}"),
        )
    })?;
    Ok(strftime(format, now.as_secs() as i64, now.subsec_micros()))
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
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

/// A UTC date and time, broken down.
struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
    /// 0 = Sunday
    weekday: u32,
    /// 0..=365
    yday: u32,
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

impl DateTime {
    fn at(secs: i64, micros: u32) -> DateTime {
        let days = secs.div_euclid(86_400);
        let of_day = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil(days);
        const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = BEFORE[month as usize - 1] + day - 1 + u32::from(month > 2 && is_leap(year));
        DateTime {
            year,
            month,
            day,
            hour: of_day / 3600,
            minute: of_day / 60 % 60,
            second: of_day % 60,
            micros,
            weekday: (days + 4).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
            yday,
        }
    }

    /// The ISO 8601 week-numbering year and week.
    fn iso_week(&self) -> (i64, u32) {
        let monday_based = (self.weekday + 6) % 7; // 0 = Monday
        let week = (self.yday as i64 - monday_based as i64 + 10) / 7;
        let weeks_in = |year: i64| {
            // A year has 53 weeks if it starts on a Thursday, or a Wednesday in a leap year.
            let jan1 = DateTime::at(days_from_civil(year, 1, 1) * 86_400, 0).weekday;
            if jan1 == 4 || (jan1 == 3 && is_leap(year)) {
                53
            } else {
                52
            }
        };
        if week < 1 {
            (self.year - 1, weeks_in(self.year - 1))
        } else if week > weeks_in(self.year) as i64 {
            (self.year + 1, 1)
        } else {
            (self.year, week as u32)
        }
    }
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `format` at `secs` since the epoch (UTC), as Python's `strftime` (glibc's, C
/// locale) writes it, for a naive datetime (`%z`, `%Z` empty). glibc's `-` flag
/// (`%-d`: no padding) is understood; an unknown directive is written as it is.
fn strftime(format: &str, secs: i64, micros: u32) -> String {
    let t = DateTime::at(secs, micros);
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
        let Some(d) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize, pad: char| {
            if unpadded {
                let _ = write!(out, "{n}");
            } else if pad == '0' {
                let _ = write!(out, "{n:0width$}");
            } else {
                let _ = write!(out, "{n:>width$}");
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) {
            12
        } else {
            t.hour % 12
        };
        match d {
            'a' => out.push_str(&DAYS[t.weekday as usize][..3]),
            'A' => out.push_str(DAYS[t.weekday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'C' => num(&mut out, t.year.div_euclid(100), 2, '0'),
            'd' => num(&mut out, t.day as i64, 2, '0'),
            'e' => num(&mut out, t.day as i64, 2, ' '),
            'f' => {
                let _ = write!(out, "{:06}", t.micros);
            }
            'H' => num(&mut out, t.hour as i64, 2, '0'),
            'k' => num(&mut out, t.hour as i64, 2, ' '),
            'I' => num(&mut out, hour12 as i64, 2, '0'),
            'l' => num(&mut out, hour12 as i64, 2, ' '),
            'j' => num(&mut out, t.yday as i64 + 1, 3, '0'),
            'm' => num(&mut out, t.month as i64, 2, '0'),
            'M' => num(&mut out, t.minute as i64, 2, '0'),
            'S' => num(&mut out, t.second as i64, 2, '0'),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'P' => out.push_str(if t.hour < 12 { "am" } else { "pm" }),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            'G' => {
                let _ = write!(out, "{}", t.iso_week().0);
            }
            'g' => num(&mut out, t.iso_week().0.rem_euclid(100), 2, '0'),
            'V' => num(&mut out, t.iso_week().1 as i64, 2, '0'),
            'U' => num(&mut out, ((t.yday + 7 - t.weekday) / 7) as i64, 2, '0'),
            'W' => num(
                &mut out,
                ((t.yday + 7 - (t.weekday + 6) % 7) / 7) as i64,
                2,
                '0',
            ),
            'u' => num(
                &mut out,
                (if t.weekday == 0 { 7 } else { t.weekday }) as i64,
                1,
                '0',
            ),
            'w' => num(&mut out, t.weekday as i64, 1, '0'),
            's' => {
                let _ = write!(out, "{secs}");
            }
            'F' => out.push_str(&strftime("%Y-%m-%d", secs, micros)),
            'T' | 'X' => out.push_str(&strftime("%H:%M:%S", secs, micros)),
            'R' => out.push_str(&strftime("%H:%M", secs, micros)),
            'D' | 'x' => out.push_str(&strftime("%m/%d/%y", secs, micros)),
            'c' => out.push_str(&strftime("%a %b %e %H:%M:%S %Y", secs, micros)),
            'r' => out.push_str(&strftime("%I:%M:%S %p", secs, micros)),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            'z' | 'Z' => {}
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! The expected strings are what transformers 5.24 (jinja2 3.1.6) renders,
    //! computed in the libtorch venv (`libtorch/install --python`) with:
    //!
    //! ```python
    //! from transformers.utils.chat_template_utils import render_jinja_template
    //! def render(template, messages, add_generation_prompt=True, **special):
    //!     # What apply_chat_template(..., tokenize=False) does with the
    //!     # tokenizer's special_tokens_map as the keyword arguments.
    //!     out, _ = render_jinja_template(conversations=[messages], chat_template=template,
    //!                                    add_generation_prompt=add_generation_prompt, **special)
    //!     return out[0]
    //! SYSTEM = {"role": "system", "content": "You are a terse assistant.  "}
    //! CHAT = [{"role": "user", "content": " What is the capital of France?"},
    //!         {"role": "assistant", "content": "Paris. "},
    //!         {"role": "user", "content": "And of 日本?"}]
    //! llama = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    //! render(MISTRAL, CHAT, **llama); render(MISTRAL, [SYSTEM] + CHAT, **llama)  # raises
    //! render(LLAMA_2, [SYSTEM] + CHAT, **llama); render(LLAMA_2, CHAT, **llama)
    //! qwen = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    //! render(QWEN_2, [SYSTEM] + CHAT, **qwen); render(QWEN_2, CHAT, False, **qwen)
    //! l3 = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    //! render(LLAMA_3_2, [SYSTEM] + CHAT, **l3).replace(
    //!     datetime.datetime.now().strftime("%d %b %Y"), "{DATE}")
    //! ```
    use super::*;

    /// `mistralai/Mistral-7B-Instruct-v0.2`'s template (tokenizer_config.json) as
    /// released: user and assistant turns only.
    const MISTRAL: &str = r##"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"##;

    /// `meta-llama/Llama-2-7b-chat-hf`'s template (tokenizer_config.json).
    const LLAMA_2: &str = r##"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"##;

    /// `Qwen/Qwen2-7B-Instruct`'s ChatML template (tokenizer_config.json).
    const QWEN_2: &str = r##"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"##;

    /// `meta-llama/Llama-3.2-1B-Instruct`'s template: Llama 3.1's with the date
    /// from `strftime_now`.
    const LLAMA_3_2: &str = r##"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"##;

    const LLAMA_CONFIG: &str = r#"{"add_bos_token": true,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "unk_token": "<unk>", "pad_token": null, "legacy": false}"#;

    fn system() -> ChatMessage {
        ChatMessage::system("You are a terse assistant.  ")
    }

    fn chat() -> Vec<ChatMessage> {
        vec![
            ChatMessage::user(" What is the capital of France?"),
            ChatMessage::assistant("Paris. "),
            ChatMessage::user("And of 日本?"),
        ]
    }

    fn with_system() -> Vec<ChatMessage> {
        let mut messages = vec![system()];
        messages.extend(chat());
        messages
    }

    /// The template `source` with the special tokens of `config`.
    fn template(source: &str, config: &str) -> ChatTemplate {
        ChatTemplate::from_files(Some(config), Some(source))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn mistral_renders_inst_turns_and_refuses_a_system_message() {
        let t = template(MISTRAL, LLAMA_CONFIG);
        let want = "<s>[INST]  What is the capital of France? [/INST]Paris. </s>[INST] And of 日本? [/INST]";
        assert_eq!(t.render(&chat(), true).unwrap(), want);
        assert_eq!(t.render(&chat(), false).unwrap(), want);
        let refusal = "Conversation roles must alternate user/assistant/user/assistant/...";
        assert_eq!(t.render(&with_system(), true).unwrap_err(), refusal);
        let tool = [ChatMessage::new("tool", "x")];
        assert_eq!(t.render(&tool, true).unwrap_err(), refusal);
    }

    #[test]
    fn llama_2_puts_the_system_message_in_the_first_turn() {
        let t = template(LLAMA_2, LLAMA_CONFIG);
        assert_eq!(
            t.render(&with_system(), true).unwrap(),
            "<s>[INST] <<SYS>>\nYou are a terse assistant.  \n<</SYS>>\n\n What is the capital of France? [/INST] Paris. </s><s>[INST] And of 日本? [/INST]"
        );
        assert_eq!(
            t.render(&chat(), true).unwrap(),
            "<s>[INST] What is the capital of France? [/INST] Paris. </s><s>[INST] And of 日本? [/INST]"
        );
        let two_users = [chat()[0].clone(), chat()[0].clone()];
        assert_eq!(
            t.render(&two_users, true).unwrap_err(),
            "Conversation roles must alternate user/assistant/user/assistant/..."
        );
    }

    #[test]
    fn qwen_2_chatml_opens_the_assistant_turn_on_request() {
        let config =
            r#"{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": null}"#;
        let t = template(QWEN_2, config);
        assert_eq!(
            t.render(&with_system(), true).unwrap(),
            "<|im_start|>system\nYou are a terse assistant.  <|im_end|>\n<|im_start|>user\n What is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis. <|im_end|>\n<|im_start|>user\nAnd of 日本?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&chat(), false).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n What is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis. <|im_end|>\n<|im_start|>user\nAnd of 日本?<|im_end|>\n"
        );
    }

    #[test]
    fn llama_3_2_dates_its_system_header_with_strftime_now() {
        let config = r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}"#;
        let t = template(LLAMA_3_2, config);
        let want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {DATE}\n\nYou are a terse assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd of 日本?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        // The date is read twice: retry across midnight.
        let rendered = loop {
            let before = strftime_now("%d %b %Y").unwrap();
            let rendered = t.render(&with_system(), true).unwrap();
            if strftime_now("%d %b %Y").unwrap() == before {
                break rendered.replace(&before, "{DATE}");
            }
        };
        assert_eq!(rendered, want);
        assert_eq!(strftime_now("%d %b %Y").unwrap().len(), 11);
    }

    /// Jinja features real templates use, against what transformers renders with
    /// the messages below and `bos_token`, `eos_token`, `unk_token` set.
    #[test]
    fn the_environment_renders_as_transformers_jinja2() {
        let messages = [
            ChatMessage::system(" Be brief. "),
            ChatMessage::user("Hi <b>&'\"\n\t\u{1} 日本 😀"),
            ChatMessage::assistant("Hello!"),
            ChatMessage::user("a,b, c"),
        ];
        let config = r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}"#;
        let cases = [
            ("{{ none }}|{{ true }}|{{ false }}|{{ [1, 'a', none, true, 2.5] }}|{{ {'a': 1, 'b': [none]} }}",
             "None|True|False|[1, 'a', None, True, 2.5]|{'a': 1, 'b': [None]}"),
            ("{{ messages | tojson }}",
             "[{\"role\": \"system\", \"content\": \" Be brief. \"}, {\"role\": \"user\", \"content\": \"Hi <b>&'\\\"\\n\\t\\u0001 日本 😀\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}, {\"role\": \"user\", \"content\": \"a,b, c\"}]"),
            ("{{ messages | tojson(indent=2) }}",
             "[\n  {\n    \"role\": \"system\",\n    \"content\": \" Be brief. \"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"Hi <b>&'\\\"\\n\\t\\u0001 日本 😀\"\n  },\n  {\n    \"role\": \"assistant\",\n    \"content\": \"Hello!\"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"a,b, c\"\n  }\n]"),
            ("{{ {'z': 1, 'a': {'q': []}, 'e': {}} | tojson(indent=4, sort_keys=true) }}",
             "{\n    \"a\": {\n        \"q\": []\n    },\n    \"e\": {},\n    \"z\": 1\n}"),
            ("{{ {'z': 1.0, 'a': 1e20, 'b': 0.0001, 'c': 0.00001, 'd': -2.5, 'f': 123456789012345678.0, 'g': 1.5e-7, 'h': 3.14159} | tojson }}",
             "{\"z\": 1.0, \"a\": 1e+20, \"b\": 0.0001, \"c\": 1e-05, \"d\": -2.5, \"f\": 1.2345678901234568e+17, \"g\": 1.5e-07, \"h\": 3.14159}"),
            ("{{ [1,2] | tojson(separators=[',', ':']) }}",
             "[1,2]"),
            ("{{ 'é<>&' | tojson(ensure_ascii=true) }} {{ '😀' | tojson(ensure_ascii=true) }}",
             "\"\\u00e9<>&\" \"\\ud83d\\ude00\""),
            ("{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}{{ m.role }};{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
             "system;user;user;"),
            ("{% for m in messages %}\n  {% if m.role == 'user' %}\n    U:{{ m.content }}\n  {% endif %}\n{% endfor %}\n",
             "    U:Hi <b>&'\"\n\t\u{1} 日本 😀\n    U:a,b, c\n"),
            ("{{ messages[0].content.strip() }}|{{ messages[0].content.lstrip() }}|{{ messages[0].content.rstrip() }}|{{ messages[3].content.split(',') }}|{{ messages[3].content.split() }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith('bc') }}|{{ 'abc'.upper() }}|{{ 'a b'.title() }}|{{ 'x'.replace('x', 'y') }}",
             "Be brief.|Be brief. | Be brief.|['a', 'b', ' c']|['a,b,', 'c']|True|True|ABC|A B|y"),
            ("{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.found = true %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.found }} {{ ns.n }}",
             "True 2"),
            ("{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].keys() | list }}{{ messages[0].get('x', 'd') }}{{ messages[0].get('x') }}",
             "role=system;content= Be brief. ;['role', 'content']dNone"),
            ("{{ 'abc' is string }} {{ 'abc' is sequence }} {{ 'abc' is iterable }} {{ messages[0] is mapping }} {{ messages[0] is sequence }} {{ undefined_thing is iterable }} {{ undefined_thing is sequence }} {{ none is iterable }} {{ 3 is number }} {{ messages is sequence }}",
             "True True True True True True True False True True"),
            ("[{{ foo }}]{{ foo is defined }}{{ tools is none }}{{ documents is none }}{{ tools is defined }}{{ add_generation_prompt }}",
             "[]FalseTrueTrueTrueTrue"),
            ("{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(' / ') }}|{{ messages | length }}|{{ messages[-1].content }}|{{ messages[1:] | length }}",
             "Hi <b>&'\"\n\t\u{1} 日本 😀 / a,b, c|4|a,b, c|3"),
            ("{{ dict(a=1, b='x') }}{{ dict(a=1) | tojson }}",
             "{'a': 1, 'b': 'x'}{\"a\": 1}"),
            ("{{ bos_token }}{{ eos_token }}{{ unk_token }}{{ pad_token }}.",
             "<s></s><unk>."),
            ("{%- generation -%}  {{ messages[2].content }}  {%- endgeneration %}\n{% generation %}\nX{% endgeneration %}",
             "Hello!X"),
            ("{{ 10 / 4 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 2 ** 3 }} {{ 1.0 }} {{ 3 * 'ab' }} {{ 'ab' * 2 }} {{ 'a' ~ 1 ~ none }}",
             "2.5 3 1 8 1.0 ababab abab a1None"),
            ("{{ messages[0]['content'] | trim }}|{{ 'AbC' | lower }}|{{ [3,1,2] | sort }}|{{ 'abc' | length }}|{{ [1,2,3] | first }}|{{ [1,2,3] | last }}|{{ 'x' | default('d') }}|{{ nope | default('d') }}",
             "Be brief.|abc|[1, 2, 3]|3|1|3|x|d"),
            ("{% macro m(x) %}<{{ x }}>{% endmacro %}{% for msg in messages %}{{ m(msg.role) }}{% endfor %}",
             "<system><user><assistant><user>"),
            ("{{ 'a' in 'cat' }} {{ 'role' in messages[0] }} {{ 'zz' not in messages[0] }} {{ loop is defined }}",
             "True True True False"),
            ("{{ messages[0].content.split(' ') | tojson }}{{ 'a\\nb'.splitlines() }}",
             "[\"\", \"Be\", \"brief.\", \"\"]['a', 'b']"),
            ("line1\n",
             "line1"),
            ("line1\n\n",
             "line1\n"),
            ("{% if true %}\n  x\n{% endif %}\n  {%+ if true %}y{% endif %}\n",
             "  x\n  y"),
            ("{{ \"%s-%s\" | format('a', 'b') }}",
             "a-b"),
            ("{{ (messages | first).role }} {{ messages | map(attribute='role') | unique | list }}",
             "system ['system', 'user', 'assistant']"),
            ("{{ 'Hello' if add_generation_prompt else 'Bye' }}{{ messages[0].content[:3] }}{{ messages[0].content[1] }}",
             "Hello BeB"),
            ("{{ ['a', \"it's\", 'say \"x\"', 'both \\'\"', 'back\\\\slash'] }}",
             "['a', \"it's\", 'say \"x\"', 'both \\'\"', 'back\\\\slash']"),
        ];
        for (source, want) in cases {
            let t = template(source, config);
            assert_eq!(t.render(&messages, true).unwrap(), want, "{source}");
        }
        let t = template(
            "{{ raise_exception('Custom: ' + messages[0].role) }}",
            config,
        );
        assert_eq!(t.render(&messages, true).unwrap_err(), "Custom: system");
    }

    #[test]
    fn the_template_file_wins_over_the_config_and_a_list_gives_its_default() {
        let config = r#"{"bos_token": "<s>", "chat_template": "config {{ bos_token }}"}"#;
        let t = ChatTemplate::from_files(Some(config), Some("file {{ bos_token }}"))
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&chat(), true).unwrap(), "file <s>");
        assert_eq!(t.origin(), "chat_template.jinja");
        let t = ChatTemplate::from_files(Some(config), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&chat(), true).unwrap(), "config <s>");

        let listed = r#"{"chat_template": [{"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default {{ messages | length }}"}]}"#;
        let t = ChatTemplate::from_files(Some(listed), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&chat(), true).unwrap(), "default 3");
        let no_default = r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#;
        let e = ChatTemplate::from_files(Some(no_default), None).unwrap_err();
        assert!(
            e.contains("none named \"default\"") && e.contains("tool_use"),
            "{e}"
        );
    }

    #[test]
    fn a_repo_without_a_template_has_none_and_a_broken_one_fails_the_load() {
        assert!(ChatTemplate::from_files(None, None).unwrap().is_none());
        assert!(ChatTemplate::from_files(Some(LLAMA_CONFIG), None)
            .unwrap()
            .is_none());
        let null = r#"{"chat_template": null}"#;
        assert!(ChatTemplate::from_files(Some(null), None)
            .unwrap()
            .is_none());

        let e = ChatTemplate::from_files(None, Some("{% for m in messages %}{{ m }}")).unwrap_err();
        assert!(
            e.contains("chat_template.jinja") && e.contains("does not compile"),
            "{e}"
        );
        assert!(e.contains("line 1") || e.contains("chat_template:1"), "{e}");
        let e = ChatTemplate::from_files(Some("{not json"), None).unwrap_err();
        assert!(e.contains("tokenizer_config.json"), "{e}");
        let e = ChatTemplate::from_files(Some(r#"{"chat_template": 3}"#), None).unwrap_err();
        assert!(e.contains("chat_template"), "{e}");
    }

    #[test]
    fn special_tokens_come_from_strings_and_added_tokens() {
        let source = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ mask_token is defined }}";
        let t = template(source, LLAMA_CONFIG);
        assert_eq!(t.render(&chat(), true).unwrap(), "<s>|</s>|<unk>||False");
        // Without a config the template sees no special tokens.
        let t = ChatTemplate::from_files(None, Some(source))
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&chat(), true).unwrap(), "||||False");
    }

    #[test]
    fn an_empty_chat_and_a_failing_template_are_errors_for_the_caller() {
        let t = template(QWEN_2, "{}");
        assert_eq!(
            t.render(&[], true).unwrap_err(),
            "a chat needs at least one message"
        );
        let t = template("{{ messages[0].nothing.deeper }}", "{}");
        let e = t.render(&chat(), true).unwrap_err();
        assert!(
            e.contains("chat template") && e.contains("undefined"),
            "{e}"
        );
    }

    #[test]
    fn a_template_is_shared_across_threads() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<ChatTemplate>();
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        assert_eq!(
            generation_tags("a{%- generation -%}b{% endgeneration %}{%generation+%}c{%+endgeneration%}{% if x %}"),
            "a{%- if true -%}b{% endif %}{% if true +%}c{%+ endif %}{% if x %}"
        );
        assert_eq!(
            generation_tags("{{ x }} {% unclosed"),
            "{{ x }} {% unclosed"
        );
        // `{%}` in a string is not a tag whose end comes before its start.
        assert_eq!(generation_tags("{{ '{%}' }}"), "{{ '{%}' }}");
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel() {
        let template = ChatTemplate::from_files(
            None,
            Some(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            ),
        )
        .unwrap()
        .unwrap();
        let err = template
            .render(&[ChatMessage::user("hi")], true)
            .unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn strftime_writes_as_python_does() {
        // datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).strftime(f)
        let formats = [
            "%d %b %Y",
            "%B %d, %Y",
            "%Y-%m-%d %H:%M:%S",
            "%a %A %j %U %W %V %G %g %u %w %y %C %e %I %p %-d %-m %F %T %D %R %c %x %X %%",
            "%Z%z|%q|%f",
        ];
        let cases: [(i64, [&str; 5]); 9] = [
            (0, [
                "01 Jan 1970",
                "January 01, 1970",
                "1970-01-01 00:00:00",
                "Thu Thursday 001 00 00 01 1970 70 4 4 70 19  1 12 AM 1 1 1970-01-01 00:00:00 01/01/70 00:00 Thu Jan  1 00:00:00 1970 01/01/70 00:00:00 %",
                "|%q|000000",
            ]),
            (951782400, [
                "29 Feb 2000",
                "February 29, 2000",
                "2000-02-29 00:00:00",
                "Tue Tuesday 060 09 09 09 2000 00 2 2 00 20 29 12 AM 29 2 2000-02-29 00:00:00 02/29/00 00:00 Tue Feb 29 00:00:00 2000 02/29/00 00:00:00 %",
                "|%q|000000",
            ]),
            (1722042061, [
                "27 Jul 2024",
                "July 27, 2024",
                "2024-07-27 01:01:01",
                "Sat Saturday 209 29 30 30 2024 24 6 6 24 20 27 01 AM 27 7 2024-07-27 01:01:01 07/27/24 01:01 Sat Jul 27 01:01:01 2024 07/27/24 01:01:01 %",
                "|%q|000000",
            ]),
            (1735689599, [
                "31 Dec 2024",
                "December 31, 2024",
                "2024-12-31 23:59:59",
                "Tue Tuesday 366 52 53 01 2025 25 2 2 24 20 31 11 PM 31 12 2024-12-31 23:59:59 12/31/24 23:59 Tue Dec 31 23:59:59 2024 12/31/24 23:59:59 %",
                "|%q|000000",
            ]),
            (1704067200, [
                "01 Jan 2024",
                "January 01, 2024",
                "2024-01-01 00:00:00",
                "Mon Monday 001 00 01 01 2024 24 1 1 24 20  1 12 AM 1 1 2024-01-01 00:00:00 01/01/24 00:00 Mon Jan  1 00:00:00 2024 01/01/24 00:00:00 %",
                "|%q|000000",
            ]),
            (1609459200, [
                "01 Jan 2021",
                "January 01, 2021",
                "2021-01-01 00:00:00",
                "Fri Friday 001 00 00 53 2020 20 5 5 21 20  1 12 AM 1 1 2021-01-01 00:00:00 01/01/21 00:00 Fri Jan  1 00:00:00 2021 01/01/21 00:00:00 %",
                "|%q|000000",
            ]),
            (4102444800, [
                "01 Jan 2100",
                "January 01, 2100",
                "2100-01-01 00:00:00",
                "Fri Friday 001 00 00 53 2099 99 5 5 00 21  1 12 AM 1 1 2100-01-01 00:00:00 01/01/00 00:00 Fri Jan  1 00:00:00 2100 01/01/00 00:00:00 %",
                "|%q|000000",
            ]),
            (1230768000, [
                "01 Jan 2009",
                "January 01, 2009",
                "2009-01-01 00:00:00",
                "Thu Thursday 001 00 00 01 2009 09 4 4 09 20  1 12 AM 1 1 2009-01-01 00:00:00 01/01/09 00:00 Thu Jan  1 00:00:00 2009 01/01/09 00:00:00 %",
                "|%q|000000",
            ]),
            (-31536000, [
                "01 Jan 1969",
                "January 01, 1969",
                "1969-01-01 00:00:00",
                "Wed Wednesday 001 00 00 01 1969 69 3 3 69 19  1 12 AM 1 1 1969-01-01 00:00:00 01/01/69 00:00 Wed Jan  1 00:00:00 1969 01/01/69 00:00:00 %",
                "|%q|000000",
            ]),
        ];
        for (secs, wants) in cases {
            for (format, want) in formats.iter().zip(wants) {
                assert_eq!(strftime(format, secs, 0), want, "{format} at {secs}");
            }
        }
    }

    #[test]
    fn floats_are_written_as_python_writes_them() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (9999999999999998.0, "9999999999999998.0"),
            (0.0, "0.0"),
        ] {
            assert_eq!(py_float(f, true), want);
        }
        assert_eq!(py_float(f64::NAN, true), "NaN");
        assert_eq!(py_float(f64::NEG_INFINITY, false), "-inf");
    }
}
