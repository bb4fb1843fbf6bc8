//! Reads YAML documents into an [`Intent`], recording the position of every
//! object and field, and reporting every problem it meets rather than
//! stopping at the first one.
//!
//! The YAML is parsed with `saphyr` (a maintained, pure-Rust YAML 1.2 library
//! that keeps a span for every node); the marked tree is then read by hand so
//! that unknown fields, wrong types and missing fields all become located
//! diagnostics in one pass.

use std::net::IpAddr;

use super::source::{Loc, ObjectRef, SourceFile, SourceMap};
use super::tree::{self, Node, Value};
use super::*;
use crate::diagnostic::Diagnostic;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

/// The result of reading YAML: the intent (possibly partial), where it came
/// from, and every problem found while reading.
#[derive(Debug, Default)]
pub struct Parsed {
    pub intent: Intent,
    pub sources: SourceMap,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads every document of every file into one intent.
pub fn parse_files(files: Vec<SourceFile>) -> Parsed {
    let mut p = Parsed::default();
    let mut settings_seen = false;
    for file in files {
        let id = p.sources.add_file(file);
        let (docs, problems) = match tree::documents(&p.sources.files[id]) {
            Ok(parsed) => parsed,
            Err(e) => {
                let name = &p.sources.files[id].name;
                p.diagnostics.push(
                    Diagnostic::new(format!("{name} is not valid YAML: {}", e.message))
                        .expected("well-formed YAML")
                        .with_loc(Loc { file: id, range: e.range }),
                );
                continue;
            }
        };
        for e in problems {
            p.diagnostics.push(
                Diagnostic::new(e.message)
                    .expected("plain YAML: each key once, no aliases")
                    .with_loc(Loc { file: id, range: e.range }),
            );
        }
        for doc in docs {
            if matches!(doc.value, Value::Null) {
                continue; // empty document, e.g. a trailing `---`
            }
            read_document(&mut p, id, doc, &mut settings_seen);
        }
    }
    p
}

/// Convenience for tests and the API: one in-memory file.
pub fn parse_str(name: &str, text: &str) -> Parsed {
    parse_files(vec![SourceFile::new(name, text)])
}

// ---------------------------------------------------------------------------
// Reading one object, collecting diagnostics.

struct Reader<'p> {
    p: &'p mut Parsed,
    file: usize,
    obj: ObjectRef,
}

type Fields<'n> = Vec<(&'n str, &'n Node, &'n Node)>;

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

impl Reader<'_> {
    fn loc(&self, n: &Node) -> Loc {
        Loc { file: self.file, range: n.range.clone() }
    }

    fn error(&mut self, n: &Node, field: &str, message: impl Into<String>, expected: impl Into<String>) {
        self.p.sources.mark_unreadable(&self.obj, field);
        let d = Diagnostic {
            object: Some(self.obj.clone()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.into(),
            expected: Some(expected.into()),
            loc: Some(self.loc(n)),
            related: Vec::new(),
        };
        self.p.diagnostics.push(d);
    }

    /// The fields of a mapping; unknown keys are reported against the key.
    fn map<'n>(&mut self, n: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
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

    fn get<'n>(fields: &Fields<'n>, key: &str) -> Option<&'n Node> {
        fields.iter().find(|(k, _, _)| *k == key).map(|(_, _, v)| *v)
    }

    /// A required field is absent: point at the first line of its mapping.
    fn missing(&mut self, at: &Node, path: &str, key: &str, expected: &str) {
        let text = &self.p.sources.files[self.file].text;
        let start = at.range.start;
        let end = text[start..at.range.end.min(text.len())].find('\n').map_or(at.range.end, |i| start + i);
        let first_line = Node { value: Value::Null, range: start..end };
        let field = join(path, key);
        self.error(&first_line, &field, format!("missing field `{key}`"), expected.to_string());
    }

    fn string(&mut self, n: &Node, path: &str) -> Option<String> {
        match &n.value {
            Value::Str(s) => Some(s.clone()),
            _ => {
                self.error(n, path, format!("found {}", n.describe()), "a string");
                None
            }
        }
    }

    fn req_string(&mut self, f: &Fields<'_>, at: &Node, path: &str, key: &str) -> Option<String> {
        match Self::get(f, key) {
            Some(n) => self.string(n, &join(path, key)),
            None => {
                self.missing(at, path, key, "a string");
                None
            }
        }
    }

    fn opt_string(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Option<String> {
        Self::get(f, key).and_then(|n| self.string(n, &join(path, key)))
    }

    fn int(&mut self, n: &Node, path: &str, min: u32, max: u32) -> Option<u32> {
        let expected = format!("an integer from {min} to {max}");
        match n.value {
            Value::Int(i) if i >= i64::from(min) && i <= i64::from(max) => u32::try_from(i).ok(),
            Value::Int(i) => {
                self.error(n, path, format!("{i} is out of range"), expected);
                None
            }
            _ => {
                self.error(n, path, format!("found {}", n.describe()), expected);
                None
            }
        }
    }

    fn list<'n>(&mut self, n: &'n Node, path: &str, what: &str) -> Vec<(String, &'n Node)> {
        match &n.value {
            Value::Seq(items) => items.iter().enumerate().map(|(i, item)| (format!("{path}[{i}]"), item)).collect(),
            Value::Null => Vec::new(),
            _ => {
                self.error(n, path, format!("found {}", n.describe()), format!("a list of {what}"));
                Vec::new()
            }
        }
    }

    fn string_list(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Vec<String> {
        let Some(n) = Self::get(f, key) else {
            return Vec::new();
        };
        let path = join(path, key);
        self.list(n, &path, "names").into_iter().filter_map(|(p, item)| self.string(item, &p)).collect()
    }

    fn network(&mut self, n: &Node, path: &str) -> Option<IpNetwork> {
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

    fn networks(&mut self, f: &Fields<'_>, path: &str, key: &str) -> Vec<IpNetwork> {
        let Some(n) = Self::get(f, key) else {
            return Vec::new();
        };
        let path = join(path, key);
        self.list(n, &path, "prefixes").into_iter().filter_map(|(p, item)| self.network(item, &p)).collect()
    }

    fn choice<T: Copy>(&mut self, n: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        let Value::Str(s) = &n.value else {
            self.error(n, path, format!("found {}", n.describe()), expected);
            return None;
        };
        match options.iter().find(|(name, _)| name == s) {
            Some((_, v)) => Some(*v),
            None => {
                self.error(n, path, format!("unknown value \"{s}\""), expected);
                None
            }
        }
    }

    fn probe(&mut self, n: &Node, path: &str) -> ProbeOverride {
        let Some(f) = self.map(n, path, &["interval_ms", "multiplier"]) else {
            return ProbeOverride::default();
        };
        ProbeOverride {
            interval_ms: Self::get(&f, "interval_ms").and_then(|v| self.int(v, &join(path, "interval_ms"), 10, 60_000)),
            multiplier: Self::get(&f, "multiplier").and_then(|v| self.int(v, &join(path, "multiplier"), 1, 100)),
        }
    }

    fn range(&mut self, n: &Node, path: &str, min: u32, max: u32) -> Option<NumRange> {
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
    fn port_range(&mut self, n: &Node, path: &str) -> Option<NumRange> {
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

const REGIONS: [(&str, Region); 2] = [("east", Region::East), ("west", Region::West)];
const ROLES: [(&str, Role); 2] = [("site", Role::Site), ("access-point", Role::AccessPoint)];
const PROTOCOLS: [(&str, Protocol); 4] =
    [("any", Protocol::Any), ("tcp", Protocol::Tcp), ("udp", Protocol::Udp), ("icmp", Protocol::Icmp)];
const LINE_KINDS: [(&str, LineKind); 5] = [
    ("dark-fiber", LineKind::DarkFiber),
    ("wide-area-ethernet", LineKind::WideAreaEthernet),
    ("internet-vpn", LineKind::InternetVpn),
    ("mobile", LineKind::Mobile),
    ("satellite", LineKind::Satellite),
];

fn read_document(p: &mut Parsed, file: usize, doc: Node, settings_seen: &mut bool) {
    if let Some(obj) = read_object(p, file, &doc, settings_seen) {
        p.sources.set_object(obj, file, doc);
    }
}

/// Reads one document into the intent; the object it declared, if any.
fn read_object(p: &mut Parsed, file: usize, doc: &Node, settings_seen: &mut bool) -> Option<ObjectRef> {
    let placeholder = ObjectRef::new(Kind::Settings, "?");
    let mut r = Reader { p, file, obj: placeholder };
    let Value::Map(entries) = &doc.value else {
        r.error(doc, "", format!("a document holds {}", doc.describe()), "a mapping with `kind` and `name`");
        return None;
    };
    let lookup =
        |key: &str| entries.iter().find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key)).map(|(_, v)| v);
    let kinds: Vec<(&str, Kind)> = Kind::ALL.iter().map(|k| (k.yaml(), *k)).collect();
    let Some(kind_node) = lookup("kind") else {
        r.error(doc, "kind", "missing field `kind`", "one of Tenant, Segment, Site, Policy, Settings");
        return None;
    };
    let kind = r.choice(kind_node, "kind", &kinds)?;
    let name = if kind == Kind::Settings {
        Some("settings".to_string())
    } else {
        match lookup("name") {
            Some(n) => r.string(n, "name"),
            None => {
                r.obj = ObjectRef::new(kind, "?");
                r.error(doc, "name", "missing field `name`", "a name");
                None
            }
        }
    };
    let name = name?;
    let obj = ObjectRef::new(kind, name.clone());
    r.obj = obj.clone();

    // A second definition is reported against the first and not read.
    let first = r.p.sources.object(&obj);
    let duplicate = first.is_some() || (kind == Kind::Settings && *settings_seen);
    if duplicate {
        let at = lookup("name").unwrap_or(kind_node);
        let what = if kind == Kind::Settings {
            "a second Settings document".to_string()
        } else {
            format!("duplicate {} name `{name}`", kind.word())
        };
        let d = Diagnostic {
            object: Some(obj.clone()),
            field: Some("name".into()),
            message: what,
            expected: Some(format!("each {} declared once", kind.word())),
            loc: Some(r.loc(at)),
            related: Vec::new(),
        }
        .related(r.p.sources.field(&obj, "name"), "first declared here");
        r.p.diagnostics.push(d);
        return None;
    }
    match kind {
        Kind::Tenant => read_tenant(&mut r, doc, name),
        Kind::Segment => read_segment(&mut r, doc, name),
        Kind::Site => read_site(&mut r, doc, name),
        Kind::Policy => read_policy(&mut r, doc, name),
        Kind::Settings => {
            *settings_seen = true;
            read_settings(&mut r, doc);
        }
    }
    Some(obj)
}

fn read_tenant(r: &mut Reader<'_>, doc: &Node, name: String) {
    let Some(f) = r.map(doc, "", &["kind", "name", "description"]) else {
        return;
    };
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent.tenants.insert(name.clone(), std::sync::Arc::new(Tenant { name, description }));
}

fn read_segment(r: &mut Reader<'_>, doc: &Node, name: String) {
    let Some(f) = r.map(doc, "", &["kind", "name", "tenant", "prefixes", "shared_with", "description"]) else {
        return;
    };
    let tenant = r.req_string(&f, doc, "", "tenant").unwrap_or_default();
    let prefixes = r.networks(&f, "", "prefixes");
    let shared_with = r.string_list(&f, "", "shared_with");
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent
        .segments
        .insert(name.clone(), std::sync::Arc::new(Segment { name, tenant, prefixes, shared_with, description }));
}

fn read_site(r: &mut Reader<'_>, doc: &Node, name: String) {
    let allowed = ["kind", "name", "tenant", "role", "region", "lines", "attachments", "description"];
    let Some(f) = r.map(doc, "", &allowed) else {
        return;
    };
    let tenant = r.req_string(&f, doc, "", "tenant").unwrap_or_default();
    let role = Reader::get(&f, "role").and_then(|n| r.choice(n, "role", &ROLES)).unwrap_or_default();
    let region = match Reader::get(&f, "region") {
        Some(n) => r.choice(n, "region", &REGIONS).unwrap_or_default(),
        None => {
            r.missing(doc, "", "region", "east or west");
            Region::East
        }
    };
    let mut lines = Vec::new();
    if let Some(n) = Reader::get(&f, "lines") {
        for (path, item) in r.list(n, "lines", "lines") {
            if let Some(line) = read_line(r, item, &path) {
                lines.push(line);
            }
        }
    }
    let mut attachments = Vec::new();
    if let Some(n) = Reader::get(&f, "attachments") {
        for (path, item) in r.list(n, "attachments", "attachments") {
            if let Some(a) = read_attachment(r, item, &path) {
                attachments.push(a);
            }
        }
    }
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent.sites.insert(
        name.clone(),
        std::sync::Arc::new(Site { name, tenant, role, region, lines, attachments, description }),
    );
}

fn read_line(r: &mut Reader<'_>, n: &Node, path: &str) -> Option<Line> {
    let f = r.map(n, path, &["name", "kind", "priority", "address", "probe"])?;
    let name = r.req_string(&f, n, path, "name");
    let kind = match Reader::get(&f, "kind") {
        Some(v) => r.choice(v, &join(path, "kind"), &LINE_KINDS),
        None => {
            r.missing(n, path, "kind", "a line kind");
            None
        }
    };
    let priority = match Reader::get(&f, "priority") {
        Some(v) => r.int(v, &join(path, "priority"), 1, 1000),
        None => {
            r.missing(n, path, "priority", "an integer, 1 for the first choice");
            None
        }
    };
    let address = match Reader::get(&f, "address") {
        Some(v) => {
            let p = join(path, "address");
            r.string(v, &p).and_then(|s| match s.parse::<IpAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.error(v, &p, format!("\"{s}\" is not an IP address"), "an IPv4 or IPv6 address");
                    None
                }
            })
        }
        None => {
            r.missing(n, path, "address", "the line's underlay IP address");
            None
        }
    };
    let probe = Reader::get(&f, "probe").map(|v| r.probe(v, &join(path, "probe"))).unwrap_or_default();
    Some(Line { name: name?, kind: kind?, priority: priority?, address: address?, probe })
}

fn read_attachment(r: &mut Reader<'_>, n: &Node, path: &str) -> Option<Attachment> {
    let f = r.map(n, path, &["segment", "interface", "prefixes"])?;
    let segment = r.req_string(&f, n, path, "segment");
    let interface = r.opt_string(&f, path, "interface");
    let prefixes = r.networks(&f, path, "prefixes");
    Some(Attachment { segment: segment?, interface, prefixes })
}

fn read_policy(r: &mut Reader<'_>, doc: &Node, name: String) {
    let allowed = ["kind", "name", "tenant", "from", "to", "protocol", "ports", "description"];
    let Some(f) = r.map(doc, "", &allowed) else {
        return;
    };
    let tenant = r.req_string(&f, doc, "", "tenant").unwrap_or_default();
    let from = r.req_string(&f, doc, "", "from").unwrap_or_default();
    let to = r.req_string(&f, doc, "", "to").unwrap_or_default();
    let protocol = Reader::get(&f, "protocol").and_then(|n| r.choice(n, "protocol", &PROTOCOLS)).unwrap_or_default();
    let mut ports = Vec::new();
    if let Some(n) = Reader::get(&f, "ports") {
        for (path, item) in r.list(n, "ports", "ports") {
            ports.extend(r.port_range(item, &path));
        }
    }
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent
        .policies
        .insert(name.clone(), std::sync::Arc::new(Policy { name, tenant, from, to, protocol, ports, description }));
}

fn read_settings(r: &mut Reader<'_>, doc: &Node) {
    let allowed = [
        "kind",
        "probe",
        "line_kinds",
        "wireguard_ports",
        "routing_tables",
        "tunnel_addresses",
        "interconnect_addresses",
    ];
    let Some(f) = r.map(doc, "", &allowed) else {
        return;
    };
    let mut s = Settings::default();
    if let Some(n) = Reader::get(&f, "probe") {
        s.probe = s.probe.with(r.probe(n, "probe"));
    }
    if let Some(n) = Reader::get(&f, "line_kinds") {
        let kinds: Vec<&str> = LINE_KINDS.iter().map(|(k, _)| *k).collect();
        if let Some(kf) = r.map(n, "line_kinds", &kinds) {
            for (key, _, v) in kf {
                if let Some((_, kind)) = LINE_KINDS.iter().find(|(k, _)| *k == key) {
                    let o = r.probe(v, &join("line_kinds", key));
                    s.line_kind_probe.insert(*kind, o);
                }
            }
        }
    }
    if let Some(n) = Reader::get(&f, "wireguard_ports") {
        s.wireguard_ports = r.range(n, "wireguard_ports", 1, 65535).unwrap_or(s.wireguard_ports);
    }
    if let Some(n) = Reader::get(&f, "routing_tables") {
        // 253-255 are the kernel's default, main and local tables.
        s.routing_tables = r.range(n, "routing_tables", 256, u32::MAX - 1).unwrap_or(s.routing_tables);
    }
    if let Some(n) = Reader::get(&f, "tunnel_addresses") {
        let (v4, v6) = read_pools(r, n, "tunnel_addresses");
        s.tunnel_ipv4 = v4.unwrap_or(s.tunnel_ipv4);
        s.tunnel_ipv6 = v6.unwrap_or(s.tunnel_ipv6);
    }
    if let Some(n) = Reader::get(&f, "interconnect_addresses") {
        let (v4, v6) = read_pools(r, n, "interconnect_addresses");
        s.interconnect_ipv4 = v4.unwrap_or(s.interconnect_ipv4);
        s.interconnect_ipv6 = v6.unwrap_or(s.interconnect_ipv6);
    }
    r.p.intent.settings = s;
}

fn read_pools(r: &mut Reader<'_>, n: &Node, path: &str) -> (Option<Ipv4Network>, Option<Ipv6Network>) {
    let Some(f) = r.map(n, path, &["ipv4", "ipv6"]) else {
        return (None, None);
    };
    let v4 = Reader::get(&f, "ipv4").and_then(|v| {
        let p = join(path, "ipv4");
        match r.network(v, &p)? {
            IpNetwork::V4(net) => Some(net),
            IpNetwork::V6(_) => {
                r.error(v, &p, "found an IPv6 prefix", "an IPv4 prefix");
                None
            }
        }
    });
    let v6 = Reader::get(&f, "ipv6").and_then(|v| {
        let p = join(path, "ipv6");
        match r.network(v, &p)? {
            IpNetwork::V6(net) => Some(net),
            IpNetwork::V4(_) => {
                r.error(v, &p, "found an IPv4 prefix", "an IPv6 prefix");
                None
            }
        }
    });
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_kind_and_records_field_positions() {
        let text = "kind: Tenant\nname: city-a\ndescription: 市役所\n---\nkind: Segment\nname: lgwan\ntenant: city-a\nprefixes: [10.0.0.0/16, \"fd00::/48\"]\n";
        let p = parse_str("t.yaml", text);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        assert_eq!(p.intent.tenants["city-a"].description, "市役所");
        assert_eq!(p.intent.segments["lgwan"].prefixes.len(), 2);
        let obj = ObjectRef::new(Kind::Segment, "lgwan");
        let loc = p.sources.field(&obj, "prefixes[1]").expect("located");
        assert_eq!(p.sources.describe(&loc), "t.yaml:8:25");
    }

    #[test]
    fn reports_every_problem_of_a_document() {
        let text = "kind: Site\nname: s1\ntenant: t\nregion: north\ncolour: blue\nlines:\n  - {name: f, kind: fiber, priority: 0, address: 1.2.3}\n";
        let p = parse_str("t.yaml", text);
        let msgs: Vec<String> = p.diagnostics.iter().map(|d| d.short(&p.sources)).collect();
        assert_eq!(msgs.len(), 5, "{msgs:#?}");
        assert!(
            msgs.iter().any(|m| m.starts_with("t.yaml:4:9: site `s1`, field `region`: unknown value \"north\"")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with("t.yaml:5:1: site `s1`, field `colour`: unknown field")),
            "{msgs:#?}"
        );
        assert!(msgs.iter().any(|m| m.contains("lines[0].kind") && m.contains("\"fiber\"")));
        assert!(msgs.iter().any(|m| m.contains("lines[0].priority") && m.contains("0 is out of range")));
        assert!(msgs.iter().any(|m| m.contains("lines[0].address") && m.contains("not an IP address")));
    }

    #[test]
    fn broken_yaml_is_located() {
        let p = parse_str("b.yaml", "kind: Tenant\nname: [unclosed\n");
        assert_eq!(p.diagnostics.len(), 1);
        assert!(p.diagnostics[0].short(&p.sources).starts_with("b.yaml:"), "{:?}", p.diagnostics);
    }
}
