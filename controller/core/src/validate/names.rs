//! Names must be usable as Linux interface names, certificate identities and
//! file names: lowercase letters, digits and dashes, short enough.

use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{IFNAME_MAX, Intent, Kind, SEGMENT_NAME_MAX, WG_PREFIX};
use crate::words::quoted;

/// DNS label length: names end up in certificate SANs.
const NAME_MAX: usize = 63;

fn well_formed(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

fn name_ok(name: &str, max: usize) -> bool {
    well_formed(name) && name.len() <= max
}

/// Whether `name` could name an object of an intent (a site, a segment…):
/// what a server checks before it looks a name up or logs it.
pub fn object_name_ok(name: &str) -> bool {
    name_ok(name, NAME_MAX)
}

fn check_name(sources: &SourceMap, obj: &ObjectRef, field: &str, name: &str, max: usize, out: &mut Vec<Diagnostic>) {
    if !well_formed(name) {
        out.push(
            Diagnostic::at(sources, obj, field, format!("\"{}\" is not a valid name", quoted(name)))
                .expected("lowercase letters, digits and dashes, starting with a letter"),
        );
    } else if name.len() > max {
        out.push(
            Diagnostic::at(sources, obj, field, format!("\"{}\" is {} bytes long", quoted(name), name.len()))
                .expected(format!("at most {max} bytes")),
        );
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, whitespace or `:`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    for name in intent.tenants.keys() {
        check_name(sources, &ObjectRef::new(Kind::Tenant, name), "name", name, NAME_MAX, out);
    }
    for name in intent.policies.keys() {
        check_name(sources, &ObjectRef::new(Kind::Policy, name), "name", name, NAME_MAX, out);
    }
    for name in intent.segments.keys() {
        let obj = ObjectRef::new(Kind::Segment, name);
        if well_formed(name) && name.len() > SEGMENT_NAME_MAX {
            out.push(
                Diagnostic::at(
                    sources,
                    &obj,
                    "name",
                    format!(
                        "segment name \"{name}\" would make the interface name `{WG_PREFIX}{name}` {} bytes long",
                        name.len() + WG_PREFIX.len()
                    ),
                )
                .expected(format!("at most {SEGMENT_NAME_MAX} bytes, so interface names fit Linux's {IFNAME_MAX}")),
            );
        } else {
            check_name(sources, &obj, "name", name, SEGMENT_NAME_MAX, out);
        }
    }
    // 10,000 sites are checked on every apply: names and fields are spelt
    // out only for a problem.
    for (name, site) in &intent.sites {
        let obj = || ObjectRef::new(Kind::Site, name);
        if !name_ok(name, NAME_MAX) {
            check_name(sources, &obj(), "name", name, NAME_MAX, out);
        }
        for (i, line) in site.lines.iter().enumerate() {
            if !name_ok(&line.name, IFNAME_MAX) {
                check_name(sources, &obj(), &format!("lines[{i}].name"), &line.name, IFNAME_MAX, out);
            }
        }
        for (i, a) in site.attachments.iter().enumerate() {
            if let Some(ifname) = &a.interface
                && !valid_ifname(ifname)
            {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj(),
                        &format!("attachments[{i}].interface"),
                        format!("\"{ifname}\" is not a usable Linux interface name ({} bytes)", ifname.len()),
                    )
                    .expected(format!("1 to {IFNAME_MAX} bytes without '/', ':' or spaces")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("eth0.100"));
        assert!(valid_ifname("enp0s31f6-lan12"));
        assert!(!valid_ifname("enp0s31f6-lan123"));
        assert!(!valid_ifname("eth 0"));
        assert!(!valid_ifname(""));
    }

    #[test]
    fn names() {
        assert!(well_formed("city-a"));
        assert!(!well_formed("City"));
        assert!(!well_formed("1abc"));
        assert!(!well_formed("a-"));
        assert!(!well_formed("a_b"));
    }
}
