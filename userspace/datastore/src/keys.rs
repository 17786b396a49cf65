//! Upstream Calico's etcd key layout (pure functions, no I/O).

use calico_model::{Kind, Resource};
use ipnet::IpNet;

/// Prefix of every v3 resource key.
pub const RESOURCES_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
/// Prefix of every IPAM key.
pub const IPAM_PREFIX: &str = "/calico/ipam/v2/";
const BLOCKS: &str = "/calico/ipam/v2/assignment/";
const AFFINITIES: &str = "/calico/ipam/v2/host/";
const HANDLES: &str = "/calico/ipam/v2/handle/";
const IPAM_CONFIG: &str = "/calico/ipam/v2/config";

/// Which object a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

/// `10.0.0.0/26` → `10-0-0-0-26`, upstream's name for the block (and its affinity's suffix).
pub fn block_name(cidr: &IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// The block a name most likely stands for (`10-0-0-0-26` → 10.0.0.0/26), when one gives
/// the name back. A guess: a name can in theory stand for two IPv6 blocks (`::ffff:a.b.c.d`
/// and `::ffff:a:b:c:d` share one), so a reader that does not find the guess looks further.
pub fn block_cidr_guess(name: &str) -> Option<IpNet> {
    let (address, len) = name.rsplit_once('-')?;
    let v4 = address.replace('-', ".");
    let v6 = address.replace('-', ":");
    [v4, v6]
        .iter()
        .filter_map(|a| format!("{a}/{len}").parse::<IpNet>().ok())
        .find(|cidr| block_name(cidr) == name)
}

/// The key segment of a block: `10.0.0.0-26`.
fn block_segment(cidr: &IpNet) -> String {
    cidr.to_string().replace('/', "-")
}

fn family(cidr: &IpNet) -> &'static str {
    match cidr {
        IpNet::V4(_) => "ipv4",
        IpNet::V6(_) => "ipv6",
    }
}

/// Key of an IPAM block.
pub fn block_key(cidr: &IpNet) -> String {
    format!("{BLOCKS}{}/block/{}", family(cidr), block_segment(cidr))
}

/// Key of a node's affinity to a block.
pub fn affinity_key(node: &str, cidr: &IpNet) -> String {
    format!(
        "{AFFINITIES}{node}/{}/block/{}",
        family(cidr),
        block_segment(cidr)
    )
}

/// The prefix of every affinity of `node` (both families): what one node needs to watch.
pub fn node_affinities_prefix(node: &str) -> String {
    format!("{AFFINITIES}{node}/")
}

/// Key of an IPAM handle.
pub fn handle_key(handle_id: &str) -> String {
    format!("{HANDLES}{handle_id}")
}

/// Key of the IPAM configuration singleton.
pub fn ipam_config_key() -> &'static str {
    IPAM_CONFIG
}

/// The key `resource` is stored under. IPAM kinds are keyed by their spec, as upstream does.
pub fn key_for(resource: &Resource) -> Result<String, String> {
    let parse = |cidr: &str| {
        cidr.parse::<IpNet>()
            .map_err(|_| format!("spec.cidr `{cidr}` is not a CIDR"))
    };
    match resource {
        Resource::IPAMBlock(o) => Ok(block_key(&parse(&o.spec.cidr)?)),
        Resource::BlockAffinity(o) => Ok(affinity_key(&o.spec.node, &parse(&o.spec.cidr)?)),
        Resource::IPAMHandle(o) => Ok(handle_key(&o.spec.handle_id)),
        Resource::IPAMConfig(_) => Ok(IPAM_CONFIG.to_owned()),
        other => Ok(resource_key(other.kind(), other.namespace(), other.name())),
    }
}

/// Key of a v3 resource by name (not for IPAM blocks and affinities, keyed by spec).
pub fn resource_key(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match (kind.is_namespaced(), namespace) {
        (true, Some(ns)) => format!("{RESOURCES_PREFIX}{}/{ns}/{name}", kind.plural()),
        _ => format!("{RESOURCES_PREFIX}{}/{name}", kind.plural()),
    }
}

/// The key of `kind`/`name` when it follows from the name alone.
pub fn key_for_name(kind: Kind, namespace: Option<&str>, name: &str) -> Option<String> {
    match kind {
        Kind::IPAMBlock | Kind::BlockAffinity => None,
        Kind::IPAMHandle => Some(handle_key(name)),
        Kind::IPAMConfig => Some(IPAM_CONFIG.to_owned()),
        _ => Some(resource_key(kind, namespace, name)),
    }
}

/// The prefix under which every object of `kind` (in `namespace`, for namespaced kinds when
/// given) is stored.
pub fn prefix_for(kind: Kind, namespace: Option<&str>) -> String {
    match kind {
        Kind::IPAMBlock => BLOCKS.to_owned(),
        Kind::BlockAffinity => AFFINITIES.to_owned(),
        Kind::IPAMHandle => HANDLES.to_owned(),
        Kind::IPAMConfig => IPAM_CONFIG.to_owned(),
        _ => match (kind.is_namespaced(), namespace) {
            (true, Some(ns)) => format!("{RESOURCES_PREFIX}{}/{ns}/", kind.plural()),
            _ => format!("{RESOURCES_PREFIX}{}/", kind.plural()),
        },
    }
}

/// Which object `key` holds, or `None` for keys outside the layout.
pub fn parse_key(key: &str) -> Option<KeyInfo> {
    if let Some(rest) = key.strip_prefix(RESOURCES_PREFIX) {
        let mut parts = rest.split('/');
        let plural = parts.next()?;
        let kind = Kind::ALL.iter().copied().find(|k| k.plural() == plural)?;
        let segments: Vec<&str> = parts.collect();
        return match (kind.is_namespaced(), segments.as_slice()) {
            (true, [ns, name]) if !ns.is_empty() && !name.is_empty() => Some(KeyInfo {
                kind,
                namespace: Some((*ns).to_owned()),
                name: (*name).to_owned(),
            }),
            (false, [name]) if !name.is_empty() => Some(KeyInfo {
                kind,
                namespace: None,
                name: (*name).to_owned(),
            }),
            _ => None,
        };
    }
    if key == IPAM_CONFIG {
        return Some(KeyInfo {
            kind: Kind::IPAMConfig,
            namespace: None,
            name: "default".to_owned(),
        });
    }
    if let Some(id) = key.strip_prefix(HANDLES) {
        return (!id.is_empty() && !id.contains('/')).then(|| KeyInfo {
            kind: Kind::IPAMHandle,
            namespace: None,
            name: id.to_owned(),
        });
    }
    if let Some(rest) = key.strip_prefix(BLOCKS) {
        let (_, segment) = rest.split_once("/block/")?;
        let cidr = parse_segment(segment)?;
        return Some(KeyInfo {
            kind: Kind::IPAMBlock,
            namespace: None,
            name: block_name(&cidr),
        });
    }
    if let Some(rest) = key.strip_prefix(AFFINITIES) {
        let (node, rest) = rest.split_once('/')?;
        let (_, segment) = rest.split_once("/block/")?;
        let cidr = parse_segment(segment)?;
        return Some(KeyInfo {
            kind: Kind::BlockAffinity,
            namespace: None,
            name: format!("{node}-{}", block_name(&cidr)),
        });
    }
    None
}

/// The block a block key holds (`…/ipv4/block/10.0.0.0-26` → 10.0.0.0/26).
pub fn block_cidr_of_key(key: &str) -> Option<IpNet> {
    let (_, segment) = key.strip_prefix(BLOCKS)?.split_once("/block/")?;
    parse_segment(segment)
}

/// `10.0.0.0-26` → `10.0.0.0/26`.
fn parse_segment(segment: &str) -> Option<IpNet> {
    let (addr, len) = segment.rsplit_once('-')?;
    format!("{addr}/{len}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_name_gives_its_block_back() {
        for cidr in [
            "10.64.0.0/26",
            "192.168.255.192/26",
            "fd00::/122",
            "fd00:1:2::40/122",
            "2001:db8::/64",
        ] {
            let cidr: IpNet = cidr.parse().unwrap();
            assert_eq!(block_cidr_guess(&block_name(&cidr)), Some(cidr), "{cidr}");
        }
        for name in [
            "",
            "10-64-0-0",
            "10-64-0-0-x",
            "pods",
            "10-64-0-0-26-1",
            "-26",
        ] {
            assert_eq!(block_cidr_guess(name), None, "{name}");
        }
    }

    #[test]
    fn resource_keys_follow_upstream() {
        assert_eq!(
            resource_key(Kind::NetworkPolicy, Some("prod"), "allow-db"),
            "/calico/resources/v3/projectcalico.org/networkpolicies/prod/allow-db"
        );
        assert_eq!(
            resource_key(Kind::GlobalNetworkPolicy, None, "deny-all"),
            "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/deny-all"
        );
        assert_eq!(
            resource_key(Kind::IPPool, None, "default-ipv4-ippool"),
            "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"
        );
        assert_eq!(
            prefix_for(Kind::WorkloadEndpoint, Some("default")),
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/"
        );
    }

    #[test]
    fn ipam_keys_follow_upstream() {
        let v4: IpNet = "10.0.0.0/26".parse().unwrap();
        let v6: IpNet = "fd00:10::/122".parse().unwrap();
        assert_eq!(
            block_key(&v4),
            "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26"
        );
        assert_eq!(
            block_key(&v6),
            "/calico/ipam/v2/assignment/ipv6/block/fd00:10::-122"
        );
        assert_eq!(
            affinity_key("node1", &v4),
            "/calico/ipam/v2/host/node1/ipv4/block/10.0.0.0-26"
        );
        assert_eq!(
            handle_key("k8s-pod-network.abc"),
            "/calico/ipam/v2/handle/k8s-pod-network.abc"
        );
        assert_eq!(block_name(&v4), "10-0-0-0-26");
    }

    #[test]
    fn keys_parse_back_to_what_they_hold() {
        let cases = [
            (
                "/calico/resources/v3/projectcalico.org/networkpolicies/prod/allow-db",
                Some((Kind::NetworkPolicy, Some("prod"), "allow-db")),
            ),
            (
                "/calico/resources/v3/projectcalico.org/tiers/security",
                Some((Kind::Tier, None, "security")),
            ),
            (
                "/calico/ipam/v2/assignment/ipv6/block/fd00:10::-122",
                Some((Kind::IPAMBlock, None, "fd00-10---122")),
            ),
            (
                "/calico/ipam/v2/host/node1/ipv4/block/10.0.0.0-26",
                Some((Kind::BlockAffinity, None, "node1-10-0-0-0-26")),
            ),
            (
                "/calico/ipam/v2/handle/h1",
                Some((Kind::IPAMHandle, None, "h1")),
            ),
            (
                "/calico/ipam/v2/config",
                Some((Kind::IPAMConfig, None, "default")),
            ),
            // Outside the layout, or malformed.
            (
                "/calico/resources/v3/projectcalico.org/networkpolicies/only-one",
                None,
            ),
            ("/calico/resources/v3/projectcalico.org/tiers/a/b", None),
            ("/calico/resources/v3/projectcalico.org/unknowns/x", None),
            ("/calico/v1/config/foo", None),
            ("/calico/ipam/v2/assignment/ipv4/block/banana", None),
        ];
        for (key, expected) in cases {
            let got = parse_key(key);
            let got = got
                .as_ref()
                .map(|k| (k.kind, k.namespace.as_deref(), k.name.as_str()));
            assert_eq!(got, expected, "{key}");
        }
    }
}
