//! Calico's validation rules, reporting every problem with the path of the field it concerns.

use std::{fmt, net::IpAddr};

use calico_selector::{Expr, Selector};
use ipnet::IpNet;

use crate::{spec::*, AsNumber, Kind, ObjectMeta, Order, Port, Protocol, Resource, API_VERSION};

/// One problem: the field path (e.g. `spec.ingress[2].source.ports[0]`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

/// Every problem found in one resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Checks `resource` against Calico's rules. Returns every problem found, not just the first.
pub fn validate(resource: &Resource) -> Result<(), ValidationErrors> {
    let mut v = Validator::default();
    let kind = resource.kind();
    let (api_version, kind_field) = resource.type_meta();
    if api_version != API_VERSION {
        v.err(
            "apiVersion",
            format!("must be `{API_VERSION}`, not `{api_version}`"),
        );
    }
    if !kind.is_named(kind_field) {
        v.err("kind", format!("must be `{kind}`, not `{kind_field}`"));
    }
    v.metadata(kind, resource.metadata());
    let name = resource.name();
    match resource {
        Resource::NetworkPolicy(o) => v.network_policy(name, &o.spec),
        Resource::GlobalNetworkPolicy(o) => v.global_network_policy(name, &o.spec),
        Resource::StagedNetworkPolicy(o) => {
            let p = &o.spec.policy;
            let bare = NetworkPolicySpec {
                tier: p.tier.clone(),
                types: p.types.clone(),
                ..Default::default()
            };
            v.staged(o.spec.action(), p == &bare, |v| v.network_policy(name, p));
        }
        Resource::StagedGlobalNetworkPolicy(o) => {
            let p = &o.spec.policy;
            let bare = GlobalNetworkPolicySpec {
                tier: p.tier.clone(),
                types: p.types.clone(),
                ..Default::default()
            };
            v.staged(o.spec.action(), p == &bare, |v| {
                v.global_network_policy(name, p)
            });
        }
        Resource::StagedKubernetesNetworkPolicy(o) => {
            let p = &o.spec.policy;
            v.staged(o.spec.action(), p == &Default::default(), |v| {
                let namespace = resource.namespace().unwrap_or("default");
                if let Err(e) = crate::k8s::network_policy_from_spec(name, namespace, p) {
                    v.err("spec", e.0);
                }
            });
        }
        Resource::Tier(o) => v.tier(name, &o.spec),
        Resource::Profile(o) => v.profile(&o.spec),
        Resource::WorkloadEndpoint(o) => v.workload_endpoint(&o.spec),
        Resource::HostEndpoint(o) => v.host_endpoint(&o.spec),
        Resource::NetworkSet(o) | Resource::GlobalNetworkSet(o) => {
            v.nets("spec.nets", &o.spec.nets, None);
            for key in o.metadata.labels.keys() {
                if key.starts_with("projectcalico.org/") {
                    v.err(
                        format!("metadata.labels.{key}"),
                        "the projectcalico.org/ prefix is reserved for labels Calico sets",
                    );
                }
            }
        }
        Resource::Node(o) => v.node(&o.spec),
        Resource::IPPool(o) => v.ip_pool(&o.spec),
        Resource::IPReservation(o) => v.nets("spec.reservedCIDRs", &o.spec.reserved_cidrs, None),
        Resource::BGPConfiguration(o) => v.bgp_configuration(name, &o.spec),
        Resource::BGPPeer(o) => v.bgp_peer(&o.spec),
        Resource::BGPFilter(o) => v.bgp_filter(&o.spec),
        Resource::QoSPolicy(o) => v.qos_policy(&o.spec),
        Resource::FelixConfiguration(o) => v.felix_configuration(name, &o.spec),
        Resource::ClusterInformation(_) => v.singleton_name(name),
        Resource::KubeControllersConfiguration(o) => {
            v.singleton_name(name);
            v.kube_controllers_configuration(&o.spec);
        }
        Resource::IPAMBlock(o) => {
            v.cidr("spec.cidr", &o.spec.cidr);
        }
        Resource::BlockAffinity(o) => v.block_affinity(&o.spec),
        Resource::IPAMHandle(o) => {
            if o.spec.handle_id.is_empty() {
                v.err("spec.handleID", "required");
            }
        }
        Resource::IPAMConfig(_) => v.singleton_name(name),
    }
    if v.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(v.errors))
    }
}

/// The fields both policy kinds have, borrowed for [`Validator::policy_common`].
struct PolicyFields<'a> {
    tier: &'a Option<String>,
    order: Option<Order>,
    selector: &'a Option<String>,
    service_account_selector: &'a Option<String>,
    types: &'a [PolicyType],
    hints: &'a [String],
    ingress: &'a [Rule],
    egress: &'a [Rule],
    /// A GlobalNetworkPolicy (services are then named with their namespace).
    global: bool,
}

#[derive(Default)]
struct Validator {
    errors: Vec<ValidationError>,
}

/// Upstream's built-in tiers and the order each must have.
const BUILT_IN_TIER_ORDERS: &[(&str, f64)] = &[
    (DEFAULT_TIER, 1_000_000.0),
    ("adminnetworkpolicy", 1_000.0),
    ("baselineadminnetworkpolicy", 10_000_000.0),
];

const LOG_SEVERITIES: &[&str] = &["Trace", "Debug", "Info", "Warning", "Error", "Fatal"];

impl Validator {
    /// A staged policy: a deletion names the policy and nothing else (`bare`: nothing but the
    /// tier and types, which upstream clears), as upstream requires; any other action is
    /// validated as the policy it would enforce.
    fn staged(&mut self, action: StagedAction, bare: bool, as_enforced: impl FnOnce(&mut Self)) {
        if action != StagedAction::Delete {
            as_enforced(self);
        } else if !bare {
            self.err(
                "spec",
                "fields other than tier must be empty when stagedAction is Delete",
            );
        }
    }

    fn err(&mut self, path: impl fmt::Display, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    // ---- metadata -------------------------------------------------------------------------

    fn metadata(&mut self, kind: Kind, meta: &ObjectMeta) {
        if meta.name.is_empty() {
            self.err("metadata.name", "required");
        } else if kind == Kind::Tier {
            if let Err(why) = dns_label(&meta.name) {
                self.err("metadata.name", format!("`{}` {why}", meta.name));
            }
        } else if let Err(why) = resource_name(&meta.name) {
            self.err("metadata.name", format!("`{}` {why}", meta.name));
        }
        match (&meta.namespace, kind.is_namespaced()) {
            (Some(ns), true) => {
                if let Err(why) = dns_label(ns) {
                    self.err("metadata.namespace", format!("`{ns}` {why}"));
                }
            }
            (None, true) => self.err(
                "metadata.namespace",
                format!("required: {kind} is namespaced"),
            ),
            (Some(ns), false) if !ns.is_empty() => self.err(
                "metadata.namespace",
                format!("must not be set: {kind} is not namespaced (got `{ns}`)"),
            ),
            _ => {}
        }
        self.labels("metadata.labels", &meta.labels);
        self.annotations("metadata.annotations", &meta.annotations);
    }

    /// Annotation keys are qualified names compared in lower case (upstream accepts
    /// `Example.COM/key`), and all of them together hold at most 256 KiB, as upstream's.
    fn annotations(
        &mut self,
        path: &str,
        annotations: &std::collections::BTreeMap<String, String>,
    ) {
        const LIMIT: usize = 256 * 1024;
        for key in annotations.keys() {
            if let Err(why) = qualified_name(&key.to_lowercase()) {
                self.err(format!("{path}.{key}"), format!("key {why}"));
            }
        }
        let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > LIMIT {
            self.err(
                path,
                format!(
                    "total size of annotations is too large by {} bytes (the limit is {LIMIT})",
                    total - LIMIT
                ),
            );
        }
    }

    fn labels(&mut self, path: &str, labels: &std::collections::BTreeMap<String, String>) {
        for (key, value) in labels {
            if let Err(why) = qualified_name(key) {
                self.err(format!("{path}.{key}"), format!("label key {why}"));
            }
            if let Err(why) = label_value(value) {
                self.err(
                    format!("{path}.{key}"),
                    format!("label value `{value}` {why}"),
                );
            }
        }
    }

    fn singleton_name(&mut self, name: &str) {
        if !name.is_empty() && name != "default" {
            self.err("metadata.name", format!("must be `default` (got `{name}`)"));
        }
    }

    /// Configuration kinds: `default` for the cluster, `node.<nodename>` for one node.
    fn config_name(&mut self, name: &str) -> bool {
        if name == "default" {
            return true;
        }
        if !name.starts_with("node.") {
            self.err(
                "metadata.name",
                format!("must be `default` or `node.<nodename>` (got `{name}`)"),
            );
        }
        false
    }

    // ---- selectors, nets, ports -----------------------------------------------------------

    /// Parses a selector; `global()` is only allowed where `allow_global`.
    fn selector(&mut self, path: &str, text: &Option<String>, allow_global: bool) {
        let Some(text) = text else { return };
        match Selector::parse(text) {
            Ok(s) if !allow_global && contains_global(s.expr()) => self.err(
                path,
                "global() can only be used in an EntityRule namespaceSelector",
            ),
            Ok(s) if contains_global(s.expr()) && *s.expr() != Expr::Global => {
                self.err(path, "global() cannot be combined with other selectors")
            }
            Ok(_) => {}
            Err(e) => self.err(path, format!("invalid selector `{text}`: {e}")),
        }
    }

    /// A CIDR (a bare address counts as a host prefix). Returns it when valid.
    fn cidr(&mut self, path: &str, text: &str) -> Option<IpNet> {
        if text.is_empty() {
            self.err(path, "required");
            return None;
        }
        match parse_net(text) {
            Some(net) => Some(net),
            None => {
                self.err(path, format!("`{text}` is not a valid CIDR"));
                None
            }
        }
    }

    fn nets(&mut self, path: &str, nets: &[String], ip_version: Option<i64>) {
        for (i, text) in nets.iter().enumerate() {
            let item = format!("{path}[{i}]");
            if let Some(net) = self.cidr(&item, text) {
                let version = if net.addr().is_ipv4() { 4 } else { 6 };
                if let Some(want) = ip_version.filter(|w| *w != version) {
                    self.err(
                        item,
                        format!("{text} is IPv{version} but the rule has ipVersion {want}"),
                    );
                }
            }
        }
    }

    fn ip(&mut self, path: &str, text: &str) -> Option<IpAddr> {
        match text.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(path, format!("`{text}` is not a valid IP address"));
                None
            }
        }
    }

    fn ports(&mut self, path: &str, ports: &[Port]) {
        for (i, port) in ports.iter().enumerate() {
            let item = format!("{path}[{i}]");
            match port {
                Port::Number(n) if !(1..=65535).contains(n) => {
                    self.err(item, format!("port {n} is out of range 1-65535"))
                }
                Port::Range(a, b) if !(1..=65535).contains(a) || !(1..=65535).contains(b) => {
                    self.err(item, format!("port range {a}:{b} is out of range 1-65535"))
                }
                Port::Range(a, b) if a > b => {
                    self.err(item, format!("port range {a}:{b} is reversed"))
                }
                Port::Named(name) if port_name(name).is_err() => self.err(
                    item,
                    format!("`{name}` is neither a port, a range `min:max`, nor a valid port name"),
                ),
                _ => {}
            }
        }
    }

    fn port_number(&mut self, path: &str, port: Option<i64>) {
        if let Some(p) = port.filter(|p| !(1..=65535).contains(p)) {
            self.err(path, format!("port {p} is out of range 1-65535"));
        }
    }

    /// A log severity, in any case (as upstream reads them: `info` is `Info`).
    fn severity(&mut self, path: &str, value: &Option<String>) {
        self.one_of_any_case(path, value, LOG_SEVERITIES);
    }

    /// An enum felix reads in any case (upstream's CRD patterns are `(?i)`).
    fn one_of_any_case(&mut self, path: &str, value: &Option<String>, allowed: &[&str]) {
        if let Some(v) = value
            .as_deref()
            .filter(|v| !allowed.iter().any(|s| s.eq_ignore_ascii_case(v)))
        {
            self.err(
                path,
                format!("`{v}` is not one of {} (any case)", allowed.join(", ")),
            );
        }
    }
    fn one_of(&mut self, path: &str, value: &Option<String>, allowed: &[&str]) {
        if let Some(v) = value.as_deref().filter(|v| !allowed.contains(v)) {
            self.err(path, format!("`{v}` is not one of {}", allowed.join(", ")));
        }
    }

    // ---- policy -----------------------------------------------------------------------------

    fn order(&mut self, path: &str, order: Option<Order>) {
        if let Some(Order(o)) = order.filter(|o| !o.0.is_finite()) {
            self.err(path, format!("order {o} is not a finite number"));
        }
    }

    fn tier_prefix(&mut self, name: &str, tier: &Option<String>) {
        let tier = tier.as_deref().unwrap_or(DEFAULT_TIER);
        if let Err(why) = dns_label(tier) {
            self.err("spec.tier", format!("`{tier}` {why}"));
            return;
        }
        let own = name.strip_prefix(&format!("{tier}."));
        if tier != DEFAULT_TIER && own.is_none() {
            self.err(
                "metadata.name",
                format!("a policy in tier `{tier}` must be named `{tier}.<name>` (got `{name}`)"),
            );
            return;
        }
        // As upstream: the name proper is a DNS label, so the tier's is the only dot (a
        // Kubernetes NetworkPolicy's Calico form, `knp.default.<name>`, keeps its own).
        let converted = ["knp.default.", "ossg.default."]
            .iter()
            .any(|p| name.starts_with(p));
        if !converted && own.unwrap_or(name).contains('.') {
            self.err(
                "metadata.name",
                format!(
                    "`{name}`: a policy name is `<tier>.<name>` or `<name>`, with no other dot"
                ),
            );
        }
    }

    fn types(&mut self, types: &[PolicyType]) {
        if types.len() > 2 {
            self.err("spec.types", "at most two types (Ingress, Egress)");
        }
        if types.len() == 2 && types[0] == types[1] {
            self.err("spec.types[1]", format!("{:?} is listed twice", types[1]));
        }
    }

    fn hints(&mut self, hints: &[String]) {
        for (i, h) in hints.iter().enumerate() {
            if h != "AssumeNeededOnEveryNode" {
                self.err(
                    format!("spec.performanceHints[{i}]"),
                    format!("unknown hint `{h}` (known: AssumeNeededOnEveryNode)"),
                );
            }
        }
    }

    /// What NetworkPolicy and GlobalNetworkPolicy share.
    fn policy_common(&mut self, name: &str, p: PolicyFields<'_>) {
        self.tier_prefix(name, p.tier);
        self.order("spec.order", p.order);
        self.selector("spec.selector", p.selector, false);
        self.selector(
            "spec.serviceAccountSelector",
            p.service_account_selector,
            false,
        );
        self.types(p.types);
        self.hints(p.hints);
        self.rules("spec.ingress", p.ingress);
        self.rules("spec.egress", p.egress);
        self.services_placement("spec", p.ingress, p.egress, p.global);
    }

    fn network_policy(&mut self, name: &str, spec: &NetworkPolicySpec) {
        self.policy_common(
            name,
            PolicyFields {
                tier: &spec.tier,
                order: spec.order,
                selector: &spec.selector,
                service_account_selector: &spec.service_account_selector,
                types: &spec.types,
                hints: &spec.performance_hints,
                ingress: &spec.ingress,
                egress: &spec.egress,
                global: false,
            },
        );
    }

    fn global_network_policy(&mut self, name: &str, spec: &GlobalNetworkPolicySpec) {
        self.policy_common(
            name,
            PolicyFields {
                tier: &spec.tier,
                order: spec.order,
                selector: &spec.selector,
                service_account_selector: &spec.service_account_selector,
                types: &spec.types,
                hints: &spec.performance_hints,
                ingress: &spec.ingress,
                egress: &spec.egress,
                global: true,
            },
        );
        self.selector("spec.namespaceSelector", &spec.namespace_selector, false);
        let (pre_dnat, untracked) = (spec.pre_dnat == Some(true), spec.do_not_track == Some(true));
        if pre_dnat && untracked {
            self.err("spec.preDNAT", "preDNAT and doNotTrack cannot both be true");
        }
        if pre_dnat && !spec.egress.is_empty() {
            self.err("spec.egress", "a preDNAT policy cannot have egress rules");
        }
        if pre_dnat && spec.types.contains(&PolicyType::Egress) {
            self.err("spec.types", "a preDNAT policy cannot have type Egress");
        }
        if (pre_dnat || untracked) && spec.apply_on_forward != Some(true) {
            self.err(
                "spec.applyOnForward",
                "must be true when preDNAT or doNotTrack is true",
            );
        }
    }

    fn tier(&mut self, name: &str, spec: &TierSpec) {
        self.order("spec.order", spec.order);
        if name == DEFAULT_TIER && spec.default_action == Some(TierDefaultAction::Pass) {
            self.err(
                "spec.defaultAction",
                "the default tier's default action must be Deny",
            );
        }
        // Upstream's built-in tiers keep their place in the order.
        if let Some((_, fixed)) = BUILT_IN_TIER_ORDERS.iter().find(|(tier, _)| *tier == name) {
            if spec.order.map(|o| o.0) != Some(*fixed) {
                self.err(
                    "spec.order",
                    format!("the {name} tier's order must be {fixed}"),
                );
            }
        }
    }

    fn profile(&mut self, spec: &ProfileSpec) {
        self.rules("spec.ingress", &spec.ingress);
        self.rules("spec.egress", &spec.egress);
        self.labels("spec.labelsToApply", &spec.labels_to_apply);
    }

    fn rules(&mut self, path: &str, rules: &[Rule]) {
        for (i, rule) in rules.iter().enumerate() {
            self.rule(&format!("{path}[{i}]"), rule);
        }
    }

    fn rule(&mut self, path: &str, rule: &Rule) {
        if let Some(v) = rule.ip_version.filter(|v| *v != 4 && *v != 6) {
            self.err(format!("{path}.ipVersion"), format!("{v} is not 4 or 6"));
        }
        for (field, protocol) in [
            ("protocol", &rule.protocol),
            ("notProtocol", &rule.not_protocol),
        ] {
            let Some(protocol) = protocol else { continue };
            if protocol.number().is_none() {
                self.err(
                    format!("{path}.{field}"),
                    format!(
                        "`{protocol}` is not a protocol: use TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number 1-255"
                    ),
                );
                continue;
            }
            if let Protocol::Name(name) = protocol {
                if !Protocol::NAMES.iter().any(|(known, _)| known == name) {
                    self.err(
                        format!("{path}.{field}"),
                        format!(
                            "protocol name `{name}` is not valid: names are written TCP, UDP, ICMP, ICMPv6, SCTP or UDPLite"
                        ),
                    );
                    continue;
                }
            }
            let number = protocol.number();
            if number == Some(1) && rule.ip_version == Some(6) {
                self.err(
                    format!("{path}.{field}"),
                    "protocol ICMP requires ipVersion 4",
                );
            }
            if number == Some(58) && rule.ip_version == Some(4) {
                self.err(
                    format!("{path}.{field}"),
                    "protocol ICMPv6 requires ipVersion 6",
                );
            }
        }
        for (field, icmp) in [("icmp", &rule.icmp), ("notICMP", &rule.not_icmp)] {
            let Some(icmp) = icmp else { continue };
            let p = format!("{path}.{field}");
            if !rule.protocol.as_ref().is_some_and(Protocol::is_icmp) {
                self.err(&p, "ICMP fields require protocol to be ICMP or ICMPv6");
            }
            if let Some(t) = icmp.icmp_type.filter(|t| !(0..=254).contains(t)) {
                self.err(
                    format!("{p}.type"),
                    format!("ICMP type {t} is out of range 0-254"),
                );
            }
            if let Some(c) = icmp.code {
                if !(0..=255).contains(&c) {
                    self.err(
                        format!("{p}.code"),
                        format!("ICMP code {c} is out of range 0-255"),
                    );
                }
                if icmp.icmp_type.is_none() {
                    self.err(
                        format!("{p}.code"),
                        "ICMP code specified without an ICMP type",
                    );
                }
            }
        }
        if let Some(meta) = &rule.metadata {
            self.annotations(&format!("{path}.metadata.annotations"), &meta.annotations);
        }
        self.entity(&format!("{path}.source"), &rule.source, rule);
        self.entity(&format!("{path}.destination"), &rule.destination, rule);
        let families: std::collections::BTreeSet<bool> = [&rule.source, &rule.destination]
            .into_iter()
            .flat_map(|e| e.nets.iter().chain(&e.not_nets))
            .filter_map(|n| parse_net(n))
            .map(|n| n.addr().is_ipv4())
            .collect();
        if families.len() > 1 {
            self.err(path, "rule contains both IPv4 and IPv6 CIDRs");
        }
        if rule.http.is_some() {
            self.err(
                format!("{path}.http"),
                "HTTP match is not supported: the eBPF dataplane enforces layers 3 and 4 only",
            );
        }
    }

    fn entity(&mut self, path: &str, e: &EntityRule, rule: &Rule) {
        self.nets(&format!("{path}.nets"), &e.nets, rule.ip_version);
        self.nets(&format!("{path}.notNets"), &e.not_nets, rule.ip_version);
        for (i, text) in e.not_nets.iter().enumerate() {
            if parse_net(text).is_some_and(|n| n.prefix_len() == 0) {
                self.err(
                    format!("{path}.notNets[{i}]"),
                    format!("`{text}` excludes every address: the rule could never match"),
                );
            }
        }
        self.selector(&format!("{path}.selector"), &e.selector, false);
        self.selector(&format!("{path}.notSelector"), &e.not_selector, false);
        self.selector(
            &format!("{path}.namespaceSelector"),
            &e.namespace_selector,
            true,
        );
        for (field, ports) in [("ports", &e.ports), ("notPorts", &e.not_ports)] {
            if ports.is_empty() {
                continue;
            }
            let p = format!("{path}.{field}");
            if !rule.protocol.as_ref().is_some_and(Protocol::has_ports) {
                self.err(
                    &p,
                    "ports are only valid with protocol TCP, UDP, SCTP or UDPLite",
                );
            }
            self.ports(&p, ports);
        }
        if let Some(accounts) = &e.service_accounts {
            self.selector(
                &format!("{path}.serviceAccounts.selector"),
                &accounts.selector,
                false,
            );
        }
        if let Some(services) = &e.services {
            let p = format!("{path}.services");
            if services.name.is_empty() {
                self.err(format!("{p}.name"), "services must specify a service name");
            }
            let conflicts = [
                ("selector", e.selector.is_some()),
                ("notSelector", e.not_selector.is_some()),
                ("namespaceSelector", e.namespace_selector.is_some()),
                ("nets", !e.nets.is_empty()),
                ("notNets", !e.not_nets.is_empty()),
                ("serviceAccounts", e.service_accounts.is_some()),
            ];
            for (field, set) in conflicts {
                if set {
                    self.err(
                        &p,
                        format!("cannot be combined with {field} in the same rule"),
                    );
                }
            }
            // A service's ports come from its endpoints.
            for (field, set) in [
                ("ports", !e.ports.is_empty()),
                ("notPorts", !e.not_ports.is_empty()),
            ] {
                if set {
                    self.err(
                        format!("{path}.{field}"),
                        format!("cannot specify {field} with services"),
                    );
                }
            }
        }
    }

    /// Where `services` may appear (upstream's rule): the peer side only, so the source of
    /// an ingress rule and the destination of an egress rule; in a global policy the service
    /// is named with its namespace.
    fn services_placement(&mut self, path: &str, ingress: &[Rule], egress: &[Rule], global: bool) {
        for (direction, rules, peer, local) in [
            ("ingress", ingress, "source", "destination"),
            ("egress", egress, "destination", "source"),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                let (peer_side, local_side) = if direction == "ingress" {
                    (&rule.source, &rule.destination)
                } else {
                    (&rule.destination, &rule.source)
                };
                if local_side.services.is_some() {
                    self.err(
                        format!("{path}.{direction}[{i}].{local}.services"),
                        format!("not allowed in {direction} rule {local}"),
                    );
                }
                if let Some(services) = &peer_side.services {
                    if global && services.namespace.is_empty() {
                        self.err(
                            format!("{path}.{direction}[{i}].{peer}.services.namespace"),
                            "must specify a namespace in a global policy",
                        );
                    }
                }
            }
        }
    }

    // ---- endpoints --------------------------------------------------------------------------

    fn workload_endpoint(&mut self, spec: &WorkloadEndpointSpec) {
        if spec.node.is_empty() {
            self.err("spec.node", "required");
        }
        for (i, net) in spec.ip_networks.iter().enumerate() {
            let path = format!("spec.ipNetworks[{i}]");
            if let Some(n) = self.cidr(&path, net) {
                if n.prefix_len() != n.max_prefix_len() {
                    self.err(
                        path,
                        format!("`{net}`: IP network contains multiple addresses (a workload's addresses are /32 or /128)"),
                    );
                }
            }
        }
        let networks: Vec<IpNet> = spec
            .ip_networks
            .iter()
            .filter_map(|n| parse_net(n))
            .collect();
        for (i, nat) in spec.ip_nats.iter().enumerate() {
            let p = format!("spec.ipNATs[{i}]");
            let internal = self.ip(&format!("{p}.internalIP"), &nat.internal_ip);
            let external = self.ip(&format!("{p}.externalIP"), &nat.external_ip);
            if let (Some(internal), Some(external)) = (internal, external) {
                if internal.is_ipv4() != external.is_ipv4() {
                    self.err(
                        format!("{p}.externalIP"),
                        format!(
                            "`{external}` is not the same IP version as internalIP `{internal}`"
                        ),
                    );
                }
                if !networks.iter().any(|n| n.contains(&internal)) {
                    self.err(
                        format!("{p}.internalIP"),
                        format!("`{internal}` is not one of the endpoint's ipNetworks"),
                    );
                }
            }
        }
        for (field, gw, v4) in [
            ("ipv4Gateway", &spec.ipv4_gateway, true),
            ("ipv6Gateway", &spec.ipv6_gateway, false),
        ] {
            let Some(gw) = gw else { continue };
            let path = format!("spec.{field}");
            if let Some(a) = self.ip(&path, gw) {
                if a.is_ipv4() != v4 {
                    self.err(
                        path,
                        format!("`{gw}` is not an IPv{} address", if v4 { 4 } else { 6 }),
                    );
                }
            }
        }
        if !spec.container_id.is_empty() && !is_container_id(&spec.container_id) {
            self.err(
                "spec.containerID",
                format!("`{}` must be letters, digits and `-`, starting and ending with a letter or digit", spec.container_id),
            );
        }
        if !spec.interface_name.is_empty() {
            if let Err(why) = interface_name(&spec.interface_name) {
                self.err(
                    "spec.interfaceName",
                    format!("`{}` {why}", spec.interface_name),
                );
            } else if !spec
                .interface_name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
            {
                self.err(
                    "spec.interfaceName",
                    format!(
                        "`{}` may hold only letters, digits, `_`, `.` and `-`",
                        spec.interface_name
                    ),
                );
            }
        }
        if let Some(mac) = spec.mac.as_deref().filter(|m| !is_mac(m)) {
            self.err("spec.mac", format!("`{mac}` is not a MAC address"));
        }
        for (i, port) in spec.ports.iter().enumerate() {
            let p = format!("spec.ports[{i}]");
            if port.name.is_empty() && port.host_port.unwrap_or(0) == 0 {
                self.err(format!("{p}.name"), "required unless hostPort is set");
            }
            if !port.name.is_empty() {
                self.endpoint_port(&p, &port.name, &port.protocol, port.port);
            } else if !port.protocol.has_ports() {
                self.err(
                    format!("{p}.protocol"),
                    format!("`{}` has no ports: use TCP, UDP or SCTP", port.protocol),
                );
            }
            self.port_number(&format!("{p}.hostPort"), port.host_port);
        }
        self.nets(
            "spec.allowSpoofedSourcePrefixes",
            &spec.allow_spoofed_source_prefixes,
            None,
        );
        if let Some(controls) = &spec.qos_controls {
            self.qos_controls(controls);
        }
    }

    /// A QoSPolicy as upstream validates it: selectors, at least one egress rule, a DSCP
    /// value or name, nets of the rule's IP version, ports only with a protocol that has them.
    fn qos_policy(&mut self, spec: &QosPolicySpec) {
        self.order("spec.order", spec.order);
        self.selector("spec.selector", &spec.selector, false);
        self.selector("spec.namespaceSelector", &spec.namespace_selector, false);
        if spec.egress.is_empty() {
            self.err("spec.egress", "required: at least one rule");
        }
        for (i, rule) in spec.egress.iter().enumerate() {
            let path = format!("spec.egress[{i}]");
            match &rule.action.dscp {
                Some(dscp) => self.dscp(&format!("{path}.action.dscp"), dscp),
                None => self.err(format!("{path}.action.dscp"), "required"),
            }
            if let Some(v) = rule.ip_version.filter(|v| *v != 4 && *v != 6) {
                self.err(format!("{path}.ipVersion"), format!("{v} is not 4 or 6"));
            }
            if let Some(Protocol::Name(name)) = &rule.protocol {
                if !Protocol::NAMES.iter().any(|(known, _)| known == name) {
                    self.err(format!("{path}.protocol"), format!("protocol name `{name}` is not valid: names are written TCP, UDP, ICMP, ICMPv6, SCTP or UDPLite"));
                }
            }
            self.nets(
                &format!("{path}.destination.nets"),
                &rule.destination.nets,
                rule.ip_version,
            );
            if !rule.destination.ports.is_empty() {
                let p = format!("{path}.destination.ports");
                if !rule.protocol.as_ref().is_some_and(Protocol::has_ports) {
                    self.err(
                        &p,
                        "ports are only valid with protocol TCP, UDP, SCTP or UDPLite",
                    );
                }
                self.ports(&p, &rule.destination.ports);
            }
        }
    }

    /// A DSCP value: 0-63 or one of upstream's names.
    fn dscp(&mut self, path: &str, value: &serde_json::Value) {
        let ok = match value {
            serde_json::Value::Number(n) => n.as_i64().is_some_and(|n| (0..=63).contains(&n)),
            serde_json::Value::String(s) => DSCP_NAMES.contains(&s.as_str()),
            _ => false,
        };
        if !ok {
            self.err(
                path,
                format!("`{value}` is not a DSCP value (0-63, or a name such as EF, AF11, CS1)"),
            );
        }
    }

    /// A workload's `qosControls`: upstream's fields, non-negative integers, a DSCP value.
    fn qos_controls(&mut self, controls: &QosControls) {
        for (field, value) in controls {
            let path = format!("spec.qosControls.{field}");
            if !QOS_CONTROLS_FIELDS.contains(&field.as_str()) {
                self.err(&path, format!("unknown field `{field}`"));
            } else if field == "dscp" {
                self.dscp(&path, value);
            } else if value.as_i64().is_none_or(|n| n < 0) {
                self.err(&path, format!("`{value}` is not a non-negative integer"));
            }
        }
    }

    fn endpoint_port(&mut self, path: &str, name: &str, protocol: &Protocol, port: i64) {
        if let Err(why) = port_name(name) {
            self.err(format!("{path}.name"), format!("`{name}` {why}"));
        }
        if !protocol.has_ports() {
            self.err(
                format!("{path}.protocol"),
                format!("`{protocol}` has no ports: use TCP, UDP or SCTP"),
            );
        }
        self.port_number(&format!("{path}.port"), Some(port));
    }

    fn host_endpoint(&mut self, spec: &HostEndpointSpec) {
        if spec.node.is_empty() {
            self.err("spec.node", "required");
        }
        if spec.interface_name.is_empty() && spec.expected_ips.is_empty() {
            self.err(
                "spec.interfaceName",
                "one of interfaceName or expectedIPs is required",
            );
        }
        if !spec.interface_name.is_empty() && spec.interface_name != "*" {
            if let Err(why) = interface_name(&spec.interface_name) {
                self.err(
                    "spec.interfaceName",
                    format!("`{}` {why}", spec.interface_name),
                );
            }
        }
        for (i, ip) in spec.expected_ips.iter().enumerate() {
            self.ip(&format!("spec.expectedIPs[{i}]"), ip);
        }
        for (i, port) in spec.ports.iter().enumerate() {
            self.endpoint_port(
                &format!("spec.ports[{i}]"),
                &port.name,
                &port.protocol,
                port.port,
            );
        }
    }

    // ---- networking -------------------------------------------------------------------------

    fn node(&mut self, spec: &NodeSpec) {
        if spec
            .bgp
            .as_ref()
            .is_some_and(|b| *b == NodeBgpSpec::default())
        {
            self.err("spec.bgp", "should not be empty (leave it out instead)");
        }
        if let Some(bgp) = &spec.bgp {
            for (field, value, want_v4) in [
                ("spec.bgp.ipv4Address", &bgp.ipv4_address, true),
                ("spec.bgp.ipv6Address", &bgp.ipv6_address, false),
            ] {
                let Some(text) = value else { continue };
                if let Some(net) = self.cidr(field, text) {
                    if net.addr().is_ipv4() != want_v4 {
                        let want = if want_v4 { "an IPv4" } else { "an IPv6" };
                        self.err(field, format!("`{text}` is not {want} address"));
                    }
                }
            }
            self.as_number("spec.bgp.asNumber", bgp.as_number);
            if let Some(id) = &bgp.route_reflector_cluster_id {
                if id.parse::<std::net::Ipv4Addr>().is_err() {
                    self.err(
                        "spec.bgp.routeReflectorClusterID",
                        format!("`{id}` must be in IPv4 address form"),
                    );
                }
            }
        }
        for (i, a) in spec.addresses.iter().enumerate() {
            self.cidr(&format!("spec.addresses[{i}].address"), &a.address);
        }
    }

    fn as_number(&mut self, path: &str, asn: Option<AsNumber>) {
        if asn == Some(AsNumber(0)) {
            self.err(path, "AS number 0 is reserved");
        }
    }

    fn ip_pool(&mut self, spec: &IpPoolSpec) {
        let net = self.cidr("spec.cidr", &spec.cidr);
        let block = spec.block_size_or_default();
        if let Some(net) = net {
            let v4 = net.addr().is_ipv4();
            let range = if v4 { 20..=32 } else { 116..=128 };
            if !range.contains(&block) {
                self.err(
                    "spec.blockSize",
                    format!(
                        "{block} is out of range {}-{} for an IPv{} pool",
                        range.start(),
                        range.end(),
                        if v4 { 4 } else { 6 }
                    ),
                );
            } else if block < i64::from(net.prefix_len()) && !spec.is_disabled() {
                // Only a pool IPAM allocates from must hold a block (upstream's rule).
                self.err(
                    "spec.blockSize",
                    format!(
                        "/{block} blocks do not fit in the /{} pool",
                        net.prefix_len()
                    ),
                );
            }
            // Ranges no workload address may come from.
            let reserved: &[(&str, &str)] = if v4 {
                &[
                    ("169.254.0.0/16", "link-local"),
                    ("127.0.0.0/8", "loopback"),
                    ("224.0.0.0/4", "multicast"),
                ]
            } else {
                &[
                    ("fe80::/10", "link-local"),
                    ("::1/128", "loopback"),
                    ("ff00::/8", "multicast"),
                ]
            };
            for (range, what) in reserved {
                let range: IpNet = range.parse().expect("constant");
                if range.contains(&net.network()) || net.contains(&range.network()) {
                    self.err(
                        "spec.cidr",
                        format!("{net} overlaps the {what} range {range}"),
                    );
                }
            }
            let encapsulated =
                |m: Option<EncapsulationMode>| m.is_some_and(|m| m != EncapsulationMode::Never);
            if !v4 && encapsulated(spec.ipip_mode) {
                self.err("spec.ipipMode", "IPIP is not supported for IPv6 pools");
            }
            if encapsulated(spec.ipip_mode) && encapsulated(spec.vxlan_mode) {
                self.err(
                    "spec.vxlanMode",
                    "ipipMode and vxlanMode cannot both be enabled",
                );
            }
        }
        self.selector("spec.nodeSelector", &spec.node_selector, false);
        self.selector("spec.namespaceSelector", &spec.namespace_selector, false);
        let uses = &spec.allowed_uses;
        let load_balancer = uses.contains(&IpPoolAllowedUse::LoadBalancer);
        if load_balancer && uses.len() > 1 {
            self.err(
                "spec.allowedUses",
                "LoadBalancer cannot be combined with other uses",
            );
        }
        if load_balancer {
            let encapsulated =
                |m: Option<EncapsulationMode>| m.is_some_and(|m| m != EncapsulationMode::Never);
            for (field, mode) in [("ipipMode", spec.ipip_mode), ("vxlanMode", spec.vxlan_mode)] {
                if encapsulated(mode) {
                    self.err(
                        format!("spec.{field}"),
                        "cannot be enabled on a LoadBalancer pool",
                    );
                }
            }
            if spec
                .node_selector
                .as_deref()
                .is_some_and(|s| s.trim() != "all()")
            {
                self.err(
                    "spec.nodeSelector",
                    "a LoadBalancer pool's node selector must be all()",
                );
            }
        }
    }

    fn bgp_configuration(&mut self, name: &str, spec: &BgpConfigurationSpec) {
        let global = self.config_name(name);
        self.upstream_only(
            &spec.upstream_only,
            crate::spec::BGP_CONFIGURATION_UPSTREAM_ONLY_FIELDS,
            "BGPConfiguration",
        );
        self.severity("spec.logSeverityScreen", &spec.log_severity_screen);
        self.port_number("spec.listenPort", spec.listen_port);
        self.as_number("spec.asNumber", spec.as_number);
        if !global {
            if spec.node_to_node_mesh_enabled.is_some() {
                self.err(
                    "spec.nodeToNodeMeshEnabled",
                    "may only be set in the global `default` BGPConfiguration",
                );
            }
            if spec.as_number.is_some() {
                self.err(
                    "spec.asNumber",
                    "may only be set in the global `default` BGPConfiguration",
                );
            }
        }
        for (field, blocks) in [
            ("serviceClusterIPs", &spec.service_cluster_ips),
            ("serviceExternalIPs", &spec.service_external_ips),
            ("serviceLoadBalancerIPs", &spec.service_load_balancer_ips),
        ] {
            for (i, b) in blocks.iter().enumerate() {
                self.cidr(&format!("spec.{field}[{i}].cidr"), &b.cidr);
            }
        }
        if spec.node_to_node_mesh_enabled == Some(false) {
            if spec.node_mesh_max_restart_time.is_some() {
                self.err(
                    "spec.nodeMeshMaxRestartTime",
                    "cannot be set when nodeToNodeMeshEnabled is false",
                );
            }
            if spec.upstream_only.contains_key("nodeMeshPassword") {
                self.err(
                    "spec.nodeMeshPassword",
                    "cannot be set when nodeToNodeMeshEnabled is false",
                );
            }
        }
        if !spec.communities.is_empty() && spec.prefix_advertisements.is_empty() {
            self.err(
                "spec.communities",
                "communities are defined but no prefixAdvertisements use them",
            );
        }
        for (i, c) in spec.communities.iter().enumerate() {
            if !is_community(&c.value) {
                self.err(
                    format!("spec.communities[{i}].value"),
                    format!("`{}` is not a BGP community (aa:nn or aa:nn:mm)", c.value),
                );
            }
        }
        for (i, pa) in spec.prefix_advertisements.iter().enumerate() {
            self.cidr(&format!("spec.prefixAdvertisements[{i}].cidr"), &pa.cidr);
            for (j, c) in pa.communities.iter().enumerate() {
                let known = spec.communities.iter().any(|k| &k.name == c);
                if !known && !is_community(c) {
                    self.err(
                        format!("spec.prefixAdvertisements[{i}].communities[{j}]"),
                        format!("`{c}` is neither a defined community name nor a community value"),
                    );
                }
            }
        }
    }

    fn bgp_filter(&mut self, spec: &BgpFilterSpec) {
        for (list, rules, v6) in [
            ("exportV4", &spec.export_v4, false),
            ("importV4", &spec.import_v4, false),
            ("exportV6", &spec.export_v6, true),
            ("importV6", &spec.import_v6, true),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                let p = format!("spec.{list}[{i}]");
                self.one_of(
                    &format!("{p}.action"),
                    &Some(rule.action.clone()),
                    &["Accept", "Reject"],
                );
                self.one_of(
                    &format!("{p}.matchOperator"),
                    &rule.match_operator,
                    &["Equal", "NotEqual", "In", "NotIn"],
                );
                self.one_of(&format!("{p}.source"), &rule.source, &["RemotePeers"]);
                match (&rule.cidr, &rule.match_operator) {
                    (Some(_), None) => self.err(format!("{p}.matchOperator"), "required with cidr"),
                    (None, Some(_)) => self.err(format!("{p}.cidr"), "required with matchOperator"),
                    _ => {}
                }
                if let Some(net) = rule
                    .cidr
                    .as_deref()
                    .and_then(|c| self.cidr(&format!("{p}.cidr"), c))
                {
                    if net.addr().is_ipv6() != v6 {
                        self.err(
                            format!("{p}.cidr"),
                            format!("`{net}` is not an IPv{} CIDR", if v6 { 6 } else { 4 }),
                        );
                    }
                }
                if let Some(len) = &rule.prefix_length {
                    let most = if v6 { 128 } else { 32 };
                    for (field, value) in [("min", len.min), ("max", len.max)] {
                        if let Some(n) = value.filter(|n| !(0..=most).contains(n)) {
                            self.err(
                                format!("{p}.prefixLength.{field}"),
                                format!("{n} is out of range 0-{most}"),
                            );
                        }
                    }
                    if let (Some(lo), Some(hi)) = (len.min, len.max) {
                        if lo > hi {
                            self.err(
                                format!("{p}.prefixLength"),
                                format!("min {lo} is more than max {hi}"),
                            );
                        }
                    }
                }
            }
        }
    }

    fn bgp_peer(&mut self, spec: &BgpPeerSpec) {
        if spec.node.is_some() && spec.node_selector.is_some() {
            self.err(
                "spec.nodeSelector",
                "node and nodeSelector cannot both be set",
            );
        }
        if spec.peer_ip.is_some() && spec.peer_selector.is_some() {
            self.err(
                "spec.peerSelector",
                "peerIP and peerSelector cannot both be set",
            );
        }
        if spec.as_number.is_some() && spec.peer_selector.is_some() {
            self.err(
                "spec.asNumber",
                "asNumber cannot be set with peerSelector (it comes from the selected nodes)",
            );
        }
        self.upstream_only(
            &spec.upstream_only,
            crate::spec::BGP_PEER_UPSTREAM_ONLY_FIELDS,
            "BGPPeer",
        );
        if let Some(ip) = &spec.peer_ip {
            if parse_peer_ip(ip).is_none() {
                self.err(
                    "spec.peerIP",
                    format!(
                        "`{ip}` is not an IP address (optionally `IPv4:port` or `[IPv6]:port`)"
                    ),
                );
            }
        }
        self.bgp_peer_upstream_rules(spec);
        self.as_number("spec.asNumber", spec.as_number);
        self.selector("spec.nodeSelector", &spec.node_selector, false);
        self.selector("spec.peerSelector", &spec.peer_selector, false);
        self.one_of(
            "spec.sourceAddress",
            &spec.source_address,
            &["UseNodeIP", "None"],
        );
        if let Some(pw) = &spec.password {
            if pw.secret_key_ref.is_some() == pw.file.is_some() {
                self.err(
                    "spec.password",
                    "exactly one of secretKeyRef or file is required",
                );
            }
        }
    }

    /// Upstream's rules for the BGPPeer fields this dataplane stores as written
    /// (`localWorkloadSelector`, `reachableBy`, `nextHopMode`).
    fn bgp_peer_upstream_rules(&mut self, spec: &BgpPeerSpec) {
        let text = |field: &str| {
            spec.upstream_only
                .get(field)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        if let Some(lws) = spec
            .upstream_only
            .get("localWorkloadSelector")
            .filter(|v| v.as_str() != Some(""))
        {
            match lws.as_str() {
                Some(sel) => {
                    self.selector("spec.localWorkloadSelector", &Some(sel.to_owned()), false)
                }
                None => self.err(
                    "spec.localWorkloadSelector",
                    "must be a selector (a string)",
                ),
            }
            if spec.as_number.is_none() {
                self.err(
                    "spec.asNumber",
                    "required when localWorkloadSelector is set",
                );
            }
            if spec.peer_ip.is_some() {
                self.err(
                    "spec.peerIP",
                    "must be empty when localWorkloadSelector is set",
                );
            }
            if spec.peer_selector.is_some() {
                self.err(
                    "spec.peerSelector",
                    "must be empty when localWorkloadSelector is set",
                );
            }
        }
        if let Some(via) = text("reachableBy") {
            match (
                via.parse::<IpAddr>(),
                spec.peer_ip.as_deref().and_then(parse_peer_ip),
            ) {
                (Err(_), _) => {
                    self.err("spec.reachableBy", format!("`{via}` is not an IP address"))
                }
                (Ok(_), None) if spec.peer_ip.is_none() => {
                    self.err("spec.reachableBy", "must be empty when peerIP is empty")
                }
                (Ok(via), Some(peer)) if via.is_ipv4() != peer.is_ipv4() => self.err(
                    "spec.reachableBy",
                    format!("`{via}` and peerIP `{peer}` are different address families"),
                ),
                _ => {}
            }
        }
        let keep_next_hop = spec.upstream_only.get("keepOriginalNextHop")
            == Some(&serde_json::Value::Bool(true))
            || spec.keep_original_next_hop == Some(true);
        if keep_next_hop && spec.upstream_only.contains_key("nextHopMode") {
            self.err(
                "spec.keepOriginalNextHop",
                "is deprecated and must not be true when nextHopMode is set",
            );
        }
    }

    /// Fields kept as written must be upstream's: anything else is a typo.
    fn upstream_only(
        &mut self,
        fields: &std::collections::BTreeMap<String, serde_json::Value>,
        known: &[&str],
        kind: &str,
    ) {
        for field in fields.keys() {
            if !known.contains(&field.as_str()) {
                self.err(
                    format!("spec.{field}"),
                    format!("unknown field `{field}` (not a field of upstream's {kind})"),
                );
            }
        }
    }

    fn felix_configuration(&mut self, name: &str, spec: &FelixConfigurationSpec) {
        self.config_name(name);
        self.upstream_only(
            &spec.upstream_only,
            crate::spec::FELIX_UPSTREAM_ONLY_FIELDS,
            "FelixConfiguration",
        );
        for (field, value) in [
            ("logSeverityScreen", &spec.log_severity_screen),
            ("logSeverityFile", &spec.log_severity_file),
            ("logSeveritySys", &spec.log_severity_sys),
        ] {
            self.severity(&format!("spec.{field}"), value);
        }
        self.one_of_any_case(
            "spec.defaultEndpointToHostAction",
            &spec.default_endpoint_to_host_action,
            &["Drop", "Accept", "Return"],
        );
        self.one_of_any_case(
            "spec.bpfLogLevel",
            &spec.bpf_log_level,
            &["Off", "Info", "Debug"],
        );
        self.one_of_any_case(
            "spec.chainInsertMode",
            &spec.chain_insert_mode,
            &["Insert", "Append"],
        );
        self.one_of_any_case(
            "spec.bpfExternalServiceMode",
            &spec.bpf_external_service_mode,
            &["Tunnel", "DSR"],
        );
        self.felix_formats(spec);
        if let Some(interval) = &spec.flow_logs_flush_interval {
            match parse_go_duration(interval) {
                Ok(d) if !d.is_zero() => {}
                Ok(_) => self.err("spec.flowLogsFlushInterval", "must be more than 0"),
                Err(e) => self.err("spec.flowLogsFlushInterval", e),
            }
        }
        if let Some(dir) = &spec.flow_logs_file_directory {
            if !dir.starts_with('/') {
                self.err(
                    "spec.flowLogsFileDirectory",
                    format!("`{dir}` is not an absolute path"),
                );
            }
        }
        for (field, port) in [
            ("healthPort", spec.health_port),
            ("prometheusMetricsPort", spec.prometheus_metrics_port),
            ("vxlanPort", spec.vxlan_port),
            ("wireguardListeningPort", spec.wireguard_listening_port),
        ] {
            self.port_number(&format!("spec.{field}"), port);
        }
        if let Some(vni) = spec.vxlan_vni.filter(|v| !(1..=16_777_215).contains(v)) {
            self.err("spec.vxlanVNI", format!("{vni} is out of range 1-16777215"));
        }
        for (field, list) in [
            (
                "failsafeInboundHostPorts",
                &spec.failsafe_inbound_host_ports,
            ),
            (
                "failsafeOutboundHostPorts",
                &spec.failsafe_outbound_host_ports,
            ),
        ] {
            for (i, pp) in list.iter().flatten().enumerate() {
                let p = format!("spec.{field}[{i}]");
                if !["TCP", "UDP", "SCTP"].contains(&pp.protocol.as_str()) {
                    self.err(
                        format!("{p}.protocol"),
                        format!("`{}` is not TCP, UDP or SCTP", pp.protocol),
                    );
                }
                if !(0..=65535).contains(&pp.port) {
                    self.err(
                        format!("{p}.port"),
                        format!("port {} is out of range 0-65535", pp.port),
                    );
                }
                if let Some(net) = &pp.net {
                    self.cidr(&format!("{p}.net"), net);
                }
            }
        }
    }

    /// The formats upstream checks in FelixConfiguration values: addresses of one family,
    /// hosts, interface patterns (regular expressions), route table ranges, enums of the
    /// fields kept as written.
    fn felix_formats(&mut self, spec: &FelixConfigurationSpec) {
        let extra = |field: &str| spec.upstream_only.get(field);
        let extra_text = |field: &str| extra(field).and_then(|v| v.as_str()).map(str::to_owned);
        for (field, value, v4) in [
            (
                "natOutgoingAddress",
                spec.nat_outgoing_address.clone(),
                true,
            ),
            (
                "deviceRouteSourceAddress",
                spec.device_route_source_address.clone(),
                true,
            ),
            (
                "deviceRouteSourceAddressIPv6",
                extra_text("deviceRouteSourceAddressIPv6"),
                false,
            ),
        ] {
            let Some(value) = value.filter(|v| !v.is_empty()) else {
                continue;
            };
            let version = if v4 { 4 } else { 6 };
            if !value.parse::<IpAddr>().is_ok_and(|a| a.is_ipv4() == v4) {
                self.err(
                    format!("spec.{field}"),
                    format!("`{value}` is not a valid IPv{version} address"),
                );
            }
        }
        if let Some(host) = spec
            .prometheus_metrics_host
            .as_deref()
            .filter(|h| !h.is_empty())
        {
            let ok = host.len() <= 64
                && host
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b":._+-".contains(&c));
            if !ok {
                self.err(
                    "spec.prometheusMetricsHost",
                    format!("`{host}` is not a host name or address"),
                );
            }
        }
        for (field, pattern) in [
            ("mtuIfacePattern", spec.mtu_iface_pattern.clone()),
            ("bpfDataIfacePattern", spec.bpf_data_iface_pattern.clone()),
            ("bpfL3IfacePattern", extra_text("bpfL3IfacePattern")),
            ("logDebugFilenameRegex", extra_text("logDebugFilenameRegex")),
        ] {
            if let Some(Err(e)) = pattern.map(|p| regex::Regex::new(&p)) {
                self.err(
                    format!("spec.{field}"),
                    format!("not a regular expression: {e}"),
                );
            }
        }
        if let Some(list) = &spec.interface_exclude {
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let ok = match item.strip_prefix('/').and_then(|i| i.strip_suffix('/')) {
                    Some(pattern) => regex::Regex::new(pattern).is_ok(),
                    None => interface_name(item).is_ok(),
                };
                if !ok {
                    self.err(
                        "spec.interfaceExclude",
                        format!("`{item}` is neither an interface name nor a /regular expression/"),
                    );
                }
            }
        }
        if let Some(kv) = spec.feature_detect_override.as_deref() {
            for item in kv.split(',').filter(|i| !i.is_empty()) {
                let key = item.split_once('=').map(|(k, _)| k.trim());
                if !key.is_some_and(|k| {
                    !k.is_empty() && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                }) {
                    self.err(
                        "spec.featureDetectOverride",
                        format!("`{item}` is not key=value"),
                    );
                }
            }
        }
        if let Some(region) = extra_text("openstackRegion").filter(|r| !r.is_empty()) {
            // It becomes part of a namespace name, `openstack-region-<region>`.
            if region.len() > 63 - "openstack-region-".len() {
                self.err("spec.openstackRegion", "is too long");
            } else if let Err(why) = dns_label(&region) {
                self.err("spec.openstackRegion", format!("`{region}` {why}"));
            }
        }
        for (field, allowed) in [
            ("iptablesBackend", &["Legacy", "NFT", "Auto"][..]),
            ("iptablesFilterAllowAction", &["Accept", "Return"]),
            ("iptablesMangleAllowAction", &["Accept", "Return"]),
            ("iptablesFilterDenyAction", &["Drop", "Reject"]),
            ("nftablesFilterAllowAction", &["Accept", "Return"]),
            ("nftablesMangleAllowAction", &["Accept", "Return"]),
            ("nftablesFilterDenyAction", &["Drop", "Reject"]),
            (
                "bpfConnectTimeLoadBalancing",
                &["Disabled", "Enabled", "TCP"],
            ),
            ("bpfHostNetworkedNATWithoutCTLB", &["Disabled", "Enabled"]),
            ("routeSource", &["WorkloadIPs", "CalicoIPAM"]),
            (
                "natOutgoingExclusions",
                &["IPPoolsOnly", "IPPoolsAndHostIPs"],
            ),
        ] {
            if let Some(v) = extra(field) {
                match v.as_str() {
                    Some(text) => self.one_of_any_case(
                        &format!("spec.{field}"),
                        &Some(text.to_owned()),
                        allowed,
                    ),
                    None => self.err(
                        format!("spec.{field}"),
                        format!("must be one of {}", allowed.join(", ")),
                    ),
                }
            }
        }
        if extra("routeTableRange").is_some() && extra("routeTableRanges").is_some() {
            self.err(
                "spec.routeTableRange",
                "cannot be set when routeTableRanges is also set",
            );
        }
        let range = |v: &serde_json::Value| {
            (
                v.get("min").and_then(|m| m.as_i64()),
                v.get("max").and_then(|m| m.as_i64()),
            )
        };
        if let Some(r) = extra("routeTableRange") {
            match range(r) {
                (Some(min), Some(max)) if min >= 1 && max >= min && max <= 250 => {}
                _ => self.err(
                    "spec.routeTableRange",
                    "must be a range of route table indices within 1..250",
                ),
            }
        }
        if let Some(ranges) = extra("routeTableRanges") {
            let mut tables = 0i64;
            for (i, r) in ranges.as_array().into_iter().flatten().enumerate() {
                let p = format!("spec.routeTableRanges[{i}]");
                match range(r) {
                    (Some(min), Some(max))
                        if min >= 1 && max >= min && max <= i64::from(u32::MAX) =>
                    {
                        tables += max - min + 1;
                    }
                    (Some(min), Some(max)) if min > max => {
                        self.err(p, "min cannot be greater than max")
                    }
                    (Some(min), _) if min < 1 => self.err(p, "cannot target indices below 1"),
                    (Some(_), Some(_)) => self.err(p, "max index too high"),
                    _ => self.err(p, "needs min and max"),
                }
            }
            if tables > 0xffff {
                self.err(
                    "spec.routeTableRanges",
                    "targets too many tables (at most 65535)",
                );
            }
        }
        if let Some(ranges) = extra("kubeNodePortRanges").and_then(|v| v.as_array()) {
            if ranges.len() > 7 {
                self.err(
                    "spec.kubeNodePortRanges",
                    "node port ranges list is too long (max 7)",
                );
            }
            for (i, r) in ranges.iter().enumerate() {
                let named = r
                    .as_str()
                    .is_some_and(|s| s.parse::<i64>().is_err() && !s.contains(':'));
                if named {
                    self.err(
                        format!("spec.kubeNodePortRanges[{i}]"),
                        "must be a port or a range, not a named port",
                    );
                }
            }
        }
    }

    /// KubeControllersConfiguration: the known controller sections and their fields, with
    /// upstream's formats (durations, Enabled/Disabled), each named by its path.
    fn kube_controllers_configuration(&mut self, spec: &KubeControllersConfigurationSpec) {
        self.severity("spec.logSeverityScreen", &spec.log_severity_screen);
        self.one_of(
            "spec.healthChecks",
            &spec.health_checks,
            &["Enabled", "Disabled"],
        );
        if let Some(period) = &spec.etcd_v3_compaction_period {
            if let Err(e) = parse_go_duration(period) {
                self.err("spec.etcdV3CompactionPeriod", e);
            }
        }
        self.port_number_or_zero("spec.prometheusMetricsPort", spec.prometheus_metrics_port);
        self.port_number_or_zero("spec.debugProfilePort", spec.debug_profile_port);
        const SECTIONS: &[(&str, &[&str])] = &[
            (
                "node",
                &[
                    "reconcilerPeriod",
                    "syncLabels",
                    "hostEndpoint",
                    "leakGracePeriod",
                ],
            ),
            ("policy", &["reconcilerPeriod"]),
            ("workloadEndpoint", &["reconcilerPeriod"]),
            ("serviceAccount", &["reconcilerPeriod"]),
            ("namespace", &["reconcilerPeriod"]),
            ("loadBalancer", &["assignIPs"]),
        ];
        for (section, value) in &spec.controllers {
            let path = format!("spec.controllers.{section}");
            let Some((_, fields)) = SECTIONS.iter().find(|(s, _)| s == section) else {
                self.err(
                    &path,
                    format!(
                        "unknown controller `{section}` (known: {})",
                        SECTIONS
                            .iter()
                            .map(|(s, _)| *s)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            };
            let Some(object) = value.as_object() else {
                if !value.is_null() {
                    self.err(&path, "must be an object");
                }
                continue;
            };
            for (field, v) in object {
                let p = format!("{path}.{field}");
                if !fields.contains(&field.as_str()) {
                    self.err(&p, format!("unknown field `{field}`"));
                    continue;
                }
                let text = v.as_str().map(str::to_owned);
                match field.as_str() {
                    "reconcilerPeriod" | "leakGracePeriod" => match &text {
                        Some(t) => {
                            if let Err(e) = parse_go_duration(t) {
                                self.err(&p, e);
                            }
                        }
                        None => self.err(&p, "must be a duration such as 5m"),
                    },
                    "syncLabels" => self.one_of(&p, &text, &["Enabled", "Disabled"]),
                    "assignIPs" => {
                        self.one_of(&p, &text, &["AllServices", "RequestedServicesOnly"])
                    }
                    "hostEndpoint" => {
                        let auto = v.get("autoCreate").map(|a| a.as_str().map(str::to_owned));
                        if let Some(auto) = auto {
                            self.one_of(
                                &format!("{p}.autoCreate"),
                                &auto,
                                &["Enabled", "Disabled"],
                            );
                        }
                        for key in v.as_object().into_iter().flatten().map(|(k, _)| k) {
                            if !["autoCreate", "createDefaultHostEndpoint", "templates"]
                                .contains(&key.as_str())
                            {
                                self.err(format!("{p}.{key}"), format!("unknown field `{key}`"));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn port_number_or_zero(&mut self, path: &str, port: Option<i64>) {
        if let Some(p) = port.filter(|p| !(0..=65535).contains(p)) {
            self.err(path, format!("port {p} is out of range 0-65535"));
        }
    }

    fn block_affinity(&mut self, spec: &BlockAffinitySpec) {
        if !["pending", "confirmed", "pendingDeletion"].contains(&spec.state.as_str()) {
            self.err(
                "spec.state",
                format!(
                    "`{}` is not pending, confirmed or pendingDeletion",
                    spec.state
                ),
            );
        }
        if spec.node.is_empty() {
            self.err("spec.node", "required");
        }
        self.cidr("spec.cidr", &spec.cidr);
        if spec.deleted.as_deref() == Some("true") {
            self.err(
                "spec.deleted",
                "cannot be set to true (it is set only by IPAM itself)",
            );
        }
    }
}

fn contains_global(e: &Expr) -> bool {
    match e {
        Expr::Global => true,
        Expr::Not(inner) => contains_global(inner),
        Expr::And(ops) | Expr::Or(ops) => ops.iter().any(contains_global),
        _ => false,
    }
}

/// A CIDR, or a bare address as a host prefix.
pub(crate) fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

fn parse_peer_ip(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    text.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("is longer than 63 characters");
    }
    let b = s.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    if b.is_empty()
        || !b.iter().all(ok_char)
        || !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
    {
        return Err("must be lower-case letters, digits and '-', starting and ending with a letter or digit");
    }
    Ok(())
}

fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() > 253 {
        return Err("is longer than 253 characters");
    }
    for part in s.split('.') {
        if dns_label(part).is_err() {
            return Err("must be lower-case letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit");
        }
    }
    Ok(())
}

/// Upstream's resource name rule: lower-case letters, digits, '-' and '.', starting and ending
/// with a letter or digit, at most 253 characters. Unlike a DNS subdomain, a dot-separated part
/// may be longer than 63 characters (endpoint and handle names carry 64-character container
/// IDs).
fn resource_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 253 {
        return Err("is longer than 253 characters");
    }
    let b = s.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.';
    if b.is_empty()
        || !b.iter().all(ok_char)
        || !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
        || s.contains("..")
    {
        return Err("must be lower-case letters, digits, '-' and '.', starting and ending with a letter or digit");
    }
    Ok(())
}

/// Kubernetes qualified name: `[prefix/]name`, prefix a DNS subdomain, name ≤ 63 of
/// `[A-Za-z0-9_.-]` starting and ending alphanumeric.
fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        dns_subdomain(p).map_err(|why| format!("`{s}`: prefix `{p}` {why}"))?;
    }
    label_value(name).map_err(|why| format!("`{s}`: name part {why}"))?;
    if name.is_empty() {
        return Err(format!("`{s}`: name part is empty"));
    }
    Ok(())
}

fn label_value(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("is longer than 63 characters");
    }
    let b = s.as_bytes();
    if b.is_empty() {
        return Ok(());
    }
    let ok_char = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    if !b.iter().all(ok_char)
        || !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
    {
        return Err(
            "must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
        );
    }
    Ok(())
}

fn port_name(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err("is not a valid port name (1-15 lower-case letters, digits and '-', with a letter)")
    }
}

fn interface_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 15 {
        return Err("is longer than 15 characters (IFNAMSIZ)");
    }
    if s.is_empty() || s.contains(['/', ' ', ':']) || s == "." || s == ".." {
        return Err("is not a valid interface name");
    }
    Ok(())
}

/// Upstream's container ID format: letters, digits and `-`, alphanumeric at both ends.
fn is_container_id(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

fn is_community(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    (parts.len() == 2 || parts.len() == 3) && parts.iter().all(|p| p.parse::<u32>().is_ok())
}

/// IP pools may not overlap: for each pool in `pools` (name, CIDR) that overlaps another of a
/// different name, a message naming both.
pub fn pool_overlaps(pools: &[(String, ipnet::IpNet)]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (a, na)) in pools.iter().enumerate() {
        for (b, nb) in &pools[i + 1..] {
            if a != b && (na.contains(&nb.network()) || nb.contains(&na.network())) {
                out.push(format!("IPPool {a} ({na}) overlaps IPPool {b} ({nb})"));
            }
        }
    }
    out
}

#[cfg(test)]
mod pool_tests {
    #[test]
    fn overlapping_pools_are_named() {
        let p = |n: &str, c: &str| (n.to_owned(), c.parse().unwrap());
        assert!(super::pool_overlaps(&[p("a", "10.0.0.0/16"), p("b", "10.1.0.0/16")]).is_empty());
        let found = super::pool_overlaps(&[p("a", "10.0.0.0/16"), p("b", "10.0.4.0/24")]);
        assert_eq!(
            found,
            ["IPPool a (10.0.0.0/16) overlaps IPPool b (10.0.4.0/24)"]
        );
        // The same pool re-applied is not an overlap.
        assert!(super::pool_overlaps(&[p("a", "10.0.0.0/16"), p("a", "10.0.0.0/16")]).is_empty());
    }
}

/// Fields of `resource` that upstream's API has and this dataplane accepts and stores but does
/// not act on, as field paths (calicoctl warns about them).
pub fn inert_fields(resource: &Resource) -> Vec<String> {
    match resource {
        Resource::FelixConfiguration(o) => spec_fields(&o.spec.upstream_only),
        Resource::BGPConfiguration(o) => spec_fields(&o.spec.upstream_only),
        Resource::BGPPeer(o) => spec_fields(&o.spec.upstream_only),
        // Stored for BGPPeers' `filters`, which the BIRD configuration does not render yet.
        Resource::BGPFilter(_) => vec!["spec".to_owned()],
        // This dataplane judges host endpoint traffic after DNAT and tracks every allowed
        // flow: the host endpoints such a policy selects drop the traffic it would judge
        // (calico-node refuses it there) rather than apply it differently.
        Resource::GlobalNetworkPolicy(o)
            if o.spec.pre_dnat == Some(true) || o.spec.do_not_track == Some(true) =>
        {
            [
                ("spec.preDNAT", o.spec.pre_dnat),
                ("spec.doNotTrack", o.spec.do_not_track),
            ]
            .into_iter()
            .filter(|(_, on)| *on == Some(true))
            .map(|(f, _)| f.to_owned())
            .collect()
        }
        // QoS (DSCP marking, bandwidth and connection limits) is not applied here.
        Resource::QoSPolicy(_) => vec!["spec".to_owned()],
        Resource::WorkloadEndpoint(o) if o.spec.qos_controls.is_some() => {
            vec!["spec.qosControls".to_owned()]
        }
        _ => Vec::new(),
    }
}

fn spec_fields(fields: &std::collections::BTreeMap<String, serde_json::Value>) -> Vec<String> {
    fields.keys().map(|k| format!("spec.{k}")).collect()
}

/// A duration as Go writes it (`15s`, `1m30s`, `500ms`, `1h`): what upstream's duration
/// fields hold.
pub fn parse_go_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("`{text}` is not a duration (such as 15s, 1m30s or 500ms)");
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod duration_tests {
    use super::parse_go_duration;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("15s", Duration::from_secs(15)),
            ("1m30s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1h", Duration::from_secs(3600)),
            ("1.5s", Duration::from_millis(1500)),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "15", "s", "15 s", "1x", "-1s", "1m30"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod upstream_fields_tests {
    use crate::{inert_fields, parse_documents, validate};

    fn check(text: &str) -> Result<Vec<String>, String> {
        let resources = parse_documents(text).map_err(|e| e.to_string())?;
        let r = &resources[0];
        validate(r).map_err(|e| format!("{e:?}"))?;
        Ok(inert_fields(r))
    }

    #[test]
    fn upstream_bgp_fields_and_optional_peer_fields_are_accepted() {
        // Upstream needs neither asNumber with peerIP nor a peer at all (localWorkloadSelector).
        assert_eq!(
            check("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p}\nspec: {peerIP: 192.0.2.1}\n"),
            Ok(vec![])
        );
        assert_eq!(
            check("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p}\nspec: {localWorkloadSelector: \"app == 'lb'\", asNumber: 64512}\n"),
            Ok(vec!["spec.localWorkloadSelector".to_owned()])
        );
        assert_eq!(
            check("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec:\n  nodeMeshPassword: {secretKeyRef: {name: bgp, key: pw}}\n"),
            Ok(vec!["spec.nodeMeshPassword".to_owned()])
        );
        let e = check("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {nodeMeshPasword: x}\n").unwrap_err();
        assert!(e.contains("unknown field `nodeMeshPasword`"), "{e}");
    }

    #[test]
    fn bgp_filters_are_validated_as_upstream() {
        let filter = |rules: &str| {
            check(&format!("apiVersion: projectcalico.org/v3\nkind: BGPFilter\nmetadata: {{name: f}}\nspec:\n{rules}"))
        };
        assert_eq!(
            filter("  exportV4: [{action: Reject, matchOperator: In, cidr: 10.0.0.0/8, prefixLength: {min: 16, max: 24}}]\n  importV6: [{action: Accept, source: RemotePeers}]\n"),
            Ok(vec!["spec".to_owned()])
        );
        for (rules, path, message) in [
            ("  exportV4: [{action: Drop}]\n", "spec.exportV4[0].action", "Accept"),
            ("  exportV4: [{action: Accept, cidr: 10.0.0.0/8}]\n", "spec.exportV4[0].matchOperator", "required with cidr"),
            ("  importV4: [{action: Accept, matchOperator: In, cidr: 'fd00::/8'}]\n", "spec.importV4[0].cidr", "not an IPv4 CIDR"),
            ("  exportV6: [{action: Accept, matchOperator: In, cidr: 'fd00::/8', prefixLength: {min: 64, max: 129}}]\n", "spec.exportV6[0].prefixLength.max", "out of range 0-128"),
            ("  exportV4: [{action: Accept, matchOperator: In, cidr: 10.0.0.0/8, prefixLength: {min: 24, max: 16}}]\n", "spec.exportV4[0].prefixLength", "more than max"),
        ] {
            let e = filter(rules).unwrap_err();
            assert!(e.contains(path) && e.contains(message), "{rules}: {e}");
        }
    }
}
