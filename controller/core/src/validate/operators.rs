//! Operator bindings: a name a certificate can carry, at least one role,
//! declared tenants for the roles that act for tenants, and at least two
//! admins once any operator is bound (a national change is proposed by one
//! and approved by another; with fewer nobody could change one again).

use crate::access::operator_name_problem;
use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{Intent, Kind, OperatorRole};

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    for (name, op) in &intent.operators {
        let obj = ObjectRef::new(Kind::Operator, name);
        if let Some(why) = operator_name_problem(name) {
            out.push(
                Diagnostic::at(sources, &obj, "name", format!("operator name `{}`: {why}", crate::words::quoted(name)))
                    .expected("the name of an operator certificate (musubi-controller operator NAME)"),
            );
        }
        if op.roles.is_empty() && !sources.is_unreadable(&obj, "roles") {
            out.push(
                Diagnostic::at(sources, &obj, "roles", "an operator without a role can do nothing")
                    .expected("one or more of admin, operator, viewer, auditor"),
            );
        }
        let for_tenants = op.roles.iter().any(|r| matches!(r, OperatorRole::Operator | OperatorRole::Viewer));
        if for_tenants && op.tenants.is_empty() {
            out.push(
                Diagnostic::at(
                    sources,
                    &obj,
                    "tenants",
                    "the operator and viewer roles act for tenants; none is listed",
                )
                .expected("the tenants this operator acts for"),
            );
        }
        for (i, t) in op.tenants.iter().enumerate() {
            if !intent.tenants.contains_key(t) {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &format!("tenants[{i}]"),
                        format!("tenant `{}` is not declared", crate::words::quoted(t)),
                    )
                    .expected("the name of a declared tenant"),
                );
            }
        }
    }
    let admins: Vec<&String> =
        intent.operators.iter().filter(|(_, o)| o.roles.contains(&OperatorRole::Admin)).map(|(n, _)| n).collect();
    let problem = match admins[..] {
        [] => "operators are bound but none is an admin: nobody could change a national object or an operator again",
        [_] => "operators are bound with one admin: a change of a national object needs a second admin to approve it",
        _ => return,
    };
    if let Some(first) = admins.first().copied().or_else(|| intent.operators.keys().next()) {
        out.push(
            Diagnostic::at(sources, &ObjectRef::new(Kind::Operator, first), "roles", problem)
                .expected("at least two Operators with role admin"),
        );
    }
}
