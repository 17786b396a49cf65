//! What the agent lets in from the watch. Every resource is validated as calicoctl validates
//! it before it is written; one that fails (written around calicoctl, or by an older or newer
//! writer) must never widen what the dataplane allows:
//!
//! * a policy-like resource with a valid version seen before keeps that version in force, also
//!   across a resync snapshot;
//! * a policy with no valid version yet goes in as it is: whatever in it the dataplane cannot
//!   enforce (a rule selector that does not parse, say) makes the endpoints it selects drop that
//!   direction, as any compile error does — leaving it out could drop a Deny;
//! * anything else invalid is left out until fixed.

use std::collections::{BTreeMap, BTreeSet};

use calico_model::{validate, Kind, Resource};

/// A resource's identity.
pub type ResourceKey = (Kind, Option<String>, String);

pub fn key_of(resource: &Resource) -> ResourceKey {
    let meta = resource.metadata();
    (resource.kind(), meta.namespace.clone(), meta.name.clone())
}

/// Kinds whose last valid version is kept: those whose absence could allow more.
fn keeps_last_valid(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::NetworkPolicy
            | Kind::GlobalNetworkPolicy
            | Kind::Profile
            | Kind::Tier
            | Kind::NetworkSet
            | Kind::GlobalNetworkSet
    )
}

fn is_policy(kind: Kind) -> bool {
    matches!(kind, Kind::NetworkPolicy | Kind::GlobalNetworkPolicy)
}

/// The verdict on one resource.
#[derive(Debug)]
pub enum Admitted<'a> {
    /// Valid: apply it.
    Valid(&'a Resource),
    /// Invalid: apply the last valid version instead.
    LastValid(Box<Resource>, String),
    /// Invalid policy without a valid version: apply it; the compiler refuses what it cannot
    /// enforce.
    Unvalidated(&'a Resource, String),
    /// Invalid: leave it out.
    Refused(String),
}

#[derive(Debug, Default)]
pub struct Admission {
    /// As JSON: a policy of thousands of rules is a fraction of its in-memory size that way,
    /// and it is only read back when a later version is refused.
    last_valid: BTreeMap<ResourceKey, Vec<u8>>,
}

impl Admission {
    pub fn admit<'a>(&mut self, resource: &'a Resource) -> Admitted<'a> {
        let key = key_of(resource);
        match validate(resource) {
            Ok(()) => {
                if keeps_last_valid(key.0) {
                    match serde_json::to_vec(resource) {
                        Ok(json) => {
                            self.last_valid.insert(key, json);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot keep a valid version"),
                    }
                }
                Admitted::Valid(resource)
            }
            Err(errors) => {
                let why = errors.to_string();
                let last = self.last_valid.get(&key).and_then(|json| {
                    Resource::deserialize_as(key.0, &mut serde_json::Deserializer::from_slice(json))
                        .ok()
                });
                if let Some(last) = last {
                    Admitted::LastValid(Box::new(last), why)
                } else if is_policy(key.0) {
                    Admitted::Unvalidated(resource, why)
                } else {
                    Admitted::Refused(why)
                }
            }
        }
    }

    /// The resource was deleted: no version of it stays.
    pub fn forget(&mut self, key: &ResourceKey) {
        self.last_valid.remove(key);
    }

    /// After a snapshot: what it did not contain is gone.
    pub fn retain(&mut self, present: &BTreeSet<ResourceKey>) {
        self.last_valid.retain(|k, _| present.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calico_model::parse_documents;

    fn resource(yaml: &str) -> Resource {
        parse_documents(yaml).expect("test document").remove(0)
    }

    const VALID: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: all()\n  ingress: [{action: Deny}]\n";
    const INVALID: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  selector: all()\n  ingress: [{action: Allow, source: {selector: 'role == '}}]\n";

    #[test]
    fn an_invalid_policy_keeps_its_last_valid_version() {
        let mut a = Admission::default();
        let (valid, invalid) = (resource(VALID), resource(INVALID));
        assert!(matches!(a.admit(&valid), Admitted::Valid(_)));
        match a.admit(&invalid) {
            Admitted::LastValid(r, why) => {
                assert_eq!(*r, valid);
                assert!(why.contains("selector"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // A snapshot that still holds it keeps the last valid version; a delete forgets it.
        a.retain(&[key_of(&valid)].into());
        assert!(matches!(a.admit(&invalid), Admitted::LastValid(..)));
        a.forget(&key_of(&valid));
        assert!(matches!(a.admit(&invalid), Admitted::Unvalidated(..)));
    }

    #[test]
    fn an_invalid_endpoint_is_left_out() {
        let mut a = Admission::default();
        let bad = resource("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, ipNetworks: ['not an address']}\n");
        assert!(matches!(a.admit(&bad), Admitted::Refused(_)));
    }
}
