//! A YAML tree with the byte range of every node, built straight from the
//! `saphyr-parser` event stream (a maintained, pure-Rust YAML 1.2 parser).
//!
//! Scalars are resolved with YAML 1.2's core schema: `true`/`false`, null,
//! integers and floats when unquoted, strings otherwise. Anchors are
//! accepted; aliases and tags (`!!str`, `!local`) are refused: intent should
//! read the same to a person as to Musubi. Duplicate keys are found with a
//! set per mapping (a mapping of 100,000 keys reads in well under a second).

use std::collections::HashSet;
use std::ops::Range;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::source::SourceFile;
#[cfg(test)]
use crate::words::QUOTED_BYTES;
use crate::words::quoted;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    Unsupported(&'static str),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub range: Range<usize>,
}

/// A problem found while building the tree, at a byte range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeError {
    pub range: Range<usize>,
    pub message: String,
}

impl Node {
    /// The node in a few words, for a diagnostic: a string is quoted with
    /// its control characters escaped and at most [`crate::words::QUOTED_BYTES`] of it.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "nothing".into(),
            Value::Bool(b) => format!("`{b}`"),
            Value::Int(i) => format!("`{i}`"),
            Value::Float(f) => format!("`{f}`"),
            Value::Str(s) => format!("\"{}\"", quoted(s)),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
            Value::Unsupported(what) => (*what).into(),
        }
    }

    /// The node at a field path such as `lines[1].priority`, or the deepest
    /// node on the way there.
    pub fn at_path(&self, path: &str) -> &Node {
        let mut node = self;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let (key, indices) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                let Value::Map(entries) = &node.value else { return node };
                match entries.iter().find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key)) {
                    Some((_, v)) => node = v,
                    None => return node,
                }
            }
            for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
                let (Value::Seq(items), Ok(i)) = (&node.value, index.parse::<usize>()) else { return node };
                match items.get(i) {
                    Some(item) => node = item,
                    None => return node,
                }
            }
        }
        node
    }
}

fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Int(i);
    }
    if let Some(h) = s.strip_prefix("0x")
        && let Ok(i) = i64::from_str_radix(h, 16)
    {
        return Value::Int(i);
    }
    if let Some(o) = s.strip_prefix("0o")
        && let Ok(i) = i64::from_str_radix(o, 8)
    {
        return Value::Int(i);
    }
    let float_like = s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if float_like && let Ok(f) = s.parse::<f64>() {
        return Value::Float(f);
    }
    Value::Str(s.to_string())
}

/// Parses every document of a file. Problems the tree can see (duplicate
/// keys, aliases) come back beside it; a syntax error ends the file.
pub fn documents(file: &SourceFile) -> Result<(Vec<Node>, Vec<TreeError>), TreeError> {
    let range =
        |span: &Span| file.offset(span.start.line(), span.start.col())..file.offset(span.end.line(), span.end.col());
    enum Open {
        Seq(usize, Vec<Node>),
        /// Start, entries, the key waiting for its value, the keys seen.
        Map(usize, Vec<(Node, Node)>, Option<Node>, HashSet<String>),
    }
    let tagged = |tag: Option<&saphyr_parser::Tag>, r: Range<usize>, problems: &mut Vec<TreeError>| {
        if let Some(tag) = tag {
            let written = match tag.handle.as_str() {
                "tag:yaml.org,2002:" => format!("!!{}", tag.suffix),
                "!" | "" => format!("!{}", tag.suffix),
                handle => format!("{handle}{}", tag.suffix),
            };
            let written = quoted(&written);
            problems.push(TreeError { range: r, message: format!("tags (`{written}`) are not supported") });
        }
    };
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    for item in Parser::new_from_str(&file.text) {
        let (event, span) = item.map_err(|e| {
            let at = file.offset(e.marker().line(), e.marker().col());
            TreeError { range: at..(at + 1).min(file.text.len()).max(at), message: e.info().to_string() }
        })?;
        let node = match event {
            Event::Scalar(text, style, _, tag) => {
                let r = range(&span);
                if tag.is_some() {
                    tagged(tag.as_deref(), r.clone(), &mut problems);
                    Node { value: Value::Unsupported("a tagged value"), range: r }
                } else {
                    let value =
                        if style == ScalarStyle::Plain { resolve_plain(&text) } else { Value::Str(text.into_owned()) };
                    Node { value, range: r }
                }
            }
            Event::Alias(_) => {
                let r = range(&span);
                problems.push(TreeError { range: r.clone(), message: "aliases (*name) are not supported".into() });
                Node { value: Value::Unsupported("an alias"), range: r }
            }
            Event::SequenceStart(_, tag) => {
                tagged(tag.as_deref(), range(&span), &mut problems);
                stack.push(Open::Seq(range(&span).start, Vec::new()));
                continue;
            }
            Event::MappingStart(_, tag) => {
                tagged(tag.as_deref(), range(&span), &mut problems);
                stack.push(Open::Map(range(&span).start, Vec::new(), None, HashSet::new()));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Open::Seq(start, items)) => {
                    Node { value: Value::Seq(items), range: start..range(&span).end.max(start) }
                }
                _ => continue,
            },
            Event::MappingEnd => match stack.pop() {
                Some(Open::Map(start, entries, ..)) => {
                    Node { value: Value::Map(entries), range: start..range(&span).end.max(start) }
                }
                _ => continue,
            },
            Event::DocumentEnd | Event::DocumentStart(_) | Event::StreamStart | Event::StreamEnd | Event::Nothing => {
                continue;
            }
        };
        match stack.last_mut() {
            None => docs.push(node),
            Some(Open::Seq(_, items)) => items.push(node),
            Some(Open::Map(_, entries, pending, seen)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    let duplicate = matches!(&key.value, Value::Str(k) if !seen.insert(k.clone()));
                    if duplicate {
                        problems.push(TreeError {
                            range: key.range.clone(),
                            message: format!("duplicate key {}", key.describe()),
                        });
                    } else {
                        entries.push((key, node));
                    }
                }
            },
        }
    }
    Ok((docs, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<Node>, Vec<TreeError>) {
        documents(&SourceFile::new("t.yaml", text)).expect("yaml")
    }

    #[test]
    fn resolves_scalars_like_yaml_1_2() {
        let (docs, _) = parse("a: [1, -2, 0x10, 1.5, true, null, 10.0.0.0/16, \"3\", yes, 192.0.2.1]\n");
        let Value::Map(m) = &docs[0].value else { panic!("map") };
        let Value::Seq(items) = &m[0].1.value else { panic!("seq") };
        let values: Vec<&Value> = items.iter().map(|n| &n.value).collect();
        assert_eq!(values[0], &Value::Int(1));
        assert_eq!(values[1], &Value::Int(-2));
        assert_eq!(values[2], &Value::Int(16));
        assert_eq!(values[3], &Value::Float(1.5));
        assert_eq!(values[4], &Value::Bool(true));
        assert_eq!(values[5], &Value::Null);
        assert_eq!(values[6], &Value::Str("10.0.0.0/16".into()));
        assert_eq!(values[7], &Value::Str("3".into()));
        assert_eq!(values[8], &Value::Str("yes".into()), "YAML 1.2: yes is a string");
        assert_eq!(values[9], &Value::Str("192.0.2.1".into()));
    }

    #[test]
    fn ranges_cover_collections_and_paths_find_nodes() {
        let text = "kind: Site\nlines:\n  - {name: a, priority: 1}\n  - {name: b, priority: 2}\n";
        let (docs, _) = parse(text);
        let n = docs[0].at_path("lines[1].priority");
        assert_eq!(&text[n.range.clone()], "2");
        let n = docs[0].at_path("lines[1]");
        assert_eq!(&text[n.range.clone()], "{name: b, priority: 2}");
        // A missing field resolves to the nearest enclosing node.
        let n = docs[0].at_path("lines[1].colour");
        assert_eq!(&text[n.range.clone()], "{name: b, priority: 2}");
    }

    #[test]
    fn duplicate_keys_and_aliases_are_reported() {
        let (_, problems) = parse("a: &x 1\nb: *x\na: 2\n");
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages, ["aliases (*name) are not supported", "duplicate key \"a\""]);
    }

    #[test]
    fn tags_are_refused_like_aliases() {
        let (docs, problems) = parse("a: !!str 3\nb: !local {x: 1}\nc: !!seq [1]\nd: \"3\"\n");
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "tags (`!!str`) are not supported",
                "tags (`!local`) are not supported",
                "tags (`!!seq`) are not supported"
            ]
        );
        assert_eq!(docs[0].at_path("a").value, Value::Unsupported("a tagged value"));
        assert_eq!(docs[0].at_path("d").value, Value::Str("3".into()), "quoting still makes a string");
    }

    #[test]
    fn every_duplicate_among_many_keys_is_found() {
        // 20,000 keys, every thousandth written twice: found with a set per
        // mapping. The core bench's `reader` line times 100,000 (pairwise
        // comparison took 40 s there, the set 0.3 s).
        let mut text = String::with_capacity(2_000_000);
        for i in 0..20_000 {
            text.push_str(&format!("k{i}: {i}\n"));
            if i % 1000 == 999 {
                text.push_str(&format!("k{i}: again\n"));
            }
        }
        let (docs, problems) = parse(&text);
        assert_eq!(problems.len(), 20);
        assert!(problems.iter().all(|p| p.message.starts_with("duplicate key \"k") && p.message.ends_with("999\"")));
        let Value::Map(entries) = &docs[0].value else { panic!("map") };
        assert_eq!(entries.len(), 20_000);
    }

    #[test]
    fn a_diagnostic_quotes_little_of_a_long_value_and_no_control_characters() {
        let long = "x".repeat(1_000_000);
        let (docs, _) = parse(&format!("a: \"{long}\"\nb: \"red\\e[31m\\u0007\"\n"));
        let said = docs[0].at_path("a").describe();
        assert!(said.len() < QUOTED_BYTES + 40, "{} bytes quoted", said.len());
        assert!(said.contains("1000000 bytes"), "{said}");
        let said = docs[0].at_path("b").describe();
        assert!(!said.chars().any(char::is_control), "{said:?}");
        assert_eq!(said, "\"red\\u{1b}[31m\\u{7}\"");
    }
}
