//! Conversions between the operator API's protobuf messages and the core's
//! types, both ways, in one place: the server sends diagnostics and plans,
//! the CLI turns them back and renders them exactly as local ones.

use musubi_proto::v1 as pb;

use crate::audit::AuditEntry;
use crate::diagnostic::Diagnostic;
use crate::intent::source::{Loc, ObjectRef, SourceFile};
use crate::intent::{Kind, YamlName};
use crate::plan::{Action, Change, Plan};

pub fn documents(files: &[SourceFile]) -> Vec<pb::Document> {
    files.iter().map(|f| pb::Document { name: f.name.clone(), text: f.text.clone() }).collect()
}

pub fn source_files(docs: &[pb::Document]) -> Vec<SourceFile> {
    docs.iter().map(|d| SourceFile::new(d.name.clone(), d.text.clone())).collect()
}

fn span(loc: &Loc) -> pb::Span {
    pb::Span { document: loc.file as u32, start: loc.range.start as u64, end: loc.range.end as u64 }
}

fn loc(span: &pb::Span) -> Loc {
    Loc { file: span.document as usize, range: span.start as usize..span.end as usize }
}

pub fn diagnostic_to_pb(d: &Diagnostic) -> pb::Diagnostic {
    pb::Diagnostic {
        object_kind: d.object.as_ref().map(|o| o.kind.yaml().to_string()).unwrap_or_default(),
        object_name: d.object.as_ref().map(|o| o.name.clone()).unwrap_or_default(),
        field: d.field.clone().unwrap_or_default(),
        message: d.message.clone(),
        expected: d.expected.clone().unwrap_or_default(),
        span: d.loc.as_ref().map(span),
        related: d.related.iter().map(|(l, note)| pb::Related { span: Some(span(l)), note: note.clone() }).collect(),
    }
}

/// A diagnostic from the server. Spans are only trusted if they fall inside
/// the documents the client sent.
pub fn diagnostic_from_pb(d: &pb::Diagnostic, files: &[SourceFile]) -> Diagnostic {
    let valid = |s: &pb::Span| {
        files.get(s.document as usize).is_some_and(|f| s.start <= s.end && (s.end as usize) <= f.text.len())
    };
    let object =
        Kind::ALL.iter().find(|k| k.yaml() == d.object_kind).map(|k| ObjectRef::new(*k, d.object_name.clone()));
    Diagnostic {
        object,
        field: (!d.field.is_empty()).then(|| d.field.clone()),
        message: d.message.clone(),
        expected: (!d.expected.is_empty()).then(|| d.expected.clone()),
        loc: d.span.as_ref().filter(|s| valid(s)).map(loc),
        related: d
            .related
            .iter()
            .filter_map(|r| r.span.as_ref().filter(|s| valid(s)).map(|s| (loc(s), r.note.clone())))
            .collect(),
    }
}

fn change_to_pb(c: &Change) -> pb::PlanChange {
    pb::PlanChange {
        action: match c.action {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Change => "change",
        }
        .into(),
        kind: c.kind.to_string(),
        name: c.name.clone(),
        details: c.details.clone(),
        children: c.children.iter().map(change_to_pb).collect(),
    }
}

pub fn plan_to_pb(p: &Plan) -> Vec<pb::PlanChange> {
    p.sites.iter().map(change_to_pb).collect()
}

/// Kinds the core knows; anything else from the wire reads as "object".
fn kind_word(kind: &str) -> &'static str {
    ["site", "segment", "peer", "route group", "policy", "import", "line"]
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("object")
}

fn change_from_pb(c: &pb::PlanChange) -> Change {
    Change {
        action: match c.action.as_str() {
            "add" => Action::Add,
            "remove" => Action::Remove,
            _ => Action::Change,
        },
        kind: kind_word(&c.kind),
        name: c.name.clone(),
        details: c.details.clone(),
        children: c.children.iter().map(change_from_pb).collect(),
    }
}

pub fn plan_from_pb(sites: &[pb::PlanChange]) -> Plan {
    Plan { sites: sites.iter().map(change_from_pb).collect() }
}

pub fn audit_to_pb(e: &AuditEntry) -> pb::AuditRecord {
    pb::AuditRecord {
        revision: e.revision,
        time_ms: e.time_ms,
        actor: e.actor.clone(),
        summary: e.summary.clone(),
        previous: e.previous.clone(),
        hash: e.hash.clone(),
        changes: e.changes.clone(),
        event: e.event,
        signer: e.signer.clone(),
        signature: e.signature.clone(),
        intent: e.intent.clone(),
    }
}

pub fn audit_from_pb(e: &pb::AuditRecord) -> AuditEntry {
    AuditEntry {
        revision: e.revision,
        time_ms: e.time_ms,
        actor: e.actor.clone(),
        summary: e.summary.clone(),
        previous: e.previous.clone(),
        hash: e.hash.clone(),
        changes: e.changes.clone(),
        event: e.event,
        signer: e.signer.clone(),
        signature: e.signature.clone(),
        intent: e.intent.clone(),
    }
}
