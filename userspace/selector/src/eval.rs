use std::collections::{BTreeMap, HashMap};

use crate::{Expr, Selector};

/// A set of labels a selector is evaluated against.
pub trait Labels {
    /// The value of label `key`, if present.
    fn get(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }
}

impl<S: std::hash::BuildHasher> Labels for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }
}

impl<L: Labels + ?Sized> Labels for &L {
    fn get(&self, key: &str) -> Option<&str> {
        (**self).get(key)
    }
}

/// An endpoint's labels over the labels it inherits from its profiles, as upstream combines
/// them: the endpoint's own value wins, then the first profile (in the endpoint's order) that
/// has the label.
#[derive(Debug, Clone, Copy)]
pub struct InheritedLabels<'a, L> {
    pub own: &'a L,
    pub inherited: &'a [&'a L],
}

impl<L: Labels> Labels for InheritedLabels<'_, L> {
    fn get(&self, key: &str) -> Option<&str> {
        self.own
            .get(key)
            .or_else(|| self.inherited.iter().find_map(|p| p.get(key)))
    }
}

impl Selector {
    /// Whether the selector matches `labels`.
    pub fn matches(&self, labels: &impl Labels) -> bool {
        self.expr.matches(labels)
    }
}

impl Expr {
    /// Whether the expression matches `labels`.
    pub fn matches(&self, labels: &impl Labels) -> bool {
        match self {
            Expr::All | Expr::Global => true,
            Expr::Has(k) => labels.get(k).is_some(),
            Expr::Eq(k, v) => labels.get(k) == Some(v.as_str()),
            Expr::Ne(k, v) => labels.get(k) != Some(v.as_str()),
            Expr::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
            Expr::NotIn(k, set) => !labels.get(k).is_some_and(|v| set.contains(v)),
            Expr::Contains(k, s) => labels.get(k).is_some_and(|v| v.contains(s.as_str())),
            Expr::StartsWith(k, s) => labels.get(k).is_some_and(|v| v.starts_with(s.as_str())),
            Expr::EndsWith(k, s) => labels.get(k).is_some_and(|v| v.ends_with(s.as_str())),
            Expr::Not(e) => !e.matches(labels),
            Expr::And(ops) => ops.iter().all(|e| e.matches(labels)),
            Expr::Or(ops) => ops.iter().any(|e| e.matches(labels)),
        }
    }
}
