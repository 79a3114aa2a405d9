//! Chat templates: the Jinja template a model ships (`tokenizer.chat_template`), rendered with
//! minijinja set up as Hugging Face transformers sets up Jinja2.
//!
//! transformers renders with `trim_blocks` and `lstrip_blocks`, a `raise_exception` global, a
//! `strftime_now` global and its own `tojson` filter (Python's `json.dumps`, non-ASCII kept), and
//! passes `messages`, `tools` and `documents` (none here), `add_generation_prompt` and the special
//! tokens. Templates also call Python string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`); minijinja has no such methods, so the common ones are provided here through its
//! unknown-method hook. Booleans and none print as Python prints them (`True`, `None`).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// ChatML, the template used for a model that ships none: every message is
/// `<|im_start|>{role}\n{content}<|im_end|>\n`, and the generation prompt is
/// `<|im_start|>assistant\n`. It is the template transformers used as its default, and the
/// format of SmolLM2 and Qwen. For a vocabulary without `<|im_start|>` and `<|im_end|>` the
/// markers are plain text.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The model's template, or [`CHATML_TEMPLATE`] when it has none.
pub fn template_or_default(template: Option<&str>) -> &str {
    template.unwrap_or(CHATML_TEMPLATE)
}

/// Renders `messages` with a Jinja chat template as transformers' `apply_chat_template` does
/// (`tokenize=False`). `bos` and `eos` are the texts of the BOS and EOS tokens.
pub fn apply_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.set_unknown_method_callback(python_method);
    env.set_formatter(python_formatter);
    let template = env
        .template_from_str(template)
        .map_err(|e| anyhow!("chat template does not parse: {e}"))?;
    template
        .render(context! {
            messages => messages,
            tools => Value::from(()),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos,
            eos_token => eos,
        })
        .map_err(|e| anyhow!("chat template failed: {e}"))
}

/// Jinja2 prints Python values: `True`, `False`, `None`.
fn python_formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Bool if value.is_true() => "True",
        ValueKind::Bool => "False",
        ValueKind::None => "None",
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(text)
        .map_err(|_| invalid("writing the rendered template"))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// Python methods of `str` and `dict` that chat templates call.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return match (method, args) {
            ("items", []) => state.apply_filter("items", std::slice::from_ref(value)),
            ("keys", []) => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            ("values", []) => {
                let values: Result<Vec<Value>, Error> =
                    value.try_iter()?.map(|k| value.get_item(&k)).collect();
                Ok(Value::from(values?))
            }
            ("get", [key]) | ("get", [key, _]) => {
                let item = value.get_item(key)?;
                if item.is_undefined() {
                    Ok(args.get(1).cloned().unwrap_or(Value::from(())))
                } else {
                    Ok(item)
                }
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

/// An optional string argument: absent or none is `None`.
fn opt_str<'a>(args: &'a [Value], index: usize, method: &str) -> Result<Option<&'a str>, Error> {
    match args.get(index) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            invalid(format!(
                "str.{method}: argument {} must be a string",
                index + 1
            ))
        }),
    }
}

fn req_str<'a>(args: &'a [Value], index: usize, method: &str) -> Result<&'a str, Error> {
    opt_str(args, index, method)?
        .ok_or_else(|| invalid(format!("str.{method}: argument {} is missing", index + 1)))
}

fn opt_int(args: &[Value], index: usize, method: &str) -> Result<Option<i64>, Error> {
    match args.get(index) {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => i64::try_from(v.clone()).map(Some).map_err(|_| {
            invalid(format!(
                "str.{method}: argument {} must be an integer",
                index + 1
            ))
        }),
    }
}

fn check_arity(args: &[Value], max: usize, method: &str) -> Result<(), Error> {
    if args.len() > max {
        Err(invalid(format!(
            "str.{method} takes at most {max} arguments, {} given",
            args.len()
        )))
    } else {
        Ok(())
    }
}

/// Python's `str.split`/`str.rsplit`: without a separator, on runs of whitespace.
fn split(
    s: &str,
    sep: Option<&str>,
    maxsplit: Option<i64>,
    from_right: bool,
) -> Result<Vec<String>, Error> {
    let limit = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
    let parts: Vec<String> = match sep {
        Some("") => return Err(invalid("str.split: empty separator")),
        Some(sep) => match (limit, from_right) {
            (None, _) => s.split(sep).map(str::to_owned).collect(),
            (Some(n), false) => s.splitn(n + 1, sep).map(str::to_owned).collect(),
            (Some(n), true) => {
                let mut parts: Vec<String> = s.rsplitn(n + 1, sep).map(str::to_owned).collect();
                parts.reverse();
                parts
            }
        },
        None => {
            let words: Vec<&str> = s.split_whitespace().collect();
            match limit {
                Some(n) if n < words.len() => {
                    if from_right {
                        let cut = words.len() - n;
                        let head_end = byte_end_of_word(s, cut - 1, false);
                        let mut parts = vec![s[..head_end].to_owned()];
                        parts.extend(words[cut..].iter().map(|w| w.to_string()));
                        parts
                    } else {
                        let tail_start = byte_end_of_word(s, n, true);
                        let mut parts: Vec<String> =
                            words[..n].iter().map(|w| w.to_string()).collect();
                        parts.push(s[tail_start..].to_owned());
                        parts
                    }
                }
                _ => words.into_iter().map(str::to_owned).collect(),
            }
        }
    };
    Ok(parts)
}

/// Byte offset of the start (`start == true`) or end of the `index`-th whitespace-separated word.
fn byte_end_of_word(s: &str, index: usize, start: bool) -> usize {
    let mut count = 0;
    let mut in_word = false;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            if in_word && !start && count == index + 1 {
                return i;
            }
            in_word = false;
        } else if !in_word {
            in_word = true;
            if start && count == index {
                return i;
            }
            count += 1;
        }
    }
    s.len()
}

fn char_index(s: &str, byte_index: usize) -> i64 {
    s[..byte_index].chars().count() as i64
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let strip_set = |i: usize| -> Result<Option<Vec<char>>, Error> {
        Ok(opt_str(args, i, method)?.map(|chars| chars.chars().collect()))
    };
    let value = match method {
        "strip" | "lstrip" | "rstrip" => {
            check_arity(args, 1, method)?;
            let set = strip_set(0)?;
            let is_stripped = |c: char| match &set {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            let out = match method {
                "strip" => s.trim_matches(is_stripped),
                "lstrip" => s.trim_start_matches(is_stripped),
                _ => s.trim_end_matches(is_stripped),
            };
            Value::from(out)
        }
        "startswith" | "endswith" => {
            check_arity(args, 1, method)?;
            let arg = args
                .first()
                .ok_or_else(|| invalid(format!("str.{method}: argument 1 is missing")))?;
            let candidates: Vec<String> = match arg.as_str() {
                Some(one) => vec![one.to_owned()],
                None => arg
                    .try_iter()
                    .map_err(|_| {
                        invalid(format!(
                            "str.{method}: argument must be a string or a tuple"
                        ))
                    })?
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid(format!("str.{method}: tuple items must be strings")))?,
            };
            let hit = candidates.iter().any(|c| {
                if method == "startswith" {
                    s.starts_with(c.as_str())
                } else {
                    s.ends_with(c.as_str())
                }
            });
            Value::from(hit)
        }
        "split" | "rsplit" => {
            check_arity(args, 2, method)?;
            let parts = split(
                s,
                opt_str(args, 0, method)?,
                opt_int(args, 1, method)?,
                method == "rsplit",
            )?;
            Value::from(parts)
        }
        "splitlines" => {
            check_arity(args, 0, method)?;
            Value::from(s.lines().map(str::to_owned).collect::<Vec<_>>())
        }
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "capitalize" => {
            let mut chars = s.chars();
            let out = match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.as_str().to_lowercase().chars())
                    .collect(),
                None => String::new(),
            };
            Value::from(out)
        }
        "title" => {
            let mut out = String::with_capacity(s.len());
            let mut after_cased = false;
            for c in s.chars() {
                if after_cased {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
                after_cased = c.is_alphabetic();
            }
            Value::from(out)
        }
        "replace" => {
            check_arity(args, 3, method)?;
            let old = req_str(args, 0, method)?;
            let new = req_str(args, 1, method)?;
            match opt_int(args, 2, method)? {
                Some(count) if count >= 0 => Value::from(s.replacen(old, new, count as usize)),
                _ => Value::from(s.replace(old, new)),
            }
        }
        "find" | "rfind" | "index" | "rindex" => {
            check_arity(args, 1, method)?;
            let sub = req_str(args, 0, method)?;
            let found = if method.starts_with('r') {
                s.rfind(sub)
            } else {
                s.find(sub)
            };
            match (found, method) {
                (Some(i), _) => Value::from(char_index(s, i)),
                (None, "find" | "rfind") => Value::from(-1),
                (None, _) => return Err(invalid(format!("str.{method}: substring not found"))),
            }
        }
        "count" => {
            check_arity(args, 1, method)?;
            let sub = req_str(args, 0, method)?;
            let n = if sub.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(sub).count()
            };
            Value::from(n)
        }
        "join" => {
            check_arity(args, 1, method)?;
            let items = args
                .first()
                .ok_or_else(|| invalid("str.join: argument 1 is missing"))?;
            let parts: Vec<String> = items
                .try_iter()?
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid("str.join: items must be strings"))
                })
                .collect::<Result<_, _>>()?;
            Value::from(parts.join(s))
        }
        "isdigit" | "isnumeric" | "isdecimal" => {
            Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric()))
        }
        "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
        "isalnum" => Value::from(!s.is_empty() && s.chars().all(char::is_alphanumeric)),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
        "islower" => {
            Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase))
        }
        "isupper" => {
            Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase))
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    };
    Ok(value)
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, options as keyword arguments.
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
            Some(s) => Some(s.to_owned()),
            None => {
                let n = i64::try_from(v)
                    .map_err(|_| invalid("tojson: indent must be an integer or a string"))?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid("tojson: separators must be two strings"))?;
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => return Err(invalid("tojson: separators must be two strings")),
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let options = JsonOptions {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &options, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
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
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
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

fn write_newline(options: &JsonOptions, level: usize, out: &mut String) {
    if let Some(indent) = &options.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// Python's `repr` of a float, as `json.dumps` writes it.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else if x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        let s = format!("{x:?}");
        match s.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
            _ => s,
        }
    }
}

fn write_json(
    value: &Value,
    options: &JsonOptions,
    level: usize,
    out: &mut String,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(value.clone()) {
                let _ = write!(out, "{i}");
            } else {
                let x = f64::try_from(value.clone())
                    .map_err(|_| invalid("tojson: unsupported number"))?;
                out.push_str(&python_float(x));
            }
        }
        ValueKind::String => write_json_string(
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
            out,
        ),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if options.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_sep);
                }
                write_newline(options, level + 1, out);
                let key_text = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None | ValueKind::Undefined => "null".to_owned(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
                    _ => key.to_string(),
                };
                write_json_string(&key_text, options.ensure_ascii, out);
                out.push_str(&options.key_sep);
                write_json(&value.get_item(key)?, options, level + 1, out)?;
            }
            write_newline(options, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_sep);
                }
                write_newline(options, level + 1, out);
                write_json(item, options, level + 1, out)?;
            }
            write_newline(options, level, out);
            out.push(']');
        }
        _ => write_json_string(&value.to_string(), options.ensure_ascii, out),
    }
    Ok(())
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
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Year, month (1-12) and day (1-31) of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
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

/// Days from 1970-01-01 to a date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `strftime_now`: the current time formatted with C `strftime` codes. Time is UTC;
/// the codes are `%Y %y %m %d %e %j %H %I %M %S %p %B %b %h %A %a %%`.
fn strftime_now(format: &str) -> Result<String, Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| invalid("strftime_now: the clock is before 1970"))?
        .as_secs() as i64;
    strftime(format, seconds)
}

fn strftime(format: &str, unix_seconds: i64) -> Result<String, Error> {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            return Err(invalid("strftime_now: format ends with %"));
        };
        let _ = match code {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'j' => write!(out, "{day_of_year:03}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'B' => write!(out, "{month_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'A' => write!(out, "{}", WEEKDAYS[weekday]),
            'a' => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            '%' => write!(out, "%"),
            other => return Err(invalid(format!("strftime_now: unsupported code %{other}"))),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S", 0).unwrap(),
            "1970-01-01 00:00:00"
        );
        assert_eq!(
            strftime("%d %b %Y %A %j", 951_782_400).unwrap(),
            "29 Feb 2000 Tuesday 060"
        );
        assert_eq!(
            strftime("%B %e, %y %I %p", 1_735_689_599).unwrap(),
            "December 31, 24 11 PM"
        );
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.5), "0.5");
        assert_eq!(python_float(1e20), "1e+20");
    }
}
