//! Objects of every kind, and what each kind is called.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::{spec::*, ObjectMeta};

/// The API group and version of every resource here.
pub const API_VERSION: &str = "projectcalico.org/v3";

/// One object: type meta, object meta, spec, and (for the kinds that have one) status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    deny_unknown_fields,
    bound(deserialize = "S: Deserialize<'de> + Default, St: Deserialize<'de>")
)]
pub struct Object<S, St = NoStatus> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<St>,
}

/// The status type of kinds that have none: a `status` field is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NoStatus {}

impl<'de> Deserialize<'de> for NoStatus {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(de::Error::custom("this kind has no `status` field"))
    }
}

macro_rules! kinds {
    ($(
        $variant:ident($spec:ty $(, $status:ty)?): $plural:literal, namespaced = $namespaced:literal,
            aliases = [$($alias:literal),*];
    )*) => {
        /// Every resource kind.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Kind {
            $($variant,)*
        }

        impl Kind {
            /// All kinds, in a stable order.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)*];

            /// The `kind:` value, e.g. `NetworkPolicy`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Kind::$variant => stringify!($variant),)*
                }
            }

            /// Lower-case plural, as in etcd keys and `calicoctl get`, e.g. `networkpolicies`.
            pub fn plural(self) -> &'static str {
                match self {
                    $(Kind::$variant => $plural,)*
                }
            }

            /// Whether objects of this kind live in a namespace.
            pub fn is_namespaced(self) -> bool {
                match self {
                    $(Kind::$variant => $namespaced,)*
                }
            }

            /// Other names calicoctl accepts for the kind (besides kind and plural).
            pub fn aliases(self) -> &'static [&'static str] {
                match self {
                    $(Kind::$variant => &[$($alias),*],)*
                }
            }

            /// The kind with this name, plural or alias (case-insensitive), or the kind whose
            /// list this is (`NetworkPolicyList`).
            pub fn from_name(name: &str) -> Option<Kind> {
                let lower = name.to_ascii_lowercase();
                Kind::ALL.iter().copied().find(|k| {
                    k.as_str().eq_ignore_ascii_case(&lower)
                        || k.plural() == lower
                        || k.aliases().contains(&lower.as_str())
                })
            }

            /// The kind a `<Kind>List` document holds, e.g. `NetworkPolicyList`.
            pub fn from_list_kind(list_kind: &str) -> Option<Kind> {
                let base = list_kind.strip_suffix("List")?;
                Kind::ALL.iter().copied().find(|k| k.as_str() == base)
            }
        }

        /// One object of any kind.
        // Objects are handled one at a time off the packet path; boxing every variant would
        // cost every match an indirection for no gain.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq)]
        pub enum Resource {
            $($variant(Object<$spec $(, $status)?>),)*
        }

        impl Resource {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Resource::$variant(_) => Kind::$variant,)*
                }
            }

            pub fn metadata(&self) -> &ObjectMeta {
                match self {
                    $(Resource::$variant(o) => &o.metadata,)*
                }
            }

            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self {
                    $(Resource::$variant(o) => &mut o.metadata,)*
                }
            }

            /// Reads an object of `kind` from any serde source (the `kind` field must match),
            /// reporting the path of a field that does not fit.
            pub fn deserialize_as<'de, D: Deserializer<'de>>(
                kind: Kind,
                deserializer: D,
            ) -> Result<Resource, serde_path_to_error::Error<D::Error>> {
                Ok(match kind {
                    $(Kind::$variant => {
                        Resource::$variant(serde_path_to_error::deserialize(deserializer)?)
                    })*
                })
            }

            /// The `apiVersion` and `kind` fields as written in the object.
            pub fn type_meta(&self) -> (&str, &str) {
                match self {
                    $(Resource::$variant(o) => (&o.api_version, &o.kind),)*
                }
            }

            /// The spec as a JSON value (for printing selected columns).
            pub fn spec_json(&self) -> serde_json::Value {
                match self {
                    $(Resource::$variant(o) => {
                        serde_json::to_value(&o.spec).unwrap_or(serde_json::Value::Null)
                    })*
                }
            }
        }

        impl Serialize for Resource {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Resource::$variant(o) => o.serialize(s),)*
                }
            }
        }
    };
}

kinds! {
    NetworkPolicy(NetworkPolicySpec): "networkpolicies", namespaced = true,
        aliases = ["networkpolicy", "policy", "policies", "netpol", "netpols", "np", "pol", "pols"];
    GlobalNetworkPolicy(GlobalNetworkPolicySpec): "globalnetworkpolicies", namespaced = false,
        aliases = ["globalnetworkpolicy", "gnp", "gnps", "globalpolicy", "globalpolicies"];
    StagedNetworkPolicy(StagedNetworkPolicySpec): "stagednetworkpolicies", namespaced = true,
        aliases = ["stagednetworkpolicy", "snp", "snps"];
    StagedGlobalNetworkPolicy(StagedGlobalNetworkPolicySpec): "stagedglobalnetworkpolicies",
        namespaced = false, aliases = ["stagedglobalnetworkpolicy", "sgnp", "sgnps"];
    StagedKubernetesNetworkPolicy(StagedKubernetesNetworkPolicySpec):
        "stagedkubernetesnetworkpolicies", namespaced = true,
        aliases = ["stagedkubernetesnetworkpolicy", "sknp", "sknps"];
    Tier(TierSpec): "tiers", namespaced = false, aliases = ["tier"];
    Profile(ProfileSpec): "profiles", namespaced = false, aliases = ["profile", "pro", "pros"];
    WorkloadEndpoint(WorkloadEndpointSpec): "workloadendpoints", namespaced = true,
        aliases = ["workloadendpoint", "wep", "weps"];
    HostEndpoint(HostEndpointSpec): "hostendpoints", namespaced = false,
        aliases = ["hostendpoint", "hep", "heps"];
    NetworkSet(NetworkSetSpec): "networksets", namespaced = true,
        aliases = ["networkset", "netset", "netsets"];
    GlobalNetworkSet(NetworkSetSpec): "globalnetworksets", namespaced = false,
        aliases = ["globalnetworkset"];
    Node(NodeSpec, NodeStatus): "nodes", namespaced = false, aliases = ["node", "no"];
    IPPool(IpPoolSpec): "ippools", namespaced = false,
        aliases = ["ippool", "ipp", "ipps", "pool", "pools"];
    IPReservation(IpReservationSpec): "ipreservations", namespaced = false,
        aliases = ["ipreservation", "ipr", "iprs"];
    BGPConfiguration(BgpConfigurationSpec): "bgpconfigurations", namespaced = false,
        aliases = ["bgpconfiguration", "bgpconfig", "bgpconfigs"];
    BGPPeer(BgpPeerSpec): "bgppeers", namespaced = false,
        aliases = ["bgppeer", "bgpp", "bgpps", "bp", "bps"];
    BGPFilter(BgpFilterSpec): "bgpfilters", namespaced = false, aliases = ["bgpfilter"];
    QoSPolicy(QosPolicySpec): "qospolicies", namespaced = false, aliases = ["qospolicy"];
    FelixConfiguration(FelixConfigurationSpec): "felixconfigurations", namespaced = false,
        aliases = ["felixconfiguration", "felixconfig", "felixconfigs"];
    ClusterInformation(ClusterInformationSpec): "clusterinformations", namespaced = false,
        aliases = ["clusterinformation", "clusterinfo", "clusterinfos"];
    KubeControllersConfiguration(KubeControllersConfigurationSpec, KubeControllersConfigurationStatus):
        "kubecontrollersconfigurations", namespaced = false,
        aliases = ["kubecontrollersconfiguration"];
    IPAMBlock(IpamBlockSpec): "ipamblocks", namespaced = false, aliases = ["ipamblock"];
    BlockAffinity(BlockAffinitySpec): "blockaffinities", namespaced = false,
        aliases = ["blockaffinity"];
    IPAMHandle(IpamHandleSpec): "ipamhandles", namespaced = false, aliases = ["ipamhandle"];
    IPAMConfig(IpamConfigSpec): "ipamconfigs", namespaced = false,
        aliases = ["ipamconfig", "ipamconfiguration"];
}

impl Kind {
    /// Whether a document's `kind:` names this kind: its own name, or `IPAMConfiguration`,
    /// the projectcalico.org/v3 name of what libcalico calls `IPAMConfig` (the same singleton
    /// at the same key; the document keeps its own spelling).
    pub fn is_named(self, name: &str) -> bool {
        name == self.as_str() || (self == Kind::IPAMConfig && name == "IPAMConfiguration")
    }

    /// Kinds whose single meaningful object is named `default` (or `node.<name>` per node for
    /// the configuration kinds).
    pub fn is_singleton(self) -> bool {
        matches!(
            self,
            Kind::ClusterInformation | Kind::KubeControllersConfiguration | Kind::IPAMConfig
        )
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Resource {
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }
}
