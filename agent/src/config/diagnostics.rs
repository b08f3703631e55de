//! TOML positions: the line of a key, and decode errors turned into
//! messages that name the file, line and dotted key.

use super::*;

/// One step into a parsed document.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

pub(super) fn render_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    let _ = write!(out, "{k:?}");
                }
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// Splits a dotted key as [`ConfigError::Invalid`] carries it
/// (`pipeline.relabel[2].from`) into segments for [`line_of_key`]. Quoted
/// keys containing dots are not supported: their line is simply not found.
pub(super) fn parse_key_path(key: &str) -> Vec<String> {
    let mut segs = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        segs.push(name.to_owned());
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            segs.push(inner[..end].to_owned());
            rest = &inner[end + 1..];
        }
    }
    segs
}

/// 1-based line of byte `offset` in `text`.
pub(super) fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The 1-based line where `key_path` is set in TOML `text`, or `None` if
/// the text does not parse or does not set that key. Works for `[table]`
/// headers, dotted keys and inline tables alike. A segment that is a number
/// indexes an array (`["probes", "interfaces", "include", "1"]`); the line
/// is then that element's.
pub fn line_of_key(text: &str, key_path: &[&str]) -> Option<usize> {
    enum Cursor<'a, 'i> {
        Table(&'a DeTable<'i>),
        Array(&'a [Spanned<DeValue<'i>>]),
        Leaf,
    }
    let doc = DeTable::parse(text).ok()?;
    let mut cursor = Cursor::Table(doc.get_ref());
    let mut line = None;
    for seg in key_path {
        let (span, value) = match cursor {
            Cursor::Table(t) => {
                let (k, v) = t.iter().find(|(k, _)| k.get_ref() == seg)?;
                (k.span(), v)
            }
            Cursor::Array(items) => {
                let item = items.get(seg.parse::<usize>().ok()?)?;
                (item.span(), item)
            }
            Cursor::Leaf => return None,
        };
        line = Some(line_of_offset(text, span.start));
        cursor = match value.get_ref() {
            DeValue::Table(t) => Cursor::Table(t),
            DeValue::Array(a) => Cursor::Array(a),
            _ => Cursor::Leaf,
        };
    }
    line
}

/// The path of the innermost key or value in `table` whose span contains
/// byte `pos`, for attributing a decode error to a key.
pub(super) fn path_at(table: &DeTable<'_>, pos: usize) -> Option<Vec<Seg>> {
    let mut best: Option<(usize, Vec<Seg>)> = None;
    let mut prefix = Vec::new();
    search_table(table, pos, &mut prefix, &mut best);
    best.map(|(_, path)| path)
}

pub(super) fn consider(
    span: std::ops::Range<usize>,
    pos: usize,
    prefix: &[Seg],
    best: &mut Option<(usize, Vec<Seg>)>,
) {
    let hit = span.contains(&pos) || (span.is_empty() && span.start == pos);
    if !hit {
        return;
    }
    let len = span.len();
    // The narrowest span wins; on a tie, the deeper path.
    let better = match best {
        None => true,
        Some((blen, bpath)) => len < *blen || (len == *blen && prefix.len() > bpath.len()),
    };
    if better {
        *best = Some((len, prefix.to_vec()));
    }
}

pub(super) fn search_table(
    table: &DeTable<'_>,
    pos: usize,
    prefix: &mut Vec<Seg>,
    best: &mut Option<(usize, Vec<Seg>)>,
) {
    for (k, v) in table.iter() {
        prefix.push(Seg::Key(k.get_ref().to_string()));
        consider(k.span(), pos, prefix, best);
        search_value(v, pos, prefix, best);
        prefix.pop();
    }
}

pub(super) fn search_value(
    v: &Spanned<DeValue<'_>>,
    pos: usize,
    prefix: &mut Vec<Seg>,
    best: &mut Option<(usize, Vec<Seg>)>,
) {
    match v.get_ref() {
        DeValue::Table(t) => search_table(t, pos, prefix, best),
        DeValue::Array(items) => {
            // An array as a whole is a candidate (a wrong type for the
            // whole list); its elements are narrower ones.
            consider(v.span(), pos, prefix, best);
            for (i, item) in items.iter().enumerate() {
                prefix.push(Seg::Index(i));
                search_value(item, pos, prefix, best);
                prefix.pop();
            }
        }
        _ => consider(v.span(), pos, prefix, best),
    }
}

/// The value at `segs` in `table`.
pub(super) fn value_at<'a, 'i>(
    table: &'a DeTable<'i>,
    segs: &[Seg],
) -> Option<&'a Spanned<DeValue<'i>>> {
    let (first, rest) = segs.split_first()?;
    let Seg::Key(k) = first else { return None };
    let mut cur = table.iter().find(|(key, _)| key.get_ref() == k)?.1;
    for seg in rest {
        cur = match (seg, cur.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t.iter().find(|(key, _)| key.get_ref() == k)?.1,
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

pub(super) fn with_article(type_str: &str) -> String {
    match type_str {
        "integer" | "array" => format!("an {type_str}"),
        other => format!("a {other}"),
    }
}

/// serde's name for an expected type, in the words of a config file.
pub(super) fn humanize_expected(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a sequence" => "an array".to_owned(),
        "path string" => "a path string".to_owned(),
        "socket address" => LISTEN_EXPECTED.to_owned(),
        "enum Mode" => "one of \"auto\", \"ebpf\", \"procfs\", \"off\"".to_owned(),
        "enum LogFormat" => "one of \"text\", \"json\"".to_owned(),
        s if s.starts_with("struct ") => "a table".to_owned(),
        s if s.starts_with("enum ") => "a string".to_owned(),
        s => s.to_owned(),
    }
}

/// Turns a `toml` decode error into a [`ConfigError`] naming the key.
pub(super) fn decode_error(err: &toml::de::Error, text: &str, path: &str) -> ConfigError {
    let span = err.span();
    let line = span.as_ref().map(|s| line_of_offset(text, s.start));
    let message = err.message().trim().to_owned();
    let Ok(doc) = DeTable::parse(text) else {
        return ConfigError::Syntax {
            path: path.to_owned(),
            line,
            message,
        };
    };
    let doc = doc.get_ref();
    let segs = span.as_ref().and_then(|s| path_at(doc, s.start));

    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = match tail.trim_start_matches(',').trim() {
            "there are no fields" => "this table accepts no keys".to_owned(),
            other => other.to_owned(),
        };
        let mut table = segs.unwrap_or_default();
        if table.last() == Some(&Seg::Key(name.to_owned())) {
            table.pop();
        }
        return ConfigError::UnknownKey {
            path: path.to_owned(),
            line,
            table: render_path(&table),
            name: name.to_owned(),
            expected,
        };
    }

    let Some(segs) = segs else {
        return ConfigError::Syntax {
            path: path.to_owned(),
            line,
            message,
        };
    };
    let value = value_at(doc, &segs);
    let source = span
        .as_ref()
        .and_then(|s| text.get(s.clone()))
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 80 && !s.contains('\n'));

    let message = if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
        let got = match value {
            Some(v) => with_article(v.get_ref().type_str()),
            None => found.to_owned(),
        };
        format!("expected {}, got {got}", humanize_expected(expected))
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
        format!(
            "expected {}, got {}",
            humanize_expected(expected),
            source.unwrap_or(found)
        )
    } else if let Some(rest) = message.strip_prefix("unknown variant ") {
        format!("unknown value {rest}")
    } else if message.starts_with("wanted string or table") {
        // toml's own message for a non-string where an enum is expected.
        let got = value.map_or("?".to_owned(), |v| with_article(v.get_ref().type_str()));
        format!("expected a string, got {got}")
    } else if message == "invalid socket address syntax" {
        format!("expected {LISTEN_EXPECTED}, got {}", source.unwrap_or("?"))
    } else {
        match source {
            Some(src) => format!("{message} (got {src})"),
            None => message,
        }
    };
    ConfigError::Parse {
        path: path.to_owned(),
        line,
        key: render_path(&segs),
        message,
    }
}

/// The accepted key closest to `name` (edit distance at most 2), from
/// serde's "expected one of `a`, `b`" text.
pub(super) fn suggest(name: &str, expected: &str) -> Option<String> {
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (edit_distance(name, cand), cand))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, cand)| cand.to_owned())
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
