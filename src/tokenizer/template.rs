//! Chat templates: the Jinja templates Hugging Face models ship to turn a conversation into a
//! prompt, rendered with `minijinja` the way `transformers`' `apply_chat_template` renders them.
//!
//! The environment matches `transformers`' (`utils/chat_template_utils.py`): `trim_blocks` and
//! `lstrip_blocks` on, no autoescaping, Python string/dict/list methods (`.strip()`,
//! `.startswith()`, `.items()`, ...) through `minijinja-contrib`'s `pycompat`, a `tojson` filter
//! that writes what Python's `json.dumps` writes (no HTML escaping, `", "` and `": "`
//! separators, `indent`, `sort_keys`, `ensure_ascii`, `separators`), and the globals
//! `raise_exception(message)` and `strftime_now(format)`. The variables are `messages`,
//! `add_generation_prompt`, `tools` and `documents` (both `none`), and `bos_token` / `eos_token`
//! when known. `{% generation %}` blocks (assistant masks) are rendered as plain blocks.
//!
//! Differences that remain: `strftime_now` formats UTC (Python uses local time);
//! `{% break %}`/`{% continue %}` need `minijinja`'s `loop_controls` feature; message maps
//! list their keys sorted (Python keeps insertion order) unless `minijinja`'s `preserve_order`
//! feature is on, which only shows in `messages | tojson` or `message.items()`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};

/// Name the template is registered under (no extension, so no autoescaping).
const TEMPLATE_NAME: &str = "chat_template";

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Errors from loading, compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not compile (Jinja syntax error).
    #[error("chat template does not compile: {message}")]
    Syntax {
        /// minijinja's message, with the line.
        message: String,
    },
    /// The template called `raise_exception(message)`.
    #[error("chat template raised an exception: {message}")]
    Raised {
        /// The message the template passed to `raise_exception`.
        message: String,
    },
    /// Rendering failed (undefined attribute, wrong type, ...).
    #[error("cannot render chat template: {message}")]
    Render {
        /// minijinja's message, with the line.
        message: String,
    },
    /// A file of the model directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A JSON file of the model directory does not parse.
    #[error("cannot parse {} as JSON: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's message.
        message: String,
    },
    /// A key of a JSON file has a value of the wrong shape.
    #[error("{}: `{key}` {message}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `chat_template` or `bos_token`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A chat template with the special-token strings it may reference.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The error `raise_exception` attaches, to tell it apart from other render errors.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compile `source`. `bos_token` / `eos_token` are the strings the template sees as
    /// `bos_token` and `eos_token` (left undefined when `None`, as `transformers` does).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| TemplateError::Syntax {
                message: describe(&e),
            })?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// From a Hugging Face model directory: `chat_template.jinja` (transformers 5), else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` of
    /// which the one named `default` is taken), else `chat_template.json`'s `chat_template`; with
    /// the `bos_token` / `eos_token` strings of `tokenizer_config.json` (or, when it has none,
    /// `special_tokens_map.json`), each a string or a `{"content": ...}` object. `Ok(None)` when
    /// the directory has no template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;

        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            Some(read_text(&jinja_path)?)
        } else if let Some(value) = config.as_ref().and_then(|c| c.get("chat_template")) {
            template_from_value(&config_path, value)?
        } else {
            let legacy_path = dir.join("chat_template.json");
            match read_json(&legacy_path)? {
                Some(legacy) => match legacy.get("chat_template") {
                    Some(value) => template_from_value(&legacy_path, value)?,
                    None => None,
                },
                None => None,
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };

        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_json(&map_path)?;
        let token = |key: &str| -> Result<Option<String>, TemplateError> {
            if let Some(found) = token_string(&config_path, config.as_ref(), key)? {
                return Ok(Some(found));
            }
            token_string(&map_path, special_map.as_ref(), key)
        };
        let bos_token = token("bos_token")?;
        let eos_token = token("eos_token")?;
        Self::new(source, bos_token, eos_token).map(Some)
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The string the template sees as `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The string the template sees as `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders with the variables transformers passes (`messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`, plus `raise_exception`, `strftime_now`, `tools` = none) in
    /// transformers' jinja environment style (trim_blocks, lstrip_blocks, python-compatible
    /// string methods via minijinja-contrib's pycompat, `tojson`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let mut context: BTreeMap<&str, Value> = BTreeMap::new();
        context.insert("messages", Value::from_serialize(messages));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        context.insert("tools", Value::from(()));
        context.insert("documents", Value::from(()));
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render {
                message: describe(&e),
            })?;
        template
            .render(context)
            .map_err(|e| match raised_message(&e) {
                Some(message) => TemplateError::Raised { message },
                None => TemplateError::Render {
                    message: describe(&e),
                },
            })
    }
}

/// An error's message and the messages of its sources.
fn describe(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn raised_message(error: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = current {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        current = err.source();
    }
    None
}

fn read_text(path: &Path) -> Result<String, TemplateError> {
    std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The file parsed as JSON, or `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TemplateError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TemplateError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn template_from_value(
    path: &Path,
    value: &serde_json::Value,
) -> Result<Option<String>, TemplateError> {
    let field = |message: &str| TemplateError::Field {
        path: path.to_path_buf(),
        key: "chat_template".into(),
        message: message.into(),
    };
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(source) => Ok(Some(source.clone())),
        serde_json::Value::Array(entries) => {
            for entry in entries {
                let name = entry.get("name").and_then(|n| n.as_str());
                if name == Some("default") {
                    return match entry.get("template") {
                        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
                        _ => Err(field("entry named \"default\" has no string `template`")),
                    };
                }
            }
            Err(field(
                "is a list of named templates with none named \"default\"",
            ))
        }
        _ => Err(field("is neither a string nor a list of {name, template}")),
    }
}

/// `key` of a tokenizer config: a string, or an added-token object `{"content": ...}`.
fn token_string(
    path: &Path,
    config: Option<&serde_json::Value>,
    key: &str,
) -> Result<Option<String>, TemplateError> {
    let Some(value) = config.and_then(|c| c.get(key)) else {
        return Ok(None);
    };
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(token) => Ok(Some(token.clone())),
        serde_json::Value::Object(fields) => match fields.get("content") {
            Some(serde_json::Value::String(token)) => Ok(Some(token.clone())),
            _ => Err(TemplateError::Field {
                path: path.to_path_buf(),
                key: key.into(),
                message: "is an object without a string `content`".into(),
            }),
        },
        _ => Err(TemplateError::Field {
            path: path.to_path_buf(),
            key: key.into(),
            message: "is neither a string nor a {\"content\": ...} object".into(),
        }),
    }
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask extension) become
/// `{% if true %}` / `{% endif %}`, keeping their whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let left = if inner.starts_with('-') || inner.starts_with('+') {
            &inner[..1]
        } else {
            ""
        };
        let right = if inner.ends_with('-') || inner.ends_with('+') {
            &inner[inner.len() - 1..]
        } else {
            ""
        };
        let body = inner[left.len()..inner.len() - right.len()].trim();
        match body {
            "generation" => out.push_str(&format!("{{%{left} if true {right}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{left} endif {right}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Prints values as Jinja2 does: `True`/`False`/`None`, floats as Python's `repr`, lists and
/// dicts as Python's `repr` (`['a', 1]`, `{'k': None}`).
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            if let Some(text) = python_repr(value, 0) {
                return out.write_str(&text).map_err(Error::from);
            }
        }
        _ => {}
    }
    minijinja::escape_formatter(out, state, value)
}

/// Python's `repr` of a value, or `None` for values it has no equivalent for (objects, and
/// containers nested absurdly deep).
fn python_repr(value: &Value, depth: usize) -> Option<String> {
    if depth > 64 {
        return None;
    }
    Some(match value.kind() {
        ValueKind::Undefined | ValueKind::None => "None".to_string(),
        ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).to_string(),
        ValueKind::Number if value.is_integer() => value.to_string(),
        ValueKind::Number => python_float_repr(f64::try_from(value.clone()).ok()?),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            let items: Option<Vec<String>> = value
                .try_iter()
                .ok()?
                .map(|item| python_repr(&item, depth + 1))
                .collect();
            format!("[{}]", items?.join(", "))
        }
        ValueKind::Map => {
            let mut items = Vec::new();
            for key in value.try_iter().ok()? {
                let item = value.get_item(&key).ok()?;
                items.push(format!(
                    "{}: {}",
                    python_repr(&key, depth + 1)?,
                    python_repr(&item, depth + 1)?
                ));
            }
            format!("{{{}}}", items.join(", "))
        }
        _ => return None,
    })
}

/// Python's `repr` of a string: single quotes unless it holds `'` and no `"`.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
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
            c if (c as u32) < 0x20 || (0x7F..=0xA0).contains(&(c as u32)) || c == '\u{AD}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime_utc(&format, seconds)))
}

/// `time.strftime(format)` for a UTC time given in seconds since the epoch. Supports `%a %A %b
/// %B %c %d %e %F %H %I %j %m %M %p %S %T %y %Y %z %Z %%`, and `%-d`-style unpadded numbers.
fn strftime_utc(format: &str, seconds: i64) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
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
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];
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
        let num = |value: i64, width: usize| {
            if unpadded {
                value.to_string()
            } else {
                format!("{value:0width$}")
            }
        };
        match chars.next() {
            Some('a') => out.push_str(&day_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('c') => out.push_str(&format!(
                "{} {} {day:>2} {hour:02}:{minute:02}:{second:02} {year}",
                &day_name[..3],
                &month_name[..3]
            )),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('F') => out.push_str(&format!("{year:04}-{month:02}-{day:02}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('S') => out.push_str(&num(second, 2)),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('y') => out.push_str(&num(year.rem_euclid(100), 2)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('z') => out.push_str("+0000"),
            Some('Z') => out.push_str("UTC"),
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

/// Separators and layout for [`tojson`], as Python's `json.dumps` takes them.
struct JsonStyle {
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// `transformers`' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or a string",
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let (mut item_separator, mut key_separator) = if indent.is_some() {
        (",".to_string(), ": ".to_string())
    } else {
        (", ".to_string(), ": ".to_string())
    };
    if let Some(separators) = kwargs.get::<Option<Value>>("separators")? {
        if !separators.is_none() {
            let parts: Vec<String> = separators
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            item_separator = parts[0].clone();
            key_separator = parts[1].clone();
        }
    }
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        item_separator,
        key_separator,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
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
            write_container(out, '[', ']', &items, style, depth, |out, item, depth| {
                write_json(out, item, style, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::Number if key.is_integer() => key.to_string(),
                    ValueKind::Number => python_float_repr(f64::try_from(key.clone())?),
                    other => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {other}"
                            ),
                        ))
                    }
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                '{',
                '}',
                &entries,
                style,
                depth,
                |out, (key, item), depth| {
                    write_json_string(out, key, style.ensure_ascii);
                    out.push_str(&style.key_separator);
                    write_json(out, item, style, depth)
                },
            )?;
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of type {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: &[T],
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item, depth + 1)?;
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
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7E => {
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

/// Python's `repr(float)`, as `json.dumps` writes floats.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sign = if f.is_sign_negative() { "-" } else { "" };
    // Shortest round-trip digits and decimal exponent, e.g. "1.2345e-5".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let int_len = exponent as usize + 1;
            let (int_part, frac_part) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), "0".to_string())
            };
            format!("{sign}{int_part}.{frac_part}")
        } else {
            let zeros = "0".repeat((-exponent - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (as embedded in its GGUF): ChatML with a default system
    /// message.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> Message {
        Message::new("user", text)
    }

    #[test]
    fn smollm2_default_system_message() {
        let template = ChatTemplate::new(
            SMOLLM2,
            Some("<|im_start|>".into()),
            Some("<|im_end|>".into()),
        )
        .expect("compile");
        let text = template
            .render(&[user("What is the capital of France?")], true)
            .expect("render");
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = template.render(&[user("hi")], false).expect("render");
        assert!(
            text.ends_with("<|im_start|>user\nhi<|im_end|>\n"),
            "{text:?}"
        );
    }

    #[test]
    fn smollm2_explicit_system_and_multi_turn() {
        let template = ChatTemplate::new(SMOLLM2, None, None).expect("compile");
        let messages = [
            Message::new("system", "Be terse."),
            user("Hi!"),
            Message::new("assistant", "Hello."),
            user("Joke?"),
        ];
        assert_eq!(
            template.render(&messages, true).expect("render"),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nJoke?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // Expected output from jinja2 with trim_blocks=True, lstrip_blocks=True.
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% else %}\nA: {{ m.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:{% endif %}\n";
        let template = ChatTemplate::new(source, None, None).expect("compile");
        let text = template
            .render(&[user("x"), Message::new("assistant", "y")], true)
            .expect("render");
        assert_eq!(text, "U: x\nA: y\nA:");
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok";
        let template = ChatTemplate::new(source, None, None).expect("compile");
        assert_eq!(template.render(&[user("x")], false).expect("render"), "ok");
        let err = template
            .render(&[Message::new("assistant", "x")], false)
            .expect_err("raises");
        match &err {
            TemplateError::Raised { message } => {
                assert_eq!(
                    message,
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                )
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("Conversation roles must alternate"));
    }

    #[test]
    fn syntax_and_render_errors_name_the_problem() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", None, None)
            .expect_err("syntax");
        assert!(matches!(err, TemplateError::Syntax { .. }), "{err:?}");
        assert!(
            err.to_string().contains("endfor") || err.to_string().contains("end of input"),
            "{err}"
        );

        let template =
            ChatTemplate::new("{{ messages[0].content.nope() }}", None, None).expect("compile");
        let err = template.render(&[user("x")], false).expect_err("render");
        assert!(matches!(err, TemplateError::Render { .. }), "{err:?}");
        assert!(
            err.to_string().contains("nope") || err.to_string().contains("unknown method"),
            "{err}"
        );
    }

    #[test]
    fn pycompat_string_and_dict_methods() {
        let source = "{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.upper() }}|{{ m.role.startswith('us') }}|{{ m.content.split(',') | join('+') }}|{{ m.content.replace('a', 'o') }}]{% endfor %}\
                      {% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ {'x': 2}.get('x') }}|{{ {'x': 2}.get('y', 3) }}";
        let template = ChatTemplate::new(source, None, None).expect("compile");
        assert_eq!(
            template.render(&[user("  a,b  ")], false).expect("render"),
            "[a,b|  A,B  |True|  a+b  |  o,b  ]a=1|2|3"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let template = ChatTemplate::new(
            "{{ messages[0] | tojson(sort_keys=true) }}\n{{ {'b': [1, 2.5, none, true], 'a': 'é<&>\"'} | tojson }}\n{{ [1, {'k': []}] | tojson(indent=2) }}\n{{ 1e20 | tojson }} {{ 0.0001 | tojson }} {{ 3.0 | tojson }}",
            None,
            None,
        )
        .expect("compile");
        let text = template.render(&[user("hi\n")], false).expect("render");
        let lines: Vec<&str> = text.split('\n').collect();
        // json.dumps({"role": "user", "content": "hi\n"}, sort_keys=True)
        assert_eq!(lines[0], r#"{"content": "hi\n", "role": "user"}"#);
        // No HTML escaping, non-ASCII kept.
        assert!(
            lines[1] == r#"{"b": [1, 2.5, null, true], "a": "é<&>\""}"#
                || lines[1] == r#"{"a": "é<&>\"", "b": [1, 2.5, null, true]}"#,
            "{}",
            lines[1]
        );
        assert_eq!(lines[2..7].join("\n"), "[\n  1,\n  {\n    \"k\": []\n  }");
        assert_eq!(lines[7], "]");
        assert_eq!(lines[8], "1e+20 0.0001 3.0");
    }

    #[test]
    fn python_float_repr_cases() {
        for (f, expected) in [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (1e-5, "1e-05"),
            (0.00012, "0.00012"),
            (1.5e-7, "1.5e-07"),
            (2.5e100, "2.5e+100"),
        ] {
            assert_eq!(python_float_repr(f), expected, "{f}");
        }
    }

    #[test]
    fn variables_like_transformers() {
        let template = ChatTemplate::new(
            "{{ bos_token }}|{{ eos_token is defined }}|{{ tools is none }}|{{ documents is none }}|{{ add_generation_prompt }}|{{ messages | length }}",
            Some("<s>".into()),
            None,
        )
        .expect("compile");
        assert_eq!(
            template
                .render(&[user("a"), user("b")], true)
                .expect("render"),
            "<s>|False|True|True|True|2"
        );
    }

    #[test]
    fn values_print_like_jinja2() {
        let template = ChatTemplate::new(
            "{{ true }} {{ false }} {{ none }} {{ 3.0 }} {{ 1e20 }} {{ 7 }} {{ undefined_name }}|",
            None,
            None,
        )
        .expect("compile");
        assert_eq!(
            template.render(&[], false).expect("render"),
            "True False None 3.0 1e+20 7 |"
        );
    }

    #[test]
    fn containers_print_as_python_repr() {
        let template = ChatTemplate::new(
            r#"{{ 'a,b'.split(',') }} {{ [1, 2.5, none, true, "it's", 'q"\n'] }} {{ {'k': [1]} }} {{ messages[0] }}"#,
            None,
            None,
        )
        .expect("compile");
        // What jinja2 renders for the same template.
        assert_eq!(
            template.render(&[user("x")], false).expect("render"),
            r#"['a', 'b'] [1, 2.5, None, True, "it's", 'q"\n'] {'k': [1]} {'role': 'user', 'content': 'x'}"#
        );
    }

    #[test]
    fn namespace_loop_and_slicing() {
        let source = "{% set ns = namespace(system='') %}{% if messages[0].role == 'system' %}{% set ns.system = messages[0].content %}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}\
                      <{{ ns.system }}>{% for m in rest %}{{ loop.index0 }}:{{ m.content }}{% if not loop.last %},{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source, None, None).expect("compile");
        let messages = [
            Message::new("system", "S"),
            user("a"),
            Message::new("assistant", "b"),
        ];
        assert_eq!(
            template.render(&messages, false).expect("render"),
            "<S>0:a,1:b"
        );
    }

    #[test]
    fn generation_tags_are_plain_blocks() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let template = ChatTemplate::new(source, None, None).expect("compile");
        assert_eq!(
            template
                .render(&[user("q"), Message::new("assistant", "a")], false)
                .expect("render"),
            "qa"
        );
        assert_eq!(
            rewrite_generation_tags("{%- generation -%}x{%-endgeneration%}"),
            "{%- if true -%}x{%- endif %}"
        );
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %A %B %j %I%p %-d %%", t),
            "2024-07-26 13:25:09 Friday July 208 01PM 26 %"
        );
        assert_eq!(strftime_utc("%F %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%F", 951_782_400), "2000-02-29");
        let template =
            ChatTemplate::new("{{ strftime_now('%Y') | length }}", None, None).expect("compile");
        assert_eq!(template.render(&[], false).expect("render"), "4");
    }

    fn temp_dir_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pf-template-test-{}-{name}", std::process::id()))
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = temp_dir_path(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn from_model_dir_variants() {
        // No template at all.
        let dir = temp_dir("none");
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#)
            .expect("write");
        assert!(ChatTemplate::from_model_dir(&dir).expect("load").is_none());

        // tokenizer_config.json string template, added-token objects for bos/eos.
        let dir = temp_dir("config");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": "</s>"}"#,
        )
        .expect("write");
        let template = ChatTemplate::from_model_dir(&dir)
            .expect("load")
            .expect("template");
        assert_eq!(
            template.render(&[user("x")], false).expect("render"),
            "<s>x</s>"
        );

        // A list of named templates: take "default".
        let dir = temp_dir("list");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#,
        )
        .expect("write");
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"eos_token": {"content": "<e>"}}"#,
        )
        .expect("write");
        let template = ChatTemplate::from_model_dir(&dir)
            .expect("load")
            .expect("template");
        assert_eq!(template.render(&[], false).expect("render"), "D<e>");

        // chat_template.jinja wins over tokenizer_config.json.
        let dir = temp_dir("jinja");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "old", "eos_token": "E"}"#,
        )
        .expect("write");
        std::fs::write(dir.join("chat_template.jinja"), "new{{ eos_token }}\n").expect("write");
        let template = ChatTemplate::from_model_dir(&dir)
            .expect("load")
            .expect("template");
        assert_eq!(template.render(&[], false).expect("render"), "newE");

        // Errors name the file and key.
        let dir = temp_dir("bad");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "x", "template": "T"}]}"#,
        )
        .expect("write");
        let err = ChatTemplate::from_model_dir(&dir).expect_err("no default");
        assert!(
            err.to_string().contains("chat_template") && err.to_string().contains("default"),
            "{err}"
        );
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "x", "bos_token": 3}"#,
        )
        .expect("write");
        let err = ChatTemplate::from_model_dir(&dir).expect_err("bad bos");
        assert!(err.to_string().contains("bos_token"), "{err}");
        std::fs::write(dir.join("tokenizer_config.json"), "{").expect("write");
        let err = ChatTemplate::from_model_dir(&dir).expect_err("bad json");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        for name in ["none", "config", "list", "jinja", "bad"] {
            let _ = std::fs::remove_dir_all(temp_dir_path(name));
        }
    }
}
