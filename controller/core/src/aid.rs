//! Mutual aid's operational state: operators' activations, kept beside the
//! WireGuard keys (they change configurations the way keys do, and one
//! reload of the fan-out sees both), under the reserved name
//! [`ACTIVATIONS`] in place of a site: `…/keys/+aid/<aid>` holds
//! `<until unix ms> <reason>`.

use std::collections::BTreeMap;

/// The entry of [`crate::compile::PublicKeys`] that holds activations
/// (no site name starts with `+`).
pub const ACTIVATIONS: &str = "+aid";

/// An operator's activation of an aid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub until_unix_ms: u64,
    pub reason: String,
}

impl Activation {
    pub fn text(&self) -> String {
        format!("{} {}", self.until_unix_ms, self.reason)
    }

    pub fn parse(text: &str) -> Option<Activation> {
        let (until, reason) = text.split_once(' ').unwrap_or((text, ""));
        Some(Activation { until_unix_ms: until.parse().ok()?, reason: reason.to_string() })
    }

    /// Whether it has expired at `now_unix_ms`.
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        now_unix_ms >= self.until_unix_ms
    }
}

/// Every activation, by aid name.
pub fn activations(keys: &crate::compile::PublicKeys) -> BTreeMap<&str, Activation> {
    keys.get(ACTIVATIONS)
        .into_iter()
        .flatten()
        .filter_map(|(name, text)| Some((name.as_str(), Activation::parse(text)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_activation_reads_back_and_expires_at_its_time() {
        let a = Activation { until_unix_ms: 1_000, reason: "both local access points flooded".into() };
        assert_eq!(Activation::parse(&a.text()), Some(a.clone()));
        assert!(!a.expired(999) && a.expired(1_000));
        assert_eq!(Activation::parse("soon"), None);
        let mut keys = crate::compile::PublicKeys::new();
        keys.entry(ACTIVATIONS.into()).or_default().insert("pref-aid".into(), a.text());
        keys.entry(ACTIVATIONS.into()).or_default().insert("broken".into(), "x".into());
        assert_eq!(activations(&keys).keys().copied().collect::<Vec<_>>(), ["pref-aid"]);
    }
}
