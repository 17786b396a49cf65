//! The policy dataplane: compiled policy programs written into the policy maps, and the
//! policy classifiers attached to endpoint interfaces.
//!
//! A program is written under a fresh id beside the one in use; the endpoint's entry is then
//! switched to it with one map update, and the old program's entries are deleted. A packet
//! therefore sees either the old tables or the new ones, never a mix.
//!
//! One job a file: loading (here), [`attach`]ing and adopting pinned links, writing a
//! program's [`tables`], the tables programs share ([`shared`]: nets tables and IP sets,
//! stored once), [`sweep`]ing a previous run's entries, [`conntrack`], and [`observe`]
//! (counters, events, the log switch, test runs).

mod attach;
mod conntrack;
mod observe;
mod pins;
mod shared;
mod sweep;
mod tables;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::tc::SchedClassifierLink,
    Ebpf, EbpfLoader,
};
use calico_bpf_common::{
    CtKey, CtValue, EndpointKey, LocalKey, PeerClassKey, PeerKeyData, PortKeyData, ProgramRef,
    ProtoKey, RuleStatKey, RuleStatValue, SetList, VerdictKeyData, VerdictValue,
    CONNTRACK_COUNTS_MAP, CONNTRACK_LIMIT_MAP, CONNTRACK_MAP, CONNTRACK_MAX_ENTRIES,
    POLICY_EGRESS_PROG, POLICY_ENDPOINTS_MAP, POLICY_EVENTS_MAP, POLICY_INGRESS_PROG,
    POLICY_IP_SETS_MAP, POLICY_LOCALS_MAP, POLICY_LOG_MAP, POLICY_NETS_MAP,
    POLICY_PEER_CLASSES_MAP, POLICY_PROTOS_MAP, POLICY_RULE_STATS_MAP, POLICY_SET_LISTS_MAP,
    POLICY_SPORTS_MAP, POLICY_STATS_MAP, POLICY_VERDICTS_MAP, TC_EGRESS, TC_INGRESS,
};
use calico_policy::Verdict;

pub use conntrack::{ConntrackExpirer, ConntrackTimeouts, TrackedFlow};
pub use observe::{PolicyCounters, RuleCounter};

use shared::{ClassEntries, ClassTable, IpSets, NetPrefixes, NetsTable};

use crate::{
    object::{classifier, map_err, take},
    DataplaneError, LoadOptions, ProgramLogger, TC_OBJECT,
};

/// Which tc hook of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Traffic the interface receives: on a workload's host-side veth, what the workload sends.
    Ingress,
    /// Traffic the interface sends: on a workload's host-side veth, what the workload receives.
    Egress,
}

impl Hook {
    /// The hook whose classifier judges an endpoint's policy of `direction` on a workload's
    /// veth: its ingress policy sees traffic going to it (tc egress of the host side), its
    /// egress policy what it sends (tc ingress). Host interfaces carry the programs the other
    /// way round (see `attach_host`), so the same key serves them.
    pub fn for_direction(direction: calico_policy::Direction) -> Self {
        match direction {
            calico_policy::Direction::Ingress => Hook::Egress,
            calico_policy::Direction::Egress => Hook::Ingress,
        }
    }

    fn code(self) -> u32 {
        match self {
            Hook::Ingress => TC_INGRESS,
            Hook::Egress => TC_EGRESS,
        }
    }
}

/// Everything written for one installed program, so it can be deleted again.
#[derive(Default)]
struct Written {
    /// The nets table the program reads (shared; see `shared`).
    nets: Option<NetPrefixes>,
    /// The IP sets it reads (shared), in mask bit order.
    sets: Vec<calico_policy::SelectorScope>,
    /// Its `POLICY_SET_LISTS` entry was written (under its program id).
    set_list: bool,
    /// The peer class table it reads (shared; see `shared`).
    classes: Option<ClassEntries>,
    /// The program as compiled, less its set members and peer class entries: a new version
    /// that differs only in those updates them in place.
    shape: Option<Box<calico_policy::CompiledProgram>>,
    locals: Vec<LocalKey>,
    protos: Vec<ProtoKey>,
    sports: Vec<Key<PortKeyData>>,
    verdicts: Vec<Key<VerdictKeyData>>,
}

pub struct PolicyDataplane {
    ebpf: Ebpf,
    endpoints: HashMap<MapData, EndpointKey, ProgramRef>,
    nets: LpmTrie<MapData, PeerKeyData, u32>,
    ip_set_members: LpmTrie<MapData, PeerKeyData, u32>,
    set_lists: HashMap<MapData, u32, SetList>,
    peer_classes: HashMap<MapData, PeerClassKey, u32>,
    locals: HashMap<MapData, LocalKey, u32>,
    protos: HashMap<MapData, ProtoKey, u32>,
    sports: LpmTrie<MapData, PortKeyData, u32>,
    verdicts: LpmTrie<MapData, VerdictKeyData, VerdictValue>,
    stats: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack_counts: HashMap<MapData, u32, u32>,
    rule_stats: PerCpuHashMap<MapData, RuleStatKey, RuleStatValue>,
    events: RingBuf<MapData>,
    log_switch: Array<MapData, u32>,
    /// Each installed program's verdicts (what its verdict indices stand for).
    verdicts_of: BTreeMap<u32, Vec<Verdict>>,
    next_program: u32,
    /// Nets tables by content, shared by every program with the same nets.
    nets_tables: std::collections::HashMap<NetPrefixes, NetsTable>,
    next_nets_table: u32,
    /// Peer class tables by content, shared by every program with the same mapping.
    class_tables: std::collections::HashMap<ClassEntries, ClassTable>,
    next_class_table: u32,
    /// IP sets by scope, shared by every program whose selectors name them.
    ip_sets: IpSets,
    next_ip_set: u32,
    installed: BTreeMap<(u32, u32), (u32, Written)>,
    /// Replaced programs whose entries are still to be deleted (see `release_retired`).
    retired: Vec<(u32, Written)>,
    /// Rule counters of released programs, read as they went (`take_released_counters`).
    released_counters: Vec<RuleCounter>,
    /// Where maps and links are pinned, if anywhere.
    pin_path: Option<PathBuf>,
    /// Attachments this process made, by (ifindex, hook).
    links: BTreeMap<(u32, Hook), Attachment>,
    /// Each table's capacity (max entries), by map name.
    capacity: BTreeMap<&'static str, u32>,
    /// Tracked flows counted by the last conntrack expiry pass.
    tracked_flows_seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// One classifier attachment: owned (detached when dropped) or pinned (kept by its pin until
/// unpinned; no file descriptor is held, so thousands of endpoints cost no fds).
enum Attachment {
    Owned(#[allow(dead_code)] SchedClassifierLink),
    Pinned(PathBuf),
    /// A clsact filter left in the kernel on purpose (it outlives the agent, as pins do).
    Filter {
        interface: String,
        attach_type: aya::programs::TcAttachType,
    },
}

/// The policy maps that outlive the agent when pinned (the per-CPU scratch map does not
/// need to).
const PINNED_MAPS: [&str; 13] = [
    CONNTRACK_COUNTS_MAP,
    POLICY_RULE_STATS_MAP,
    POLICY_ENDPOINTS_MAP,
    POLICY_NETS_MAP,
    POLICY_IP_SETS_MAP,
    POLICY_SET_LISTS_MAP,
    POLICY_PEER_CLASSES_MAP,
    POLICY_LOCALS_MAP,
    POLICY_PROTOS_MAP,
    POLICY_SPORTS_MAP,
    POLICY_VERDICTS_MAP,
    POLICY_STATS_MAP,
    CONNTRACK_MAP,
];

fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
    }
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

impl PolicyDataplane {
    /// Loads the policy classifiers and their maps.
    pub fn load(options: &LoadOptions) -> Result<(Self, Option<ProgramLogger>), DataplaneError> {
        let level: u8 = options.log_level.map_or(0, |l| l as u8);
        let mut loader = EbpfLoader::new();
        let mut migrating = Vec::new();
        let wanted = pins::wanted_layouts(TC_OBJECT, &options.map_sizes)?;
        loader.override_global(aya_log::LEVEL, &level, false);
        if let Some(dir) = &options.pin_path {
            for sub in [dir.clone(), dir.join("links")] {
                std::fs::create_dir_all(&sub).map_err(|source| DataplaneError::Pin {
                    path: sub.clone(),
                    action: "create directory",
                    source,
                })?;
            }
            // Pins of another layout are moved aside or removed first (see `pins`).
            let sized: Vec<&str> = options.map_sizes.iter().map(|(n, _)| *n).collect();
            migrating = pins::prepare(dir, &PINNED_MAPS, &wanted, &sized)?;
            for name in PINNED_MAPS {
                // Reuses the map pinned there, or creates and pins it.
                loader.map_pin_path(name, dir.join(name));
            }
        }
        for (name, size) in &options.map_sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(TC_OBJECT).map_err(DataplaneError::Load)?;
        let logger = match options.log_level {
            Some(_) => Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(DataplaneError::Logger)?),
            None => None,
        };
        for name in [POLICY_INGRESS_PROG, POLICY_EGRESS_PROG] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    program: name,
                    action: "load",
                    source,
                })?;
        }
        // What each table holds at most: the pinned map's own size when one was reused.
        let capacity: BTreeMap<&'static str, u32> = PINNED_MAPS
            .iter()
            .filter_map(|name| {
                let pinned = options.pin_path.as_ref().and_then(|dir| {
                    aya::maps::MapInfo::from_pin(dir.join(name))
                        .ok()
                        .map(|i| i.max_entries())
                });
                pinned
                    .or_else(|| wanted.get(*name).map(|l| l.max_entries))
                    .map(|size| (*name, size))
            })
            .collect();
        let mut dataplane = Self {
            capacity,
            endpoints: take(&mut ebpf, POLICY_ENDPOINTS_MAP)?,
            nets: take(&mut ebpf, POLICY_NETS_MAP)?,
            ip_set_members: take(&mut ebpf, POLICY_IP_SETS_MAP)?,
            set_lists: take(&mut ebpf, POLICY_SET_LISTS_MAP)?,
            peer_classes: take(&mut ebpf, POLICY_PEER_CLASSES_MAP)?,
            locals: take(&mut ebpf, POLICY_LOCALS_MAP)?,
            protos: take(&mut ebpf, POLICY_PROTOS_MAP)?,
            sports: take(&mut ebpf, POLICY_SPORTS_MAP)?,
            verdicts: take(&mut ebpf, POLICY_VERDICTS_MAP)?,
            stats: take(&mut ebpf, POLICY_STATS_MAP)?,
            conntrack: take(&mut ebpf, CONNTRACK_MAP)?,
            conntrack_counts: take(&mut ebpf, CONNTRACK_COUNTS_MAP)?,
            rule_stats: take(&mut ebpf, POLICY_RULE_STATS_MAP)?,
            events: take(&mut ebpf, POLICY_EVENTS_MAP)?,
            log_switch: take(&mut ebpf, POLICY_LOG_MAP)?,
            verdicts_of: BTreeMap::new(),
            ebpf,
            next_program: 1,
            nets_tables: Default::default(),
            next_nets_table: 1,
            ip_sets: Default::default(),
            next_ip_set: 1,
            class_tables: Default::default(),
            next_class_table: 1,
            installed: BTreeMap::new(),
            retired: Vec::new(),
            released_counters: Vec::new(),
            pin_path: options.pin_path.clone(),
            links: BTreeMap::new(),
            tracked_flows_seen: Default::default(),
        };
        dataplane.set_debug_logging(options.log_level.is_some())?;
        let conntrack_capacity = dataplane
            .capacity
            .get(CONNTRACK_MAP)
            .copied()
            .unwrap_or(CONNTRACK_MAX_ENTRIES);
        let limit = options
            .conntrack_per_interface
            .unwrap_or(conntrack_capacity / 4);
        let mut limit_map: Array<MapData, u32> = take(&mut dataplane.ebpf, CONNTRACK_LIMIT_MAP)?;
        limit_map
            .set(0, limit, 0)
            .map_err(map_err(CONNTRACK_LIMIT_MAP, "write"))?;
        for (name, old) in migrating {
            if name == CONNTRACK_MAP {
                let copied = pins::migrate_conntrack(old, &mut dataplane.conntrack)?;
                tracing::info!(
                    flows = copied,
                    "tracked flows migrated to the new conntrack layout"
                );
            }
        }
        // Programs already in pinned maps (a previous run's) keep their ids; new ones start
        // above them.
        let adopted = dataplane.endpoint_programs()?;
        if let Some(max) = adopted.values().map(|r| r.program).max() {
            dataplane.next_program = max.wrapping_add(1).max(1);
        }
        if let Some(max) = adopted.values().map(|r| r.nets).max() {
            dataplane.next_nets_table = max.wrapping_add(1).max(1);
        }
        if let Some(max) = adopted.values().map(|r| r.classes).max() {
            dataplane.next_class_table = max.wrapping_add(1).max(1);
        }
        if let Some(max) = dataplane
            .set_lists
            .iter()
            .filter_map(Result::ok)
            .flat_map(|(_, list)| list.ids)
            .max()
        {
            dataplane.next_ip_set = max.wrapping_add(1).max(1);
        }
        Ok((dataplane, logger))
    }

    fn endpoint_programs(&self) -> Result<BTreeMap<(u32, u32), ProgramRef>, DataplaneError> {
        self.endpoints
            .iter()
            .map(|e| e.map(|(k, v)| ((k.ifindex, k.hook), v)))
            .collect::<Result<_, _>>()
            .map_err(map_err(POLICY_ENDPOINTS_MAP, "iterate"))
    }
}
