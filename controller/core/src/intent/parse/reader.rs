//! Reading fields of a YAML mapping into typed values, reporting every
//! unknown field, wrong type or out-of-range value with its position.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::Parsed;
use crate::diagnostic::Diagnostic;
use crate::intent::source::{Loc, ObjectRef};
use crate::intent::tree::{Node, Value};
use crate::intent::{NumRange, ProbeOverride};

pub(super) struct Reader<'p> {
    pub(super) p: &'p mut Parsed,
    pub(super) file: usize,
    pub(super) obj: ObjectRef,
    /// Until the document's kind and name are read, what its problems are
    /// reported against (`document 3 of sites.yaml`) instead of `obj`.
    pub(super) document: Option<String>,
}

pub(super) type Fields<'n> = Vec<(&'n str, &'n Node, &'n Node)>;

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

impl Reader<'_> {
    pub(super) fn loc(&self, n: &Node) -> Loc {
        Loc { file: self.file, range: n.range.clone() }
    }

    pub(super) fn error(&mut self, n: &Node, field: &str, message: impl Into<String>, expected: impl Into<String>) {
        // Before the document's kind is read, the document itself is named
        // in the message; after, the object and field are the diagnostic's.
        let (object, field, message) = match &self.document {
            Some(document) => {
                let at = if field.is_empty() { String::new() } else { format!(", field `{field}`") };
                (None, None, format!("{document}{at}: {}", message.into()))
            }
            None => {
                self.p.sources.mark_unreadable(&self.obj, field);
                (Some(self.obj.clone()), (!field.is_empty()).then(|| field.to_string()), message.into())
            }
        };
        let d = Diagnostic {
            object,
            field,
            message,
            expected: Some(expected.into()),
            loc: Some(self.loc(n)),
            related: Vec::new(),
        };
        self.p.diagnostics.push(d);
    }

    /// The fields of a mapping; unknown keys are reported against the key.
    pub(super) fn map<'n>(&mut self, n: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &n.value else {
            self.error(n, path, format!("found {}", n.describe()), "a mapping");
            return None;
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let Value::Str(key) = &k.value else {
                self.error(k, path, format!("found key {}", k.describe()), "a field name");
                continue;
            };
            if allowed.contains(&key.as_str()) {
                out.push((key.as_str(), k, v));
            } else {
                let field = join(path, key);
                self.error(k, &field, format!("unknown field `{key}`"), format!("one of {}", allowed.join(", ")));
            }
        }
        Some(out)
    }

    pub(super) fn get<'n>(fields: &Fields<'n>, key: &str) -> Option<&'n Node> {
        fields.iter().find(|(k, _, _)| *k == key).map(|(_, _, v)| *v)
    }

    /// A required field is absent: point at the first line of its mapping.
    pub(super) fn missing(&mut self, at: &Node, path: &str, key: &str, expected: &str) {
        let text = &self.p.sources.files[self.file].text;
        let start = at.range.start;
        let end = text[start..at.range.end.min(text.len())].find('\n').map_or(at.range.end, |i| start + i);
        let first_line = Node { value: Value::Null, range: start..end };
        let field = join(path, key);
        self.error(&first_line, &field, format!("missing field `{key}`"), expected.to_string());
    }

    pub(super) fn string(&mut self, n: &Node, path: &str) -> Option<String> {
        match &n.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.error(n, path, format!("found {}", n.describe()), "a string");
                None
            }
        }
    }

    /// An IP address written as a string; anything else is an error
    /// saying what was `expected`.
    pub(super) fn address(&mut self, n: &Node, path: &str, expected: &str) -> Option<IpAddr> {
        let s = self.string(n, path)?;
        match s.parse::<IpAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(n, path, format!("\"{s}\" is not an IP address"), expected);
                None
            }
        }
    }

    pub(super) fn req_string(&mut self, f: &Fields<'_>, at: &Node, path: &str, key: &str) -> Option<String> {
        match Self::get(f, key) {
            Some(n) => self.string(n, &join(path, key)),
            None => {
                self.missing(at, path, key, "a string");
                None
            }
        }
    }

    pub(super) fn opt_string(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Option<String> {
        Self::get(f, key).and_then(|n| self.string(n, &join(path, key)))
    }

    pub(super) fn opt_bool(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Option<bool> {
        let n = Self::get(f, key)?;
        match n.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.error(n, &join(path, key), format!("found {}", n.describe()), "true or false");
                None
            }
        }
    }

    pub(super) fn int(&mut self, n: &Node, path: &str, min: u32, max: u32) -> Option<u32> {
        let expected = format!("an integer from {min} to {max}");
        match n.value {
            Value::Int(i) if i >= i64::from(min) && i <= i64::from(max) => u32::try_from(i).ok(),
            Value::Int(i) => {
                let written = self.written(n).unwrap_or_else(|| i.to_string());
                self.error(n, path, format!("{written} is out of range"), expected);
                None
            }
            // A number too large for an integer is read as a float: quote
            // it as the file writes it, not as the float prints.
            Value::Float(_) => {
                let written = self.written(n).map_or_else(|| n.describe(), |w| format!("`{w}`"));
                self.error(n, path, format!("found {written}"), expected);
                None
            }
            _ => {
                self.error(n, path, format!("found {}", n.describe()), expected);
                None
            }
        }
    }

    /// A scalar as the file writes it.
    fn written(&self, n: &Node) -> Option<String> {
        let text = self.p.sources.files[self.file].text.get(n.range.clone())?.trim();
        (!text.is_empty() && !text.contains('\n')).then(|| text.to_string())
    }

    pub(super) fn list<'n>(&mut self, n: &'n Node, path: &str, what: &str) -> Vec<(String, &'n Node)> {
        match &n.value {
            Value::Seq(items) => items.iter().enumerate().map(|(i, item)| (format!("{path}[{i}]"), item)).collect(),
            Value::Null => Vec::new(),
            _ => {
                self.error(n, path, format!("found {}", n.describe()), format!("a list of {what}"));
                Vec::new()
            }
        }
    }

    pub(super) fn string_list(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Vec<String> {
        let Some(n) = Self::get(f, key) else {
            return Vec::new();
        };
        let path = join(path, key);
        self.list(n, &path, "names").into_iter().filter_map(|(p, item)| self.string(item, &p)).collect()
    }

    pub(super) fn network(&mut self, n: &Node, path: &str) -> Option<IpNetwork> {
        let s = self.string(n, path)?;
        let net: IpNetwork = match s.parse() {
            Ok(net) => net,
            Err(_) => {
                self.error(n, path, format!("\"{s}\" is not an IP prefix"), "a prefix like 10.0.0.0/16 or fd00::/48");
                return None;
            }
        };
        if net.network() != net.ip() {
            let canonical = IpNetwork::new(net.network(), net.prefix()).map_or(s.clone(), |c| c.to_string());
            self.error(n, path, format!("\"{s}\" has host bits set"), format!("the network address {canonical}"));
            return None;
        }
        Some(net)
    }

    pub(super) fn networks(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Vec<IpNetwork> {
        let Some(n) = Self::get(f, key) else {
            return Vec::new();
        };
        let path = join(path, key);
        self.list(n, &path, "prefixes").into_iter().filter_map(|(p, item)| self.network(item, &p)).collect()
    }

    pub(super) fn choice<T: Copy>(&mut self, n: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        let Value::Str(s) = &n.value else {
            self.error(n, path, format!("found {}", n.describe()), expected);
            return None;
        };
        match options.iter().find(|(name, _)| name == s) {
            Some((_, v)) => Some(*v),
            None => {
                // Spelled in another case: say which one was meant.
                let meant = options.iter().find(|(name, _)| name.eq_ignore_ascii_case(s));
                let message = match meant {
                    Some((name, _)) => format!("unknown value \"{s}\" (did you mean \"{name}\"?)"),
                    None => format!("unknown value \"{s}\""),
                };
                self.error(n, path, message, expected);
                None
            }
        }
    }

    pub(super) fn probe(&mut self, n: &Node, path: &str) -> ProbeOverride {
        let Some(f) = self.map(n, path, &["interval_ms", "multiplier"]) else {
            return ProbeOverride::default();
        };
        ProbeOverride {
            interval_ms: Self::get(&f, "interval_ms").and_then(|v| self.int(v, &join(path, "interval_ms"), 10, 60_000)),
            multiplier: Self::get(&f, "multiplier").and_then(|v| self.int(v, &join(path, "multiplier"), 1, 100)),
        }
    }

    pub(super) fn range(&mut self, n: &Node, path: &str, min: u32, max: u32) -> Option<NumRange> {
        let f = self.map(n, path, &["first", "last"])?;
        let first = match Self::get(&f, "first") {
            Some(v) => self.int(v, &join(path, "first"), min, max),
            None => {
                self.missing(n, path, "first", "an integer");
                None
            }
        };
        let last = match Self::get(&f, "last") {
            Some(v) => self.int(v, &join(path, "last"), min, max),
            None => {
                self.missing(n, path, "last", "an integer");
                None
            }
        };
        let (first, last) = (first?, last?);
        if last < first {
            self.error(n, path, format!("range {first}-{last} is empty"), "first <= last");
            return None;
        }
        Some(NumRange::new(first, last))
    }

    /// A port (`443`) or a port range (`"20000-20100"`).
    pub(super) fn port_range(&mut self, n: &Node, path: &str) -> Option<NumRange> {
        const EXPECTED: &str = "a port from 1 to 65535 or a range like \"20000-20100\"";
        let (first, last) = match &n.value {
            Value::Int(i) => (*i, *i),
            Value::Str(s) => {
                let parsed =
                    s.split_once('-').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
                match parsed.or_else(|| s.trim().parse().ok().map(|p| (p, p))) {
                    Some(pair) => pair,
                    None => {
                        self.error(n, path, format!("\"{s}\" is not a port range"), EXPECTED);
                        return None;
                    }
                }
            }
            _ => {
                self.error(n, path, format!("found {}", n.describe()), EXPECTED);
                return None;
            }
        };
        if !(1..=65535).contains(&first) || !(1..=65535).contains(&last) || last < first {
            self.error(n, path, format!("port range {first}-{last} is out of range"), EXPECTED);
            return None;
        }
        Some(NumRange::new(first as u32, last as u32))
    }
}
