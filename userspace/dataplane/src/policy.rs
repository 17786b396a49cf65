//! The policy dataplane: compiled policy programs written into the policy maps, and the
//! policy classifiers attached to endpoint interfaces.
//!
//! A program is written under a fresh id beside the one in use; the endpoint's entry is then
//! switched to it with one map update, and the old program's entries are deleted. A packet
//! therefore sees either the old tables or the new ones, never a mix.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc,
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use calico_bpf_common::{
    CtKey, CtValue, EndpointKey, LocalKey, PeerKeyData, PolicyStat, PortKeyData, ProgramRef,
    ProtoKey, RuleStatKey, RuleStatValue, VerdictEvent, VerdictKeyData, VerdictValue, ACTION_ALLOW,
    ACTION_DENY, CONNTRACK_MAP, CT_FIN_HI, CT_FIN_LO, POLICY_EGRESS_PROG, POLICY_ENDPOINTS_MAP,
    POLICY_EVENTS_MAP, POLICY_INGRESS_PROG, POLICY_LOCALS_MAP, POLICY_LOG_MAP, POLICY_PEERS_MAP,
    POLICY_PROTOS_MAP, POLICY_RULE_STATS_MAP, POLICY_SPORTS_MAP, POLICY_STATS_MAP,
    POLICY_VERDICTS_MAP, TC_EGRESS, TC_INGRESS, VERDICT_FIXED_BITS,
};
use calico_policy::{range_to_prefixes, CompiledProgram, Verdict};
use ipnet::IpNet;
use nix::errno::Errno;

use crate::{
    object::{classifier, take},
    AttachMode, DataplaneError, LoadOptions, ProgramLogger, TC_OBJECT,
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
    peers: Vec<Key<PeerKeyData>>,
    locals: Vec<LocalKey>,
    protos: Vec<ProtoKey>,
    sports: Vec<Key<PortKeyData>>,
    verdicts: Vec<Key<VerdictKeyData>>,
}

/// How long an idle tracked flow is kept, by kind (upstream Felix's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    pub tcp_established: std::time::Duration,
    /// TCP after a FIN from both sides.
    pub tcp_closed: std::time::Duration,
    pub udp: std::time::Duration,
    pub icmp: std::time::Duration,
    pub other: std::time::Duration,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            tcp_established: Duration::from_secs(3600),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(5),
            other: Duration::from_secs(600),
        }
    }
}

/// One tracked flow, as userspace sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedFlow {
    pub ifindex: u32,
    pub protocol: u8,
    pub addresses: (IpAddr, IpAddr),
    pub ports: (u16, u16),
    pub idle: std::time::Duration,
    pub closed: bool,
}

fn unmapped(a: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// What one rule decided on one interface and hook.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleCounter {
    pub ifindex: u32,
    pub hook: Hook,
    /// The verdict, naming the deciding rule (or the end of a tier / no policy).
    pub verdict: Verdict,
    pub packets: u64,
    pub bytes: u64,
}

/// Policy counters summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub allowed: u64,
    pub denied: u64,
    pub unmanaged: u64,
    pub malformed: u64,
    /// Packets of tracked flows, passed without a verdict.
    pub tracked: u64,
    /// Packets sent straight to another local endpoint's interface.
    pub forwarded: u64,
}

pub struct PolicyDataplane {
    ebpf: Ebpf,
    endpoints: HashMap<MapData, EndpointKey, ProgramRef>,
    peers: LpmTrie<MapData, PeerKeyData, u32>,
    locals: HashMap<MapData, LocalKey, u32>,
    protos: HashMap<MapData, ProtoKey, u32>,
    sports: LpmTrie<MapData, PortKeyData, u32>,
    verdicts: LpmTrie<MapData, VerdictKeyData, VerdictValue>,
    stats: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    rule_stats: PerCpuHashMap<MapData, RuleStatKey, RuleStatValue>,
    events: RingBuf<MapData>,
    log_switch: Array<MapData, u32>,
    /// Each installed program's verdicts (what its verdict indices stand for).
    verdicts_of: BTreeMap<u32, Vec<Verdict>>,
    next_program: u32,
    installed: BTreeMap<(u32, u32), (u32, Written)>,
    /// Where maps and links are pinned, if anywhere.
    pin_path: Option<PathBuf>,
    /// Attachments this process made, by (ifindex, hook).
    links: BTreeMap<(u32, Hook), Attachment>,
    /// Tracked flows counted by the last conntrack expiry pass.
    tracked_flows_seen: usize,
}

/// One classifier attachment: owned (detached when dropped) or pinned (kept by its pin until
/// unpinned; no file descriptor is held, so thousands of endpoints cost no fds).
enum Attachment {
    Owned(#[allow(dead_code)] SchedClassifierLink),
    Pinned(PathBuf),
}

/// The policy maps that outlive the agent when pinned (the per-CPU scratch map does not
/// need to).
const PINNED_MAPS: [&str; 9] = [
    POLICY_RULE_STATS_MAP,
    POLICY_ENDPOINTS_MAP,
    POLICY_PEERS_MAP,
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

fn map_err(
    map: &'static str,
    action: &'static str,
) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map {
        map,
        action,
        source,
    }
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Where the attachment of `hook` on interface `ifindex` is pinned.
fn link_pin(dir: &Path, ifindex: u32, hook: Hook) -> PathBuf {
    dir.join("links")
        .join(format!("{ifindex}-{}", hook_name(hook)))
}

/// Releases the attachment pinned at `path`, if any (detaching it).
fn release_pin(path: &Path) {
    if let Ok(old) = PinnedLink::from_pin(path) {
        let _ = old.unpin();
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fn class16(what: &'static str, class: u32) -> Result<u16, DataplaneError> {
    u16::try_from(class).map_err(|_| DataplaneError::TooLarge { what, value: class })
}

impl PolicyDataplane {
    /// Loads the policy classifiers and their maps.
    pub fn load(options: &LoadOptions) -> Result<(Self, Option<ProgramLogger>), DataplaneError> {
        let level: u8 = options.log_level.map_or(0, |l| l as u8);
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, false);
        if let Some(dir) = &options.pin_path {
            for sub in [dir.clone(), dir.join("links")] {
                std::fs::create_dir_all(&sub).map_err(|source| DataplaneError::Pin {
                    path: sub.clone(),
                    action: "create directory",
                    source,
                })?;
            }
            for name in PINNED_MAPS {
                // Reuses the map pinned there, or creates and pins it.
                loader.map_pin_path(name, dir.join(name));
            }
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
        let mut dataplane = Self {
            endpoints: take(&mut ebpf, POLICY_ENDPOINTS_MAP)?,
            peers: take(&mut ebpf, POLICY_PEERS_MAP)?,
            locals: take(&mut ebpf, POLICY_LOCALS_MAP)?,
            protos: take(&mut ebpf, POLICY_PROTOS_MAP)?,
            sports: take(&mut ebpf, POLICY_SPORTS_MAP)?,
            verdicts: take(&mut ebpf, POLICY_VERDICTS_MAP)?,
            stats: take(&mut ebpf, POLICY_STATS_MAP)?,
            conntrack: take(&mut ebpf, CONNTRACK_MAP)?,
            rule_stats: take(&mut ebpf, POLICY_RULE_STATS_MAP)?,
            events: take(&mut ebpf, POLICY_EVENTS_MAP)?,
            log_switch: take(&mut ebpf, POLICY_LOG_MAP)?,
            verdicts_of: BTreeMap::new(),
            ebpf,
            next_program: 1,
            installed: BTreeMap::new(),
            pin_path: options.pin_path.clone(),
            links: BTreeMap::new(),
            tracked_flows_seen: 0,
        };
        dataplane.set_debug_logging(options.log_level.is_some())?;
        // Programs already in pinned maps (a previous run's) keep their ids; new ones start
        // above them.
        let adopted = dataplane.endpoint_programs()?;
        if let Some(max) = adopted.values().map(|r| r.program).max() {
            dataplane.next_program = max.wrapping_add(1).max(1);
        }
        Ok((dataplane, logger))
    }

    /// Attaches both classifiers to `interface` (in the calling thread's network namespace).
    /// With a pin path, the TCX attachments are pinned under `<pin path>/links/` and replace
    /// a previous run's there without a gap: the new program is attached first, then the old
    /// attachment is released (both judge with the same pinned maps meanwhile).
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        self.attach_as(interface, false)
    }

    /// Attaches to a host interface (for a HostEndpoint). There the endpoint is on the other
    /// side: what the interface receives goes *to* the endpoint (the host), so each classifier
    /// sits on the opposite hook from a workload veth's. Policy keys are the same: the
    /// endpoint's ingress policy under [`Hook::Egress`], its egress policy under
    /// [`Hook::Ingress`].
    pub fn attach_host(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        self.attach_as(interface, true)
    }

    fn attach_as(&mut self, interface: &str, host: bool) -> Result<AttachMode, DataplaneError> {
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            match tc::qdisc_add_clsact(interface) {
                Ok(()) => {}
                Err(tc::TcError::NetlinkError(e))
                    if e.raw_os_error().map(Errno::from_raw) == Some(Errno::EEXIST) => {}
                Err(source) => {
                    return Err(DataplaneError::Interface {
                        interface: interface.to_owned(),
                        action: "adding the clsact qdisc",
                        source,
                    })
                }
            }
        }
        let ifindex =
            nix::net::if_::if_nametoindex(interface).map_err(|e| DataplaneError::Interface {
                interface: interface.to_owned(),
                action: "looking up its index",
                source: tc::TcError::IoError(e.into()),
            })?;
        let (at_ingress, at_egress) = if host {
            (POLICY_EGRESS_PROG, POLICY_INGRESS_PROG)
        } else {
            (POLICY_INGRESS_PROG, POLICY_EGRESS_PROG)
        };
        for (name, attach_type, hook) in [
            (at_ingress, TcAttachType::Ingress, Hook::Ingress),
            (at_egress, TcAttachType::Egress, Hook::Egress),
        ] {
            let options = if tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(Default::default())
            };
            // A previous run's pinned link on this interface: swap this run's program into it
            // in place (BPF_LINK_UPDATE: atomic, no gap, and no RCU grace period as a new
            // attachment costs). The pin keeps the link; our fd is closed at once.
            if let (Some(dir), true) = (&self.pin_path, tcx) {
                let path = link_pin(dir, ifindex, hook);
                if let Ok(pinned) = PinnedLink::from_pin(&path) {
                    let adopted = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .ok()
                        .and_then(|link| {
                            let program = classifier(&mut self.ebpf, name).ok()?;
                            let id = program.attach_to_link(link).ok()?;
                            program.take_link(id).ok()
                        });
                    if adopted.is_some() {
                        self.links.insert((ifindex, hook), Attachment::Pinned(path));
                        continue;
                    }
                    tracing::debug!(
                        interface,
                        ?hook,
                        "pinned link not adoptable; attaching anew"
                    );
                }
            }
            let program = classifier(&mut self.ebpf, name)?;
            let id = program
                .attach_with_options(interface, attach_type, options)
                .map_err(|source| DataplaneError::Program {
                    program: name,
                    action: "attach",
                    source,
                })?;
            let link = program
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    program: name,
                    action: "take link",
                    source,
                })?;
            let attachment = match (&self.pin_path, tcx) {
                (Some(dir), true) => {
                    let path = link_pin(dir, ifindex, hook);
                    let fd: FdLink = link.try_into().map_err(|_| DataplaneError::Pin {
                        path: path.clone(),
                        action: "convert to an fd link",
                        source: std::io::Error::other("not a TCX link"),
                    })?;
                    // The previous attachment goes only once the new one is in place.
                    release_pin(&path);
                    self.links.remove(&(ifindex, hook));
                    // Dropping the pinned handle closes our fd; the pin keeps the link.
                    drop(fd.pin(&path).map_err(|e| DataplaneError::Pin {
                        path: path.clone(),
                        action: "pin link",
                        source: std::io::Error::other(e.to_string()),
                    })?);
                    Attachment::Pinned(path)
                }
                _ => Attachment::Owned(link),
            };
            // Replacing an owned attachment detaches the old one after the new one is in.
            self.links.insert((ifindex, hook), attachment);
        }
        Ok(if tcx {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        })
    }

    /// Detaches both classifiers from interface `ifindex` and removes its policy (for an
    /// interface that is going away or no longer managed). Unknown indexes are fine.
    pub fn forget_interface(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for hook in [Hook::Ingress, Hook::Egress] {
            match self.links.remove(&(ifindex, hook)) {
                Some(Attachment::Pinned(path)) => release_pin(&path),
                Some(Attachment::Owned(_)) => {}
                None => {
                    if let Some(dir) = &self.pin_path {
                        release_pin(&link_pin(dir, ifindex, hook));
                    }
                }
            }
            self.remove(ifindex, hook)?;
        }
        Ok(())
    }

    /// Interfaces with pinned attachments (this run's or a previous one's), by index.
    pub fn pinned_interfaces(&self) -> BTreeSet<u32> {
        let Some(dir) = &self.pin_path else {
            return BTreeSet::new();
        };
        let Ok(entries) = std::fs::read_dir(dir.join("links")) else {
            return BTreeSet::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.split_once('-')?.0.parse().ok()
            })
            .collect()
    }

    /// Interfaces with a policy in the endpoint map, by index (this run's or a previous
    /// one's, when the maps are pinned).
    pub fn programmed_interfaces(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        Ok(self
            .endpoint_programs()?
            .keys()
            .map(|(ifindex, _)| *ifindex)
            .collect())
    }

    fn endpoint_programs(&self) -> Result<BTreeMap<(u32, u32), ProgramRef>, DataplaneError> {
        self.endpoints
            .iter()
            .map(|e| e.map(|(k, v)| ((k.ifindex, k.hook), v)))
            .collect::<Result<_, _>>()
            .map_err(map_err(POLICY_ENDPOINTS_MAP, "iterate"))
    }

    /// Deletes table entries of programs no endpoint refers to: what a previous run left
    /// behind once this run has installed its own. Returns how many entries went.
    pub fn sweep(&mut self) -> Result<usize, DataplaneError> {
        let live: BTreeSet<u32> = self
            .endpoint_programs()?
            .values()
            .map(|r| r.program)
            .collect();
        let dead = |program: u32| !live.contains(&program);
        let mut removed = 0;
        let peers: Vec<Key<PeerKeyData>> = self
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(u32::from_be_bytes(k.data().program)))
            .collect();
        for k in &peers {
            removed += usize::from(self.peers.remove(k).is_ok());
        }
        let locals: Vec<LocalKey> = self
            .locals
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(k.program))
            .collect();
        for k in &locals {
            removed += usize::from(self.locals.remove(k).is_ok());
        }
        let protos: Vec<ProtoKey> = self
            .protos
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(k.program))
            .collect();
        for k in &protos {
            removed += usize::from(self.protos.remove(k).is_ok());
        }
        let sports: Vec<Key<PortKeyData>> = self
            .sports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(u32::from_be_bytes(k.data().program)))
            .collect();
        for k in &sports {
            removed += usize::from(self.sports.remove(k).is_ok());
        }
        let verdicts: Vec<Key<VerdictKeyData>> = self
            .verdicts
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let b = k.data().bytes;
                dead(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            })
            .collect();
        for k in &verdicts {
            removed += usize::from(self.verdicts.remove(k).is_ok());
        }
        let stats: Vec<RuleStatKey> = self
            .rule_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(k.program))
            .collect();
        for k in &stats {
            removed += usize::from(self.rule_stats.remove(k).is_ok());
        }
        Ok(removed)
    }

    /// Entries in each policy table, from this run's bookkeeping (walking large LPM tries
    /// on every scrape would stall the caller); conntrack as counted by the last
    /// [`PolicyDataplane::expire_conntrack`].
    pub fn occupancy(&self) -> Vec<(&'static str, usize)> {
        let sum = |f: fn(&Written) -> usize| self.installed.values().map(|(_, w)| f(w)).sum();
        vec![
            (POLICY_ENDPOINTS_MAP, self.installed.len()),
            (POLICY_PEERS_MAP, sum(|w| w.peers.len())),
            (POLICY_LOCALS_MAP, sum(|w| w.locals.len())),
            (POLICY_PROTOS_MAP, sum(|w| w.protos.len())),
            (POLICY_SPORTS_MAP, sum(|w| w.sports.len())),
            (POLICY_VERDICTS_MAP, sum(|w| w.verdicts.len())),
            (CONNTRACK_MAP, self.tracked_flows_seen),
        ]
    }

    /// Installs `compiled` as the policy of interface `ifindex` at `hook`, replacing what was
    /// there in one step.
    pub fn install(
        &mut self,
        ifindex: u32,
        hook: Hook,
        compiled: &CompiledProgram,
    ) -> Result<u32, DataplaneError> {
        let program = self.next_program;
        self.next_program = self.next_program.wrapping_add(1).max(1);
        let mut written = Written::default();
        if let Err(e) = self.write(program, compiled, &mut written) {
            // Nothing points at a half-written program; take back what was written.
            self.delete(written);
            return Err(e);
        }
        let key = EndpointKey {
            ifindex,
            hook: hook.code(),
        };
        self.endpoints
            .insert(
                key,
                ProgramRef {
                    program,
                    other_protocol: compiled.other_protocol,
                },
                0,
            )
            .map_err(map_err(POLICY_ENDPOINTS_MAP, "insert"))?;
        self.verdicts_of.insert(program, compiled.verdicts.clone());
        if let Some((old_program, old)) = self
            .installed
            .insert((key.ifindex, key.hook), (program, written))
        {
            self.delete(old);
            self.forget_program(old_program);
        }
        Ok(program)
    }

    /// Removes the policy of `ifindex` at `hook` (its traffic then passes unjudged).
    pub fn remove(&mut self, ifindex: u32, hook: Hook) -> Result<(), DataplaneError> {
        let key = EndpointKey {
            ifindex,
            hook: hook.code(),
        };
        match self.endpoints.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(map_err(POLICY_ENDPOINTS_MAP, "remove")(source)),
        }
        if let Some((old_program, old)) = self.installed.remove(&(key.ifindex, key.hook)) {
            self.delete(old);
            self.forget_program(old_program);
        }
        Ok(())
    }

    fn write(
        &mut self,
        program: u32,
        c: &CompiledProgram,
        w: &mut Written,
    ) -> Result<(), DataplaneError> {
        let id = program.to_be_bytes();
        for (net, class) in &c.peer_prefixes {
            let len = match net {
                IpNet::V4(n) => 32 + 96 + u32::from(n.prefix_len()),
                IpNet::V6(n) => 32 + u32::from(n.prefix_len()),
            };
            let key = Key::new(
                len,
                PeerKeyData {
                    program: id,
                    addr: mapped(net.network()),
                },
            );
            self.peers
                .insert(&key, class, 0)
                .map_err(map_err(POLICY_PEERS_MAP, "insert"))?;
            w.peers.push(key);
        }
        for (addr, class) in &c.local_addresses {
            let key = LocalKey {
                program,
                addr: mapped(*addr),
            };
            self.locals
                .insert(key, class, 0)
                .map_err(map_err(POLICY_LOCALS_MAP, "insert"))?;
            w.locals.push(key);
        }
        for (protocol, class) in &c.protocols {
            let key = ProtoKey {
                program,
                protocol: u32::from(*protocol),
            };
            self.protos
                .insert(key, class, 0)
                .map_err(map_err(POLICY_PROTOS_MAP, "insert"))?;
            w.protos.push(key);
        }
        for (lo, hi, class) in &c.source_ports {
            for (value, len) in range_to_prefixes(*lo, *hi) {
                let key = Key::new(
                    32 + u32::from(len),
                    PortKeyData {
                        program: id,
                        port: value.to_be_bytes(),
                    },
                );
                self.sports
                    .insert(&key, class, 0)
                    .map_err(map_err(POLICY_SPORTS_MAP, "insert"))?;
                w.sports.push(key);
            }
        }
        for (cell, ranges) in &c.cells {
            let mut bytes = [0u8; 16];
            bytes[0..4].copy_from_slice(&id);
            bytes[4..8].copy_from_slice(&cell.peer.to_be_bytes());
            bytes[8..10].copy_from_slice(&class16("local class", cell.local)?.to_be_bytes());
            bytes[10..12].copy_from_slice(&class16("protocol class", cell.protocol)?.to_be_bytes());
            bytes[12..14]
                .copy_from_slice(&class16("source port class", cell.source_port)?.to_be_bytes());
            for (lo, hi, verdict) in ranges {
                let value = VerdictValue {
                    action: match &c.verdicts[*verdict as usize] {
                        Verdict::Allow(_) => ACTION_ALLOW,
                        Verdict::Deny(_) => ACTION_DENY,
                    },
                    rule: *verdict,
                };
                for (port, len) in range_to_prefixes(*lo, *hi) {
                    bytes[14..16].copy_from_slice(&port.to_be_bytes());
                    let key = Key::new(
                        VERDICT_FIXED_BITS + u32::from(len),
                        VerdictKeyData { bytes },
                    );
                    self.verdicts
                        .insert(&key, value, 0)
                        .map_err(map_err(POLICY_VERDICTS_MAP, "insert"))?;
                    w.verdicts.push(key);
                }
            }
        }
        Ok(())
    }

    /// Deletes a program's entries (best effort: they are unreachable once switched away).
    fn delete(&mut self, w: Written) {
        for k in &w.peers {
            let _ = self.peers.remove(k);
        }
        for k in &w.locals {
            let _ = self.locals.remove(k);
        }
        for k in &w.protos {
            let _ = self.protos.remove(k);
        }
        for k in &w.sports {
            let _ = self.sports.remove(k);
        }
        for k in &w.verdicts {
            let _ = self.verdicts.remove(k);
        }
    }

    /// Turns the classifiers' debug log lines (why a packet was denied) on or off while they
    /// run. Lines only appear when the object was loaded with a log level (a logger exists).
    pub fn set_debug_logging(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.log_switch
            .set(0, u32::from(on), 0)
            .map_err(map_err(POLICY_LOG_MAP, "write"))
    }

    /// Drops a replaced program's rule counters.
    fn forget_program(&mut self, program: u32) {
        self.verdicts_of.remove(&program);
        let keys: Vec<RuleStatKey> = self
            .rule_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.program == program)
            .collect();
        for k in &keys {
            let _ = self.rule_stats.remove(k);
        }
    }

    /// Packets and bytes each rule of each installed program decided, summed over CPUs
    /// (counted when policy decides: a flow's first packet, and every denied packet).
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>, DataplaneError> {
        let mut out = Vec::new();
        for (&(ifindex, hook), (program, _)) in &self.installed {
            let Some(verdicts) = self.verdicts_of.get(program) else {
                continue;
            };
            for (index, verdict) in verdicts.iter().enumerate() {
                let key = RuleStatKey {
                    program: *program,
                    verdict: index as u32,
                };
                match self.rule_stats.get(&key, 0) {
                    Ok(values) => {
                        let (packets, bytes) = values
                            .iter()
                            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
                        out.push(RuleCounter {
                            ifindex,
                            hook: if hook == TC_INGRESS {
                                Hook::Ingress
                            } else {
                                Hook::Egress
                            },
                            verdict: verdict.clone(),
                            packets,
                            bytes,
                        });
                    }
                    Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(source) => return Err(map_err(POLICY_RULE_STATS_MAP, "read")(source)),
                }
            }
        }
        Ok(out)
    }

    /// Verdict events the classifiers wrote since the last call (at most `max`).
    pub fn drain_events(&mut self, max: usize) -> Vec<VerdictEvent> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.events.next() else {
                break;
            };
            if item.len() >= std::mem::size_of::<VerdictEvent>() {
                // SAFETY: the classifier writes a whole VerdictEvent (repr(C), plain data)
                // into each record; read_unaligned makes no alignment assumption.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const VerdictEvent) });
            }
        }
        out
    }

    /// Forgets every tracked flow.
    pub fn clear_conntrack(&mut self) -> Result<(), DataplaneError> {
        let keys: Vec<CtKey> = self
            .conntrack
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(CONNTRACK_MAP, "iterate"))?;
        for k in &keys {
            let _ = self.conntrack.remove(k);
        }
        Ok(())
    }

    /// Runs the classifier of `hook` once on `frame` (an Ethernet frame) with
    /// BPF_PROG_TEST_RUN, as if it arrived on the loopback interface (ifindex 1); returns the
    /// program's return code (`TC_ACT_PIPE` 3 passes, `TC_ACT_SHOT` 2 drops).
    pub fn test_run(&mut self, hook: Hook, frame: &[u8]) -> Result<i32, DataplaneError> {
        use aya::programs::{TestRun, TestRunOptions};
        let name = match hook {
            Hook::Ingress => POLICY_INGRESS_PROG,
            Hook::Egress => POLICY_EGRESS_PROG,
        };
        let options = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        let result = classifier(&mut self.ebpf, name)?
            .test_run(options)
            .map_err(|source| DataplaneError::Program {
                program: name,
                action: "test run",
                source,
            })?;
        Ok(result.return_value as i32)
    }

    /// Every tracked flow.
    pub fn tracked_flows(&self) -> Result<Vec<TrackedFlow>, DataplaneError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for entry in self.conntrack.iter() {
            let (k, v) = entry.map_err(map_err(CONNTRACK_MAP, "iterate"))?;
            out.push(TrackedFlow {
                ifindex: k.ifindex,
                protocol: k.protocol as u8,
                addresses: (unmapped(k.addr_lo), unmapped(k.addr_hi)),
                ports: (k.port_lo, k.port_hi),
                idle: std::time::Duration::from_nanos(now.saturating_sub(v.last_seen_ns)),
                closed: v.flags & (CT_FIN_LO | CT_FIN_HI) == (CT_FIN_LO | CT_FIN_HI),
            });
        }
        Ok(out)
    }

    /// Removes flows idle longer than their timeout; returns how many.
    pub fn expire_conntrack(
        &mut self,
        timeouts: &ConntrackTimeouts,
    ) -> Result<usize, DataplaneError> {
        let now = monotonic_ns();
        let mut stale = Vec::new();
        let mut seen = 0;
        for entry in self.conntrack.iter() {
            let (k, v) = entry.map_err(map_err(CONNTRACK_MAP, "iterate"))?;
            seen += 1;
            let closed = v.flags & (CT_FIN_LO | CT_FIN_HI) == (CT_FIN_LO | CT_FIN_HI);
            let limit = match (k.protocol, closed) {
                (6, true) => timeouts.tcp_closed,
                (6, false) => timeouts.tcp_established,
                (17, _) => timeouts.udp,
                (1 | 58, _) => timeouts.icmp,
                _ => timeouts.other,
            };
            if now.saturating_sub(v.last_seen_ns) > limit.as_nanos() as u64 {
                stale.push(k);
            }
        }
        for k in &stale {
            match self.conntrack.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(map_err(CONNTRACK_MAP, "remove")(source)),
            }
        }
        self.tracked_flows_seen = seen - stale.len().min(seen);
        Ok(stale.len())
    }

    pub fn counters(&self) -> Result<PolicyCounters, DataplaneError> {
        let sum = |stat: PolicyStat| -> Result<u64, DataplaneError> {
            let v = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(map_err(POLICY_STATS_MAP, "read"))?;
            Ok(v.iter().sum())
        };
        Ok(PolicyCounters {
            allowed: sum(PolicyStat::Allowed)?,
            denied: sum(PolicyStat::Denied)?,
            unmanaged: sum(PolicyStat::Unmanaged)?,
            malformed: sum(PolicyStat::Malformed)?,
            tracked: sum(PolicyStat::Tracked)?,
            forwarded: sum(PolicyStat::Forwarded)?,
        })
    }
}
