//! systemd's unit file syntax, as far as `config::unit` reads it: logical lines (a trailing
//! backslash continues a line, comment lines inside a continuation are dropped),
//! `Environment=`'s word splitting with quotes and C escapes, the machine-independent
//! specifiers, and what a variable name may be. Pure functions over text; must not open
//! files or decide what an assignment means (that is `config::unit`).

/// The unit's name (its `%n`).
pub const UNIT_NAME: &str = "coverd.service";

/// The lines of a unit file as systemd reads them: a line ending in an unescaped backslash
/// goes on on the next (the backslash becomes a space), comment lines inside such a
/// continuation are dropped. Each with its first line's number; `Err` for one not UTF-8.
pub(super) fn logical_lines(text: &[u8]) -> Vec<(usize, Result<String, ()>)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, Vec<u8>)> = None;
    for (i, raw) in text.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let trimmed = raw.trim_ascii_start();
        if pending.is_some() && trimmed.first().is_some_and(|c| *c == b'#' || *c == b';') {
            continue;
        }
        let (n, mut line) = pending.take().unwrap_or((i + 1, Vec::new()));
        line.extend_from_slice(raw);
        if ends_in_escape(&line) {
            line.pop();
            line.push(b' ');
            pending = Some((n, line));
            continue;
        }
        out.push((n, String::from_utf8(line).map_err(|_| ())));
    }
    if let Some((n, line)) = pending {
        out.push((n, String::from_utf8(line).map_err(|_| ())));
    }
    out
}

/// Whether `line` ends in a backslash that is not itself escaped.
fn ends_in_escape(line: &[u8]) -> bool {
    let mut escaped = false;
    for b in line {
        escaped = !escaped && *b == b'\\';
    }
    escaped
}

/// Splits an `Environment=` value into words as systemd does (whitespace separates; `"…"`
/// and `'…'` group, anywhere in a word; C escapes resolved inside and outside quotes).
/// Returns the words before the first syntax error, and the error in words.
pub(super) fn split_words(value: &str) -> (Vec<String>, Option<String>) {
    let mut words = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| is_space(*c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            return (words, None);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        loop {
            let Some(c) = chars.next() else {
                if quote.is_some() {
                    return (words, Some("has an unterminated quote".into()));
                }
                break;
            };
            match (quote, c) {
                (_, '\\') => match unescape(&mut chars) {
                    Ok(u) => word.push(u),
                    Err(e) => return (words, Some(e)),
                },
                (Some(q), c) if c == q => quote = None,
                (Some(_), c) => word.push(c),
                (None, '"' | '\'') => quote = Some(c),
                (None, c) if is_space(c) => break,
                (None, c) => word.push(c),
            }
        }
        words.push(word);
    }
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// One C escape after a backslash (systemd's `cunescape_one`): `\a \b \f \n \r \t \v \\ \"
/// \' \s`, `\xHH`, `\uHHHH`, `\UHHHHHHHH`, `\NNN` (octal); NUL and, for `\x` and octal, bytes
/// over 0x7f (not text on their own) are refused.
fn unescape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<char, String> {
    let Some(c) = chars.next() else {
        return Err("ends in a backslash".into());
    };
    let hex = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| {
        let mut v: u32 = 0;
        for _ in 0..n {
            let d = chars.next().and_then(|c| c.to_digit(16)).ok_or_else(|| {
                format!("has an invalid \\{c} escape ({n} hexadecimal digits expected)")
            })?;
            v = v * 16 + d;
        }
        Ok::<u32, String>(v)
    };
    let code = match c {
        'a' => 7,
        'b' => 8,
        'f' => 12,
        'n' => 10,
        'r' => 13,
        't' => 9,
        'v' => 11,
        '\\' | '"' | '\'' => c as u32,
        's' => ' ' as u32,
        'x' => {
            let v = hex(chars, 2)?;
            if v > 0x7f {
                return Err(format!(
                    "has \\x{v:02x}, a byte that is not text on its own; write the character itself"
                ));
            }
            v
        }
        'u' => hex(chars, 4)?,
        'U' => hex(chars, 8)?,
        '0'..='7' => {
            let mut v = c.to_digit(8).unwrap_or(0);
            for _ in 0..2 {
                let d = chars
                    .next()
                    .and_then(|c| c.to_digit(8))
                    .ok_or("has an invalid octal escape (3 digits expected)")?;
                v = v * 8 + d;
            }
            if v > 0x7f {
                return Err(format!(
                    "has \\{v:03o}, a byte that is not text on its own; write the character itself"
                ));
            }
            v
        }
        other => return Err(format!("has an unknown escape \\{other}")),
    };
    match char::from_u32(code) {
        Some('\0') | None => Err(format!("has an escape of an invalid character ({code:#x})")),
        Some(c) => Ok(c),
    }
}

/// Resolves the specifiers of a system unit named `coverd.service` that do not depend on
/// the machine (`%S` → `/var/lib`, `%n` → `coverd.service`, `%%` → `%`, …); `Err` with the
/// specifier for any other (`%H`, `%m`, …), which coverd does not guess.
pub(super) fn expand_specifiers(value: &str) -> Result<String, char> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().ok_or('%')?;
        out.push_str(match spec {
            '%' => "%",
            'n' => UNIT_NAME,
            'N' | 'p' | 'P' | 'j' | 'J' => "coverd",
            'i' | 'I' => "",
            'f' => "/coverd",
            'S' => "/var/lib",
            'C' => "/var/cache",
            'L' => "/var/log",
            'E' => "/etc",
            't' => "/run",
            'T' => "/tmp",
            'V' => "/var/tmp",
            'd' => "/run/credentials/coverd.service",
            'h' => "/root",
            'u' | 'g' => "root",
            'U' | 'G' => "0",
            's' => "/bin/sh",
            other => return Err(other),
        });
    }
    Ok(out)
}

/// A variable name systemd accepts in `Environment=`: not empty, no `=`, no control
/// characters, does not start with a digit (what `env_name_is_valid` checks).
pub(super) fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c != '=' && !c.is_control())
        && name.len() <= 4096
}
