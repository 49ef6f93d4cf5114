//! Messages for a configuration file that does not parse: toml's error with the line,
//! column and dotted key in front, string values removed (they may be secrets) and serde's
//! type names put in the file's terms. Owns no validation; must not read files.

use super::keys::KEYS;

/// Keys declared secret: their values are never echoed.
fn is_secret_key(key: &str) -> bool {
    KEYS.iter().any(|k| k.secret && k.name == key)
}

/// toml's message with "line L, column C (`dotted.key`)" in front, string values removed
/// (they might be secrets) and serde's type names put in the file's terms.
pub(super) fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let mut out = String::new();
    let mut key = None;
    if let Some(before) = err.span().and_then(|span| text.get(..span.start)) {
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        out.push_str(&format!("line {line}, column {column}"));
        key = key_at(text, before.len());
        if let Some(key) = &key {
            out.push_str(&format!(" (`{key}`)"));
        }
        out.push_str(": ");
    }
    if key.as_deref().is_some_and(is_secret_key) && !err.message().starts_with("unknown field") {
        out.push_str("invalid value (not shown: it is a secret); it must be a string");
        return out;
    }
    let message = redact_strings(err.message())
        .replace(" as i128, expected i64", " is out of range")
        .replace("expected i64", "expected an integer")
        .replace("unknown field", "unknown key");
    out.push_str(&tables_by_name(&message));
    out
}

/// serde's `expected struct RawKie` (whatever struct a section is parsed into) in the file's
/// terms: `expected a table`.
fn tables_by_name(message: &str) -> String {
    replace_runs(message, "expected struct ", "expected a table", |after| {
        after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len())
    })
}

/// `message` with every run that starts with `mark` and goes on for the length `end` finds
/// in the text after the mark replaced by `by`.
fn replace_runs(message: &str, mark: &str, by: &str, end: impl Fn(&str) -> usize) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(i) = rest.find(mark) {
        out.push_str(&rest[..i]);
        out.push_str(by);
        let after = &rest[i + mark.len()..];
        rest = &after[end(after)..];
    }
    out.push_str(rest);
    out
}

/// Replace every `string "…"` in a serde message by `a string`.
pub(super) fn redact_strings(message: &str) -> String {
    replace_runs(message, "string \"", "a string", |after| {
        let mut escaped = false;
        for (j, c) in after.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                return j + 1;
            }
        }
        after.len()
    })
}

/// Best-effort dotted key for the TOML line holding byte `offset`: the nearest `key =` at or
/// above it, prefixed by the enclosing `[section]`.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_end = text
        .get(offset..)
        .and_then(|rest| rest.find('\n'))
        .map_or(text.len(), |i| offset + i);
    let upto = text.get(..line_end)?;
    let mut key = None;
    for (n, line) in upto.lines().rev().enumerate() {
        let line = line.trim();
        if line.starts_with("[[") {
            return None;
        }
        if let Some(header) = line.strip_prefix('[') {
            let section = header.split(']').next()?.trim().replace('"', "");
            return match key {
                Some(key) => Some(format!("{section}.{key}")),
                None if n == 0 => Some(section),
                None => None,
            };
        }
        if key.is_none() && !line.starts_with('#') {
            key = key_of_line(line);
        }
    }
    key
}

fn key_of_line(line: &str) -> Option<String> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || "_-.\" ".contains(c)))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    let key = key.trim().replace('"', "");
    (rest.starts_with('=') && !key.is_empty()).then_some(key)
}
