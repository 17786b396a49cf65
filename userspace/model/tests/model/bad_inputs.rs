//! Bad inputs, each with the field path its error must name and a fragment of the message.
//! Covers YAML syntax, schema (unknown fields, wrong types, unknown kinds) and Calico's
//! validation rules.

use calico_model::{parse_documents, validate, DocumentError};

/// Field paths and messages of every problem `text` has (empty when it is fine).
fn problems(text: &str) -> Vec<(String, String)> {
    match parse_documents(text) {
        Err(DocumentError::Syntax {
            line,
            column,
            message,
        }) => vec![(format!("{line}:{column}"), message)],
        Err(DocumentError::Schema { path, message, .. }) => vec![(path, message)],
        Ok(resources) => resources
            .iter()
            .filter_map(|r| validate(r).err())
            .flat_map(|errs| errs.0.into_iter().map(|e| (e.path, e.message)))
            .collect(),
    }
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p\nspec:\n{}",
        indent(spec)
    )
}

fn rule(rule: &str) -> String {
    policy(&format!("ingress:\n  - {}", rule.replace('\n', "\n    ")))
}

fn kind(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{}",
        indent(spec)
    )
}

fn wep(spec: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: w, namespace: default}}\nspec:\n  node: n\n{}",
        indent(spec)
    )
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn bad_inputs_name_their_field() {
    let cases: Vec<(String, &str, &str)> = vec![
        // --- syntax and schema
        ("kind: IPPool\n  bad: [".into(), "2:6", ""),
        ("apiVersion: projectcalico.org/v3\nmetadata: {name: x}\n".into(), "kind", "missing"),
        ("kind: IPPool\nmetadata: {name: x}\n".into(), "apiVersion", "missing"),
        ("apiVersion: v1\nkind: IPPool\nmetadata: {name: x}\n".into(), "apiVersion", "not supported"),
        ("apiVersion: projectcalico.org/v3\nkind: Pool\nmetadata: {name: x}\n".into(), "kind", "unknown kind `Pool`"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nnatOutgoin: true"), "spec.natOutgoin", "unknown field `natOutgoin`"),
        (policy("selector: all()\ningres: []"), "spec.ingres", "unknown field `ingres`"),
        ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x, lables: {}}\n".into(), "metadata.lables", "unknown field `lables`"),
        (rule("action: Alow"), "spec.ingress[0].action", "unknown variant `Alow`"),
        (rule("action: Allow\nsource:\n  nets: 10.0.0.0/8"), "spec.ingress[0].source.nets", "invalid type"),
        (rule("action: Allow\nprotocol: TCP\ndestination:\n  ports: [[80]]"), "spec.ingress[0].destination.ports[0]", "a number or a string"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nblockSize: big"), "spec.blockSize", "invalid type"),
        (kind("BGPPeer", "x", "peerIP: 10.0.0.1\nasNumber: -5"), "spec.asNumber", "invalid AS number"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nipipMode: Sometimes"), "spec.ipipMode", "unknown variant `Sometimes`"),
        ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x}\nspec: {cidr: 10.0.0.0/16}\nstatus: {}\n".into(), "status", "has no `status`"),
        // --- metadata
        (kind("IPPool", "''", "cidr: 10.0.0.0/16"), "metadata.name", "required"),
        (kind("IPPool", "Bad_Name", "cidr: 10.0.0.0/16"), "metadata.name", "lower-case"),
        ("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {}\n".into(), "metadata.namespace", "required"),
        ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x, namespace: default}\nspec: {cidr: 10.0.0.0/16}\n".into(), "metadata.namespace", "not namespaced"),
        ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x, labels: {'-bad': v}}\nspec: {cidr: 10.0.0.0/16}\n".into(), "metadata.labels.-bad", "label key"),
        ("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x, labels: {ok: 'bad value'}}\nspec: {cidr: 10.0.0.0/16}\n".into(), "metadata.labels.ok", "label value"),
        (kind("Tier", "sec.urity", "order: 1"), "metadata.name", "lower-case"),
        // --- policy
        (policy("selector: app == web"), "spec.selector", "found label 'web' at offset 7"),
        (policy("selector: global()"), "spec.selector", "global() can only be used"),
        (policy("tier: security\nselector: all()"), "metadata.name", "must be named `security.<name>`"),
        (policy("types: [Ingress, Ingress]"), "spec.types[1]", "listed twice"),
        (policy("preDNAT: true\ndoNotTrack: true\napplyOnForward: true"), "spec.preDNAT", "cannot both be true"),
        (policy("preDNAT: true\napplyOnForward: true\negress: [{action: Allow}]"), "spec.egress", "cannot have egress rules"),
        (policy("doNotTrack: true"), "spec.applyOnForward", "must be true"),
        (policy("performanceHints: [GoFast]"), "spec.performanceHints[0]", "unknown hint"),
        // --- rules
        (policy("ingress:\n  - action: Allow\n  - action: Allow\n  - action: Allow\n    protocol: TCP\n    source:\n      ports: ['90:80']"), "spec.ingress[2].source.ports[0]", "port range 90:80 is reversed"),
        (rule("action: Allow\nprotocol: TCP\ndestination:\n  ports: [70000]"), "spec.ingress[0].destination.ports[0]", "out of range"),
        (rule("action: Allow\nprotocol: TCP\ndestination:\n  ports: ['Not_A_Port']"), "spec.ingress[0].destination.ports[0]", "valid port name"),
        (rule("action: Allow\ndestination:\n  ports: [80]"), "spec.ingress[0].destination.ports", "only valid with protocol TCP"),
        (rule("action: Allow\nprotocol: ICMP\ndestination:\n  notPorts: [80]"), "spec.ingress[0].destination.notPorts", "only valid with protocol"),
        (rule("action: Allow\nprotocol: TCP\nicmp: {type: 8}"), "spec.ingress[0].icmp", "require protocol to be ICMP"),
        (rule("action: Allow\nprotocol: ICMP\nicmp: {code: 0}"), "spec.ingress[0].icmp.code", "without an ICMP type"),
        (rule("action: Allow\nprotocol: ICMP\nicmp: {type: 255}"), "spec.ingress[0].icmp.type", "out of range 0-254"),
        (rule("action: Allow\nprotocol: ICMP\nipVersion: 6"), "spec.ingress[0].protocol", "requires ipVersion 4"),
        (rule("action: Allow\nprotocol: GRE"), "spec.ingress[0].protocol", "is not a protocol"),
        (rule("action: Allow\nnotProtocol: 256"), "spec.ingress[0].notProtocol", "is not a protocol"),
        (rule("action: Allow\nipVersion: 5"), "spec.ingress[0].ipVersion", "not 4 or 6"),
        (rule("action: Allow\nipVersion: 6\nsource:\n  nets: [10.0.0.0/8]"), "spec.ingress[0].source.nets[0]", "is IPv4 but the rule has ipVersion 6"),
        (rule("action: Allow\nsource:\n  nets: [10.0.0.0/33]"), "spec.ingress[0].source.nets[0]", "not a valid CIDR"),
        (rule("action: Allow\ndestination:\n  notNets: [banana]"), "spec.ingress[0].destination.notNets[0]", "not a valid CIDR"),
        (rule("action: Allow\nsource:\n  selector: \"has(a\""), "spec.ingress[0].source.selector", "expected ')'"),
        (rule("action: Allow\nsource:\n  selector: global()"), "spec.ingress[0].source.selector", "global() can only be used"),
        (rule("action: Allow\ndestination:\n  services: {name: dns}\n  selector: all()"), "spec.ingress[0].destination.services", "cannot be combined with selector"),
        (rule("action: Allow\ndestination:\n  services: {namespace: x}"), "spec.ingress[0].destination.services.name", "service name"),
        (rule("action: Allow\nhttp:\n  methods: [GET]"), "spec.ingress[0].http", "not supported"),
        // --- pools, nodes, BGP
        (kind("IPPool", "x", "natOutgoing: true"), "spec.cidr", "required"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nblockSize: 19"), "spec.blockSize", "out of range 20-32"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/28\nblockSize: 24"), "spec.blockSize", "do not fit"),
        (kind("IPPool", "x", "cidr: fd00::/64\nipipMode: Always"), "spec.ipipMode", "not supported for IPv6"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nipipMode: Always\nvxlanMode: Always"), "spec.vxlanMode", "cannot both be enabled"),
        (kind("IPPool", "x", "cidr: 169.254.0.0/24"), "spec.cidr", "link-local"),
        (kind("IPPool", "x", "cidr: 127.0.0.0/24"), "spec.cidr", "overlaps the loopback range 127.0.0.0/8"),
        (kind("IPPool", "x", "cidr: 0.0.0.0/0\nblockSize: 26"), "spec.cidr", "loopback"),
        (kind("IPPool", "x", "cidr: 224.0.0.0/24"), "spec.cidr", "overlaps the multicast range 224.0.0.0/4"),
        (kind("IPPool", "x", "cidr: '::1/128'"), "spec.cidr", "loopback"),
        (kind("IPPool", "x", "cidr: 'ff02::/120'"), "spec.cidr", "multicast"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nnodeSelector: \"rack = 'a'\""), "spec.nodeSelector", "expected '=='"),
        (kind("BGPPeer", "x", "peerIP: not-an-ip\nasNumber: 64512"), "spec.peerIP", "is not an IP address"),
        (kind("BGPPeer", "x", "peerIP: 10.0.0.1\nasNumber: 0"), "spec.asNumber", "reserved"),
        (kind("BGPPeer", "x", "asNumber: 64512\nreachableBy: 10.0.0.1\nreachableByz: x"), "spec.reachableByz", "unknown field `reachableByz`"),
        (kind("BGPPeer", "x", "node: a\nnodeSelector: all()\npeerIP: 10.0.0.1\nasNumber: 1"), "spec.nodeSelector", "cannot both be set"),
        (kind("BGPPeer", "x", "peerSelector: all()\npassword: {}"), "spec.password", "exactly one"),
        (kind("BGPConfiguration", "node.n1", "nodeToNodeMeshEnabled: false"), "spec.nodeToNodeMeshEnabled", "only be set in the global"),
        (kind("BGPConfiguration", "default", "logSeverityScreen: Loud"), "spec.logSeverityScreen", "not one of"),
        (kind("BGPConfiguration", "default", "listenPort: 0"), "spec.listenPort", "out of range"),
        (kind("BGPConfiguration", "default", "communities: [{name: c, value: '1:2:3:4'}]"), "spec.communities[0].value", "not a BGP community"),
        (kind("BGPConfiguration", "mine", "{}"), "metadata.name", "`default` or `node.<nodename>`"),
        (kind("Node", "n1", "bgp: {ipv4Address: 'fd00::1/64'}"), "spec.bgp.ipv4Address", "not an IPv4"),
        (kind("Node", "n1", "bgp: {routeReflectorClusterID: abc}"), "spec.bgp.routeReflectorClusterID", "IPv4 address form"),
        // --- endpoints and config
        ("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, ipNetworks: [10.0.0.1/40]}\n".into(), "spec.ipNetworks[0]", "not a valid CIDR"),
        ("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, interfaceName: averyveryverylongname}\n".into(), "spec.interfaceName", "longer than 15"),
        ("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, mac: 'zz:zz'}\n".into(), "spec.mac", "not a MAC"),
        ("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, ports: [{name: web, protocol: ICMP, port: 80}]}\n".into(), "spec.ports[0].protocol", "has no ports"),
        (kind("HostEndpoint", "h", "node: n"), "spec.interfaceName", "one of interfaceName or expectedIPs"),
        (kind("HostEndpoint", "h", "node: n\nexpectedIPs: [1.2.3.999]"), "spec.expectedIPs[0]", "not a valid IP"),
        (kind("GlobalNetworkSet", "s", "nets: [10.0.0.0/99]"), "spec.nets[0]", "not a valid CIDR"),
        // --- issue 17: what upstream refuses
        ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: a.b}\nspec: {selector: all()}\n".into(), "metadata.name", "no other dot"),
        ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: security.a.b}\nspec: {tier: security, selector: all()}\n".into(), "metadata.name", "no other dot"),
        ("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, ipNetworks: [10.0.0.0/24]}\n".into(), "spec.ipNetworks[0]", "contains multiple addresses"),
        ("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, interfaceName: 'cali+x'}\n".into(), "spec.interfaceName", "only letters, digits"),
        ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: s, labels: {projectcalico.org/name: x}}\nspec: {nets: [10.0.0.0/8]}\n".into(), "metadata.labels.projectcalico.org/name", "reserved"),
        (rule("action: Allow\nprotocol: TCP\ndestination:\n  ports: [0]"), "spec.ingress[0].destination.ports[0]", "out of range 1-65535"),
        (rule("action: Allow\nprotocol: TCP\ndestination:\n  ports: ['0:80']"), "spec.ingress[0].destination.ports[0]", "out of range 1-65535"),
        (rule("action: Allow\nsource:\n  nets: [10.0.0.0/8]\ndestination:\n  nets: ['fd00::/64']"), "spec.ingress[0]", "both IPv4 and IPv6"),
        (rule("action: Allow\nsource:\n  notNets: [0.0.0.0/0]"), "spec.ingress[0].source.notNets[0]", "excludes every address"),
        (kind("FelixConfiguration", "default", "healthPort: 70000"), "spec.healthPort", "out of range"),
        (kind("FelixConfiguration", "default", "failsafeInboundHostPorts: [{protocol: ICMP, port: 22}]"), "spec.failsafeInboundHostPorts[0].protocol", "not TCP, UDP or SCTP"),
        (kind("FelixConfiguration", "default", "bpfLogLevel: Verbose"), "spec.bpfLogLevel", "not one of Off, Info, Debug"),
        (kind("FelixConfiguration", "default", "madeUpSetting: 1"), "spec.madeUpSetting", "unknown field `madeUpSetting`"),
        (kind("ClusterInformation", "other", "{}"), "metadata.name", "must be `default`"),
        (kind("BlockAffinity", "b", "state: maybe\nnode: n\ncidr: 10.0.0.0/26"), "spec.state", "not pending, confirmed"),
        // --- issue 17, second batch: upstream's validator rules, each named at its field
        (wep("ports: [{protocol: TCP, port: 80}]"), "spec.ports[0].name", "required unless hostPort"),
        (wep("ipNetworks: [10.0.0.1/32]\nipNATs: [{internalIP: 10.0.0.1, externalIP: 'fd00::1'}]"), "spec.ipNATs[0].externalIP", "not the same IP version"),
        (wep("ipNetworks: [10.0.0.1/32]\nipNATs: [{internalIP: 10.0.0.2, externalIP: 192.0.2.1}]"), "spec.ipNATs[0].internalIP", "not one of the endpoint's ipNetworks"),
        (wep("ipv4Gateway: 'fd00::1'"), "spec.ipv4Gateway", "not an IPv4"),
        (wep("containerID: 'bad id!'"), "spec.containerID", "letters, digits"),
        (format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: x, annotations: {{a: {}}}}}\nspec: {{cidr: 10.0.0.0/16}}\n", "x".repeat(300_000)), "metadata.annotations", "too large by 37857 bytes"),
        (rule(&format!("action: Allow\nmetadata: {{annotations: {{a: {}}}}}", "x".repeat(300_000))), "spec.ingress[0].metadata.annotations", "too large"),
        (kind("BGPConfiguration", "default", "nodeToNodeMeshEnabled: false\nnodeMeshMaxRestartTime: 120s"), "spec.nodeMeshMaxRestartTime", "nodeToNodeMeshEnabled is false"),
        (kind("BGPConfiguration", "default", "nodeToNodeMeshEnabled: false\nnodeMeshPassword: {secretKeyRef: {name: a, key: b}}"), "spec.nodeMeshPassword", "nodeToNodeMeshEnabled is false"),
        (kind("BGPConfiguration", "default", "communities: [{name: c, value: '1:2'}]"), "spec.communities", "no prefixAdvertisements use them"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nallowedUses: [LoadBalancer]\nvxlanMode: Always"), "spec.vxlanMode", "LoadBalancer pool"),
        (kind("IPPool", "x", "cidr: 10.0.0.0/16\nallowedUses: [LoadBalancer]\nnodeSelector: \"a == 'b'\""), "spec.nodeSelector", "must be all()"),
        (kind("Tier", "default", "order: 5"), "spec.order", "must be 1000000"),
        (kind("Tier", "adminnetworkpolicy", "order: 5"), "spec.order", "must be 1000"),
        (kind("Tier", "baselineadminnetworkpolicy", "{}"), "spec.order", "must be 10000000"),
        ("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  ingress: [{action: Allow, destination: {services: {name: s}}}]\n".into(), "spec.ingress[0].destination.services", "not allowed in ingress rule destination"),
        ("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  egress: [{action: Allow, source: {services: {name: s}}}]\n".into(), "spec.egress[0].source.services", "not allowed in egress rule source"),
        (policy("egress: [{action: Allow, destination: {services: {name: s}}}]"), "spec.egress[0].destination.services.namespace", "must specify a namespace"),
        (policy("egress: [{action: Allow, protocol: TCP, destination: {services: {name: s, namespace: n}, ports: [80]}}]"), "spec.egress[0].destination.ports", "cannot specify ports with services"),
        (rule("action: Allow\nprotocol: tcp"), "spec.ingress[0].protocol", "protocol name `tcp` is not valid"),
        (rule("action: Allow\nsource:\n  namespaceSelector: 'global() && a == \"b\"'"), "spec.ingress[0].source.namespaceSelector", "cannot be combined"),
        (kind("FelixConfiguration", "default", "failsafeInboundHostPorts: [{protocol: tcp, port: 22}]"), "spec.failsafeInboundHostPorts[0].protocol", "not TCP, UDP or SCTP"),
        (kind("FelixConfiguration", "default", "natOutgoingAddress: 'fd00::1'"), "spec.natOutgoingAddress", "not a valid IPv4"),
        (kind("FelixConfiguration", "default", "deviceRouteSourceAddressIPv6: 10.0.0.1"), "spec.deviceRouteSourceAddressIPv6", "not a valid IPv6"),
        (kind("FelixConfiguration", "default", "prometheusMetricsHost: 'bad host!'"), "spec.prometheusMetricsHost", "not a host"),
        (kind("FelixConfiguration", "default", "interfaceExclude: 'kube-ipvs0,bad iface'"), "spec.interfaceExclude", "`bad iface`"),
        (kind("FelixConfiguration", "default", "mtuIfacePattern: '(['"), "spec.mtuIfacePattern", "not a regular expression"),
        (kind("FelixConfiguration", "default", "routeTableRange: {min: 1, max: 250}\nrouteTableRanges: [{min: 1, max: 250}]"), "spec.routeTableRange", "routeTableRanges is also set"),
        (kind("FelixConfiguration", "default", "routeTableRange: {min: 0, max: 300}"), "spec.routeTableRange", "within 1..250"),
        (kind("FelixConfiguration", "default", "kubeNodePortRanges: [http]"), "spec.kubeNodePortRanges[0]", "not a named port"),
        (kind("FelixConfiguration", "default", "openstackRegion: Bad_Region"), "spec.openstackRegion", "lower-case"),
        (kind("FelixConfiguration", "default", "iptablesBackend: Foo"), "spec.iptablesBackend", "Legacy, NFT, Auto"),
        (kind("FelixConfiguration", "default", "bpfExternalServiceMode: Foo"), "spec.bpfExternalServiceMode", "Tunnel, DSR"),
        (kind("KubeControllersConfiguration", "default", "healthChecks: Maybe\ncontrollers: {}"), "spec.healthChecks", "Enabled, Disabled"),
        (kind("KubeControllersConfiguration", "default", "etcdV3CompactionPeriod: soon\ncontrollers: {}"), "spec.etcdV3CompactionPeriod", "not a duration"),
        (kind("KubeControllersConfiguration", "default", "controllers: {node: {leakGracePeriod: soon}}"), "spec.controllers.node.leakGracePeriod", "not a duration"),
        (kind("KubeControllersConfiguration", "default", "controllers: {node: {hostEndpoint: {autoCreate: Maybe}}}"), "spec.controllers.node.hostEndpoint.autoCreate", "Enabled, Disabled"),
        (kind("KubeControllersConfiguration", "default", "controllers: {nodes: {}}"), "spec.controllers.nodes", "unknown controller"),
        (kind("KubeControllersConfiguration", "default", "controllers: {policy: {reconcilerPeriod: 5m, syncLabels: Enabled}}"), "spec.controllers.policy.syncLabels", "unknown field"),
        (kind("KubeControllersConfiguration", "default", "prometheusMetricsPort: 70000\ncontrollers: {}"), "spec.prometheusMetricsPort", "out of range"),
        (kind("BGPPeer", "x", "peerSelector: all()\nreachableBy: 10.0.0.1"), "spec.reachableBy", "must be empty when peerIP is empty"),
        (kind("BGPPeer", "x", "peerIP: 10.0.0.1\nasNumber: 1\nreachableBy: 'fd00::1'"), "spec.reachableBy", "different address families"),
        (kind("BGPPeer", "x", "peerIP: 10.0.0.1\nasNumber: 1\nkeepOriginalNextHop: true\nnextHopMode: Self"), "spec.keepOriginalNextHop", "nextHopMode"),
        (kind("BGPPeer", "x", "localWorkloadSelector: all()"), "spec.asNumber", "required when localWorkloadSelector"),
        (kind("Node", "n", "bgp: {}"), "spec.bgp", "should not be empty"),
        (kind("BlockAffinity", "b", "state: confirmed\nnode: n\ncidr: 10.0.0.0/26\ndeleted: 'true'"), "spec.deleted", "cannot be set to true"),
        (kind("QoSPolicy", "q", "selector: all()"), "spec.egress", "at least one rule"),
        (kind("QoSPolicy", "q", "egress: [{action: {dscp: 64}}]"), "spec.egress[0].action.dscp", "not a DSCP value"),
        (kind("QoSPolicy", "q", "egress: [{action: {dscp: XX}}]"), "spec.egress[0].action.dscp", "not a DSCP value"),
        (kind("QoSPolicy", "q", "egress: [{action: {dscp: EF}, destination: {ports: [80]}}]"), "spec.egress[0].destination.ports", "only valid with protocol"),
        (wep("qosControls: {ingressBandwidth: -1}"), "spec.qosControls.ingressBandwidth", "not a non-negative integer"),
        (wep("qosControls: {ingressBandwith: 1}"), "spec.qosControls.ingressBandwith", "unknown field"),
        // --- staged policies: read and validated as the policy they would enforce
        (kind("StagedGlobalNetworkPolicy", "s", "stagedAction: Later\nselector: all()"), "spec", "stagedAction: unknown variant `Later`"),
        (kind("StagedGlobalNetworkPolicy", "s", "stagedAction: Set\nselectr: all()"), "spec", "unknown field `selectr`"),
        (kind("StagedGlobalNetworkPolicy", "s", "ingress:\n  - action: Alow"), "spec", "ingress[0].action: unknown variant `Alow`"),
        (kind("StagedGlobalNetworkPolicy", "s", "selector: app ==\ningress: [{action: Allow}]"), "spec.selector", ""),
        (kind("StagedGlobalNetworkPolicy", "s", "stagedAction: Delete\nselector: all()"), "spec", "must be empty when stagedAction is Delete"),
        ("apiVersion: projectcalico.org/v3\nkind: StagedNetworkPolicy\nmetadata: {name: s, namespace: n}\nspec:\n  stagedAction: Delete\n  ingress: [{action: Allow}]\n".into(), "spec", "must be empty when stagedAction is Delete"),
        ("apiVersion: projectcalico.org/v3\nkind: StagedNetworkPolicy\nmetadata: {name: s, namespace: n}\nspec:\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [0]}}]\n".into(), "spec.ingress[0].destination.ports[0]", ""),
        ("apiVersion: projectcalico.org/v3\nkind: StagedKubernetesNetworkPolicy\nmetadata: {name: s, namespace: n}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: Near}]}\n".into(), "spec", "operator `Near`"),
        ("apiVersion: projectcalico.org/v3\nkind: StagedKubernetesNetworkPolicy\nmetadata: {name: s, namespace: n}\nspec:\n  stagedAction: Delete\n  podSelector: {matchLabels: {a: b}}\n".into(), "spec", "must be empty when stagedAction is Delete"),
    ];
    assert!(cases.len() >= 40, "the table must hold at least 40 cases");
    let mut failures = Vec::new();
    for (text, path, message) in &cases {
        let found = problems(text);
        let hit = found.iter().any(|(p, m)| p == path && m.contains(message));
        if !hit {
            failures.push(format!(
                "expected `{path}: …{message}…`\n  input:\n{}\n  got: {found:?}",
                indent(text)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{} bad inputs, each reported at its field", cases.len());
}

#[test]
fn a_document_reports_every_problem_not_just_the_first() {
    let text = kind(
        "IPPool",
        "x",
        "cidr: fd00::/64\nblockSize: 64\nipipMode: Always\nnodeSelector: \"a ==\"",
    );
    let paths: Vec<String> = problems(&text).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        ["spec.blockSize", "spec.ipipMode", "spec.nodeSelector"]
    );
}

#[test]
fn syntax_errors_carry_line_and_column_of_later_documents() {
    let text = "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: a}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: [b\n";
    match parse_documents(text) {
        Err(DocumentError::Syntax { line, .. }) => assert!(line >= 7, "line {line}"),
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let text = "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: a}\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: b}\nspec: {rank: 1}\n";
    match parse_documents(text) {
        Err(e @ DocumentError::Schema { line: 5, .. }) => {
            assert!(e.to_string().contains("Tier b"), "{e}")
        }
        other => panic!("expected a schema error at the second document, got {other:?}"),
    }
}

/// Deep nesting is refused by a linear scan before the YAML parser reads the document (whose
/// own recursion limit applies only after a quadratic read): the error names the line and
/// column where the limit is crossed, in flow and compact block form, and nesting that
/// quotes or comments only appear to have is not counted.
#[test]
fn deep_nesting_is_refused_before_parsing() {
    let deep = 200_000;
    for (text, line) in [
        (
            policy(&format!(
                "selector: {}{}",
                "[".repeat(deep),
                "]".repeat(deep)
            )),
            6,
        ),
        (
            policy(&format!(
                "selector: {}1{}",
                "{a: ".repeat(deep),
                "}".repeat(deep)
            )),
            6,
        ),
        (format!("{}x\n", "- ".repeat(deep)), 1),
        // An apostrophe in plain text opens no quote that could hide what follows.
        (
            policy(&format!("note: it's\nselector: {}", "[".repeat(deep))),
            7,
        ),
    ] {
        let problems = problems(&text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (at, message) = &problems[0];
        assert!(
            at.starts_with(&format!("{line}:"))
                && message.contains("nested deeper than 100 levels"),
            "{at}: {message}"
        );
    }
    // Positive controls: what only looks deep, and real nesting within the limit, parse.
    let brackets = "[".repeat(150);
    for text in [
        policy(&format!("selector: \"{brackets}\" == 'x'")),
        policy(&format!("selector: has(a) # {brackets}")),
    ] {
        let problems = problems(&text);
        assert!(
            !problems.iter().any(|(_, m)| m.contains("nested deeper")),
            "{text}: {problems:?}"
        );
    }
    let within = format!("{}1{}", "[".repeat(90), "]".repeat(90));
    let problems = problems(&policy(&format!("selector: has(a)\ntypes: {within}")));
    assert!(
        !problems.iter().any(|(_, m)| m.contains("nested deeper")),
        "{problems:?}"
    );
}

/// An IPPool CIDR with host bits set is stored as its network, as upstream's client stores
/// it (so every reader agrees on the pool); a pool beside the reserved ranges is accepted.
#[test]
fn pool_cidrs_are_stored_as_their_network() {
    let text = kind("IPPool", "x", "cidr: 10.0.0.5/24");
    let resources = parse_documents(&text).unwrap();
    let calico_model::Resource::IPPool(pool) = &resources[0] else {
        panic!("{resources:?}")
    };
    assert_eq!(pool.spec.cidr, "10.0.0.0/24");
    assert!(problems(&text).is_empty(), "{:?}", problems(&text));
    for fine in [
        "cidr: 126.0.0.0/8",
        "cidr: 223.255.0.0/16",
        "cidr: 'fd00::/120'",
    ] {
        let text = kind("IPPool", "x", fine);
        assert!(problems(&text).is_empty(), "{fine}: {:?}", problems(&text));
    }
}

/// Beside each refusal added for upstream's rules, the nearest valid form is accepted.
#[test]
fn upstream_rules_accept_the_nearest_valid_form() {
    for text in [
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: w, namespace: default}\nspec: {node: n, interfaceName: cali-a.b_c, ipNetworks: [10.0.0.1/32, 'fd00::1/128']}\n".to_owned(),
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: s, labels: {example.org/name: x}}\nspec: {nets: [10.0.0.0/8]}\n".to_owned(),
        rule("action: Allow\nprotocol: TCP\ndestination:\n  ports: [1, '1:80', 65535]"),
        rule("action: Allow\nsource:\n  nets: [10.0.0.0/8]\ndestination:\n  nets: [192.0.2.0/24]"),
        rule("action: Allow\nsource:\n  notNets: [10.0.0.0/8]"),
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: security.a}\nspec: {tier: security, selector: all()}\n".to_owned(),
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: default.a}\nspec: {selector: all()}\n".to_owned(),
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec: {logSeverityScreen: info, logSeverityFile: WARNING}\n".to_owned(),
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {logSeverityScreen: debug}\n".to_owned(),
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: knp.default.allow.web, namespace: x}\nspec: {selector: all()}\n".to_owned(),
        // Second batch: what upstream accepts and the first version refused.
        wep("ports: [{protocol: TCP, port: 80, hostPort: 8080}]"),
        wep("ipNetworks: [10.0.0.1/32]\nipNATs: [{internalIP: 10.0.0.1, externalIP: 192.0.2.1}]\ncontainerID: abc-123"),
        kind("IPPool", "x", "cidr: 10.0.0.0/28\nblockSize: 26\ndisabled: true"),
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x, annotations: {Example.COM/Key: v}}\nspec: {cidr: 10.0.0.0/16}\n".to_owned(),
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: ossg.default.a.b, namespace: n}\nspec: {selector: all()}\n".to_owned(),
        kind("FelixConfiguration", "default", "bpfLogLevel: debug\ndefaultEndpointToHostAction: accept\niptablesBackend: nft\ninterfaceExclude: 'kube-ipvs0,/^veth.*/'\nrouteTableRanges: [{min: 1, max: 250}]"),
        kind("Tier", "default", "order: 1000000"),
        kind("BGPConfiguration", "default", "communities: [{name: c, value: '1:2'}]\nprefixAdvertisements: [{cidr: 10.0.0.0/8, communities: [c]}]"),
        kind("BGPPeer", "x", "peerIP: '10.0.0.1:179'\nasNumber: 1\nreachableBy: 10.0.0.254"),
        kind("KubeControllersConfiguration", "default", "healthChecks: Enabled\ncontrollers: {node: {reconcilerPeriod: 5m, syncLabels: Enabled, leakGracePeriod: 15m, hostEndpoint: {autoCreate: Disabled}}, policy: {reconcilerPeriod: 5m}, loadBalancer: {assignIPs: AllServices}}"),
        rule("action: Allow\nsource:\n  namespaceSelector: global()"),
        policy("egress: [{action: Allow, destination: {services: {name: s, namespace: n}}}]"),
        // Upstream's plain strings: empty means unset.
        kind("BGPPeer", "x", "node: ''\nnodeSelector: all()\npeerIP: ''\npeerSelector: all()\nlocalWorkloadSelector: ''"),
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: false, maxBlocksPerHost: 0, autoAllocateBlocks: true}\n".to_owned(),
    ] {
        assert!(problems(&text).is_empty(), "{text}: {:?}", problems(&text));
    }
}
