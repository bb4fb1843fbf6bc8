//! Who may do what. An operator identity (the name in its certificate) is
//! bound to roles and tenants by an `Operator` object of the intent, so
//! bindings change only through audited applies and every replica judges
//! with the same ones.
//!
//! | role | changes | reads |
//! | --- | --- | --- |
//! | admin | everything | everything, the history |
//! | operator | its tenants' objects; tokens and revocations of their sites | its tenants' objects |
//! | viewer | nothing | its tenants' objects and their sites' status |
//! | auditor | nothing | everything, the history |
//!
//! National objects — the settings, tenants, operators, access points,
//! sites and segments of a `national` tenant, policies between tenants —
//! need admin. A tenant's objects are its sites, the segments it owns and
//! the policies it declares between two of its own segments. "Its tenants'
//! objects" to read also include the segments shared with them (their sites
//! attach to them). Until the intent binds a first operator every operator
//! certificate is an admin (a new deployment starts so); a binding must
//! then leave at least one admin. A caller without TLS (`local`: the
//! controller's loopback in --insecure mode) is an admin.
//!
//! Rights are those of the intent *before* a change: nobody grants
//! themselves more in the change that uses it.

use std::collections::BTreeSet;

use crate::intent::source::ObjectRef;
use crate::intent::{Intent, Kind, OperatorRole};
use crate::sorted::{Side, merge};

/// What an operator name may be: the name of its certificate and of its
/// files in the PKI directory, beside the CA's and the server's. The reason
/// when it may not.
pub fn operator_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 64 {
        return Some("an operator's name is 1 to 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')) {
        return Some("use lowercase letters, digits, `-`, `_` and `.` (no `/`, no spaces)");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Some("an operator's name starts with a letter or a digit");
    }
    if matches!(name, "ca" | "server" | "musubi-controller") || name.ends_with("-key") || name.ends_with(".tmp") {
        return Some("the PKI directory's own files (the CA, the server, keys) use that name");
    }
    None
}

/// Whose an object is: the whole network's, or one tenant's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    National,
    Tenant(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::National => f.write_str("a national object"),
            Scope::Tenant(t) => write!(f, "tenant `{t}`'s"),
        }
    }
}

/// What one caller may do, as the intent binds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rights {
    /// The caller, as the audit chain names it.
    pub actor: String,
    /// Changes everything.
    pub admin: bool,
    /// Reads everything and the history.
    pub read_all: bool,
    /// Tenants whose objects it changes.
    pub write: BTreeSet<String>,
    /// Tenants whose objects it reads.
    pub read: BTreeSet<String>,
    /// The operator name it was bound as (`None`: no binding was needed or found).
    pub operator: Option<String>,
}

/// The operator name of an actor (`operator:NAME`).
pub fn operator_of(actor: &str) -> Option<&str> {
    actor.strip_prefix("operator:")
}

/// The rights `actor` has under `intent`'s bindings.
pub fn rights(intent: &Intent, actor: &str) -> Rights {
    let mut r = Rights { actor: actor.to_string(), ..Default::default() };
    let operator = operator_of(actor);
    r.operator = operator.map(str::to_string);
    if actor == "local" || intent.operators.is_empty() {
        r.admin = true;
        r.read_all = true;
        return r;
    }
    let Some(binding) = operator.and_then(|name| intent.operators.get(name)) else {
        return r;
    };
    for role in &binding.roles {
        match role {
            OperatorRole::Admin => {
                r.admin = true;
                r.read_all = true;
            }
            OperatorRole::Auditor => r.read_all = true,
            OperatorRole::Operator => {
                r.write.extend(binding.tenants.iter().cloned());
                r.read.extend(binding.tenants.iter().cloned());
            }
            OperatorRole::Viewer => r.read.extend(binding.tenants.iter().cloned()),
        }
    }
    r
}

impl Rights {
    /// May it change objects of `scope`?
    pub fn may_change(&self, scope: &Scope) -> bool {
        self.admin
            || match scope {
                Scope::National => false,
                Scope::Tenant(t) => self.write.contains(t),
            }
    }

    /// Does it hold any role at all?
    pub fn is_bound(&self) -> bool {
        self.admin || self.read_all || !self.read.is_empty()
    }

    /// May it read the history and the whole intent at once?
    pub fn reads_everything(&self) -> bool {
        self.read_all
    }

    /// May it read `kind`/`name` of `intent`?
    pub fn may_read(&self, intent: &Intent, kind: Kind, name: &str) -> bool {
        if self.read_all {
            return true;
        }
        let reads = |t: &str| self.read.contains(t);
        match kind {
            // Probe timings and address pools: what every site runs with.
            Kind::Settings => self.is_bound(),
            Kind::Tenant => reads(name),
            Kind::Operator => self.operator.as_deref() == Some(name),
            Kind::Segment => {
                intent.segments.get(name).is_some_and(|s| reads(&s.tenant) || s.shared_with.iter().any(|t| reads(t)))
            }
            Kind::Site => matches!(site_scope(intent, name), Scope::Tenant(t) if reads(&t)),
            Kind::Policy => intent.policies.get(name).is_some_and(|p| reads(&p.tenant)),
        }
    }

    /// May it create join tokens for, revoke or restore `site`?
    pub fn may_manage_site(&self, intent: &Intent, site: &str) -> bool {
        self.may_change(&site_scope(intent, site))
    }
}

fn tenant_scope(intent: &Intent, tenant: &str) -> Scope {
    match intent.tenants.get(tenant) {
        Some(t) if !t.national => Scope::Tenant(tenant.to_string()),
        // A national tenant's, or one not declared (validation refuses it).
        _ => Scope::National,
    }
}

/// Whose `site` of `intent` is (an access point, or a site not in the
/// intent: national).
pub fn site_scope(intent: &Intent, site: &str) -> Scope {
    match intent.sites.get(site) {
        Some(s) if !s.is_access_point() => tenant_scope(intent, &s.tenant),
        _ => Scope::National,
    }
}

/// Whose each object of `kind`/`name` of `intent` is.
pub fn scope(intent: &Intent, kind: Kind, name: &str) -> Scope {
    match kind {
        Kind::Settings | Kind::Tenant | Kind::Operator => Scope::National,
        Kind::Site => site_scope(intent, name),
        Kind::Segment => intent.segments.get(name).map_or(Scope::National, |s| tenant_scope(intent, &s.tenant)),
        // A policy is its tenant's when both of its segments are that tenant's own.
        Kind::Policy => intent.policies.get(name).map_or(Scope::National, |p| {
            let own = |seg: &str| intent.segments.get(seg).is_some_and(|s| s.tenant == p.tenant);
            if own(&p.from) && own(&p.to) { tenant_scope(intent, &p.tenant) } else { Scope::National }
        }),
    }
}

/// An object a caller may not change, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub object: ObjectRef,
    pub scope: Scope,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let need = match &self.scope {
            Scope::National => "an admin".to_string(),
            Scope::Tenant(t) => format!("an admin or an operator of tenant `{t}`"),
        };
        write!(f, "{} is {}: changing it needs {need}", self.object, self.scope)
    }
}

/// Every object `before` → `after` adds, removes or changes that `rights`
/// may not change, judged by whose it is on each side (moving a site from
/// one tenant to another needs both).
pub fn check_change(rights: &Rights, before: &Intent, after: &Intent) -> Vec<Refusal> {
    if rights.admin {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (object, scopes) in changed(before, after) {
        if let Some(denied) = scopes.into_iter().find(|s| !rights.may_change(s)) {
            out.push(Refusal { object, scope: denied });
        }
    }
    out
}

/// Does the change from `before` need a second operator's approval? Once
/// operators are bound, every change that touches a national object does.
pub fn needs_approval(before: &Intent, after: &Intent) -> bool {
    !before.operators.is_empty() && changed(before, after).iter().any(|(_, scopes)| scopes.contains(&Scope::National))
}

/// Every object `before` → `after` adds, removes or changes, with whose it
/// is on each side it exists.
fn changed(before: &Intent, after: &Intent) -> Vec<(ObjectRef, Vec<Scope>)> {
    let mut changed: Vec<(Kind, &str, bool, bool)> = Vec::new();
    if before.settings != after.settings {
        changed.push((Kind::Settings, "settings", true, true));
    }
    fn sides<'a, T: PartialEq>(
        out: &mut Vec<(Kind, &'a str, bool, bool)>,
        kind: Kind,
        a: &'a std::collections::BTreeMap<String, std::sync::Arc<T>>,
        b: &'a std::collections::BTreeMap<String, std::sync::Arc<T>>,
    ) {
        for side in merge(a, b) {
            match side {
                Side::Left(name, _) => out.push((kind, name, true, false)),
                Side::Right(name, _) => out.push((kind, name, false, true)),
                Side::Both(name, x, y) if !std::sync::Arc::ptr_eq(x, y) && x != y => out.push((kind, name, true, true)),
                Side::Both(..) => {}
            }
        }
    }
    sides(&mut changed, Kind::Tenant, &before.tenants, &after.tenants);
    sides(&mut changed, Kind::Segment, &before.segments, &after.segments);
    sides(&mut changed, Kind::Site, &before.sites, &after.sites);
    sides(&mut changed, Kind::Policy, &before.policies, &after.policies);
    sides(&mut changed, Kind::Operator, &before.operators, &after.operators);
    changed
        .into_iter()
        .map(|(kind, name, was, is)| {
            let mut scopes = Vec::new();
            if was {
                scopes.push(scope(before, kind, name));
            }
            if is {
                scopes.push(scope(after, kind, name));
            }
            // Declaring or changing a segment's mutual aid stages it on
            // another network's access points (national): the nation's
            // change too. Withdrawing one is the segment's own.
            let aid = |i: &Intent| i.segments.get(name).map(|s| s.aid.clone()).unwrap_or_default();
            if kind == Kind::Segment && is && !aid(after).is_empty() && aid(before) != aid(after) {
                scopes.push(Scope::National);
            }
            scopes.sort();
            scopes.dedup();
            (ObjectRef::new(kind, name), scopes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::parse::parse_str;

    fn intent() -> Intent {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../topologies/two-cities.yaml");
        let p = parse_str("two-cities.yaml", &std::fs::read_to_string(path).expect("topologies/two-cities.yaml"));
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let problems = crate::validate::validate(&p.intent, &p.sources);
        assert!(problems.is_empty(), "{problems:?}");
        p.intent
    }

    fn site<'a>(i: &'a mut Intent, name: &str) -> &'a mut crate::intent::Site {
        std::sync::Arc::make_mut(i.sites.get_mut(name).expect("site"))
    }
    fn policy<'a>(i: &'a mut Intent, name: &str) -> &'a mut crate::intent::Policy {
        std::sync::Arc::make_mut(i.policies.get_mut(name).expect("policy"))
    }
    fn segment<'a>(i: &'a mut Intent, name: &str) -> &'a mut crate::intent::Segment {
        std::sync::Arc::make_mut(i.segments.get_mut(name).expect("segment"))
    }

    /// A city's operator may not stage its segment on national access
    /// points by itself: declaring an aid is a national change (two admins);
    /// withdrawing it is the city's own.
    #[test]
    fn declaring_a_mutual_aid_is_a_national_change() {
        let before = intent();
        let mut after = before.clone();
        segment(&mut after, "kita-lan").aid = vec![crate::intent::Aid {
            name: "kita-via-ap".into(),
            access_points: vec!["ap-east".into(), "ap-west".into()],
            max_duration_s: 3600,
            ..Default::default()
        }];
        let kita = rights(&before, "operator:kita-ops");
        let refused = check_change(&kita, &before, &after);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].scope, Scope::National);
        assert!(needs_approval(&before, &after));
        assert!(check_change(&kita, &after, &before).is_empty(), "withdrawing it is the city's");
    }
    fn operator<'a>(i: &'a mut Intent, name: &str) -> &'a mut crate::intent::Operator {
        std::sync::Arc::make_mut(i.operators.get_mut(name).expect("operator"))
    }
    fn tenant<'a>(i: &'a mut Intent, name: &str) -> &'a mut crate::intent::Tenant {
        std::sync::Arc::make_mut(i.tenants.get_mut(name).expect("tenant"))
    }

    fn edit(intent: &Intent, f: impl FnOnce(&mut Intent)) -> Intent {
        let mut new = intent.clone();
        f(&mut new);
        new
    }

    fn refused(actor: &str, before: &Intent, after: &Intent) -> Vec<String> {
        check_change(&rights(before, actor), before, after).iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn a_citys_operator_changes_its_own_objects_and_nothing_else() {
        let i = intent();
        let kita = "operator:kita-ops";
        let own_site = edit(&i, |n| site(n, "kita-hall").description = "x".into());
        assert!(refused(kita, &i, &own_site).is_empty());
        let own_policy = edit(&i, |n| policy(n, "kita-files").ports.clear());
        assert!(refused(kita, &i, &own_policy).is_empty());

        let other_site = edit(&i, |n| site(n, "minami-hall").description = "x".into());
        assert_eq!(
            refused(kita, &i, &other_site),
            [
                "site `minami-hall` is tenant `city-minami`'s: changing it needs an admin or an operator of tenant `city-minami`"
            ]
        );
        let national_segment = edit(&i, |n| segment(n, "lgwan").description = "x".into());
        assert_eq!(
            refused(kita, &i, &national_segment),
            ["segment `lgwan` is a national object: changing it needs an admin"]
        );
        let settings = edit(&i, |n| n.settings.probe.interval_ms = 20);
        assert_eq!(refused(kita, &i, &settings).len(), 1);
        let access_point = edit(&i, |n| {
            site(n, "ap-east").description = "x".into();
        });
        assert_eq!(refused(kita, &i, &access_point).len(), 1);
        // Giving its site away, or taking one, needs the other tenant too.
        let give = edit(&i, |n| site(n, "kita-hall").tenant = "city-minami".into());
        assert_eq!(refused(kita, &i, &give).len(), 1);
        // Granting itself admin is a change of an operator: national.
        let grant = edit(&i, |n| operator(n, "kita-ops").roles.push(OperatorRole::Admin));
        assert_eq!(refused(kita, &i, &grant), ["operator `kita-ops` is a national object: changing it needs an admin"]);
        // Viewers and auditors change nothing, not even a city's site.
        for actor in ["operator:minami-view", "operator:audit", "operator:stranger"] {
            assert_eq!(refused(actor, &i, &own_site).len(), 1, "{actor}");
        }
        // Admins and the plain-text loopback change anything.
        for actor in ["operator:admin", "local"] {
            assert!(refused(actor, &i, &settings).is_empty() && refused(actor, &i, &grant).is_empty());
        }
    }

    #[test]
    fn national_changes_need_a_second_operator_once_operators_are_bound() {
        let i = intent();
        let own_site = edit(&i, |n| site(n, "kita-hall").description = "x".into());
        assert!(!needs_approval(&i, &own_site));
        for national in [
            edit(&i, |n| n.settings.probe.interval_ms = 20),
            edit(&i, |n| segment(n, "lgwan").description = "x".into()),
            edit(&i, |n| site(n, "ap-west").description = "x".into()),
            edit(&i, |n| operator(n, "audit").roles.push(OperatorRole::Viewer)),
        ] {
            assert!(needs_approval(&i, &national));
        }
        let open = edit(&i, |n| n.operators.clear());
        let settings = edit(&open, |n| n.settings.probe.interval_ms = 20);
        assert!(!needs_approval(&open, &settings), "before any binding nobody approves");
    }

    #[test]
    fn a_policy_between_tenants_and_a_national_tenants_site_are_national() {
        let i = intent();
        assert_eq!(scope(&i, Kind::Policy, "kita-files"), Scope::Tenant("city-kita".into()));
        let across = edit(&i, |n| policy(n, "kita-files").to = "lgwan".into());
        assert_eq!(scope(&across, Kind::Policy, "kita-files"), Scope::National);
        assert_eq!(scope(&i, Kind::Site, "ap-east"), Scope::National);
        let national = edit(&i, |n| tenant(n, "city-kita").national = true);
        assert_eq!(scope(&national, Kind::Site, "kita-hall"), Scope::National);
    }

    #[test]
    fn reading_follows_the_tenants() {
        let i = intent();
        let viewer = rights(&i, "operator:minami-view");
        assert!(viewer.may_read(&i, Kind::Site, "minami-hall"));
        assert!(!viewer.may_read(&i, Kind::Site, "kita-hall"));
        assert!(!viewer.may_read(&i, Kind::Site, "ap-east"));
        assert!(viewer.may_read(&i, Kind::Segment, "lgwan"), "shared with it");
        assert!(!viewer.may_read(&i, Kind::Segment, "kita-lan"));
        assert!(viewer.may_read(&i, Kind::Operator, "minami-view") && !viewer.may_read(&i, Kind::Operator, "root"));
        assert!(!viewer.reads_everything() && !viewer.may_manage_site(&i, "minami-hall"));
        let kita = rights(&i, "operator:kita-ops");
        assert!(kita.may_manage_site(&i, "kita-hall") && !kita.may_manage_site(&i, "minami-hall"));
        assert!(!kita.may_manage_site(&i, "ap-east"));
        let audit = rights(&i, "operator:audit");
        assert!(audit.reads_everything() && !audit.may_change(&Scope::Tenant("city-kita".into())));
        let stranger = rights(&i, "operator:nobody");
        assert!(!stranger.is_bound() && !stranger.may_read(&i, Kind::Settings, "settings"));
        // Before any binding, every certificate is an admin.
        let open = edit(&i, |n| n.operators.clear());
        assert!(rights(&open, "operator:nobody").admin);
    }
}
