//! The source-address filter: a TC classifier that drops packets whose source address lies in a
//! prefix of an LPM trie (one trie per IP family).

use std::net::IpAddr;

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        MapData, PerCpuArray,
    },
    programs::{
        tc::{SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;

use crate::ProgramLogger;
use calico_bpf_common::{
    FilterStat, Ipv4KeyData, Ipv6KeyData, SourceDenyEntry, FILTER_STATS_MAP, SOURCE_FILTER_PROG,
    SRC_DENY_V4_MAP, SRC_DENY_V6_MAP,
};
use ipnet::IpNet;

use crate::{
    object::{classifier, ensure_clsact, map_err, take},
    DataplaneError, SOURCE_FILTER_OBJECT,
};

/// Which way through an interface the program sees packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets the interface receives.
    Ingress,
    /// Packets the interface sends.
    Egress,
}

impl From<Direction> for TcAttachType {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

/// How a program was hooked into TC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX bpf_link (Linux 6.6+): detached when its fd closes, composes with other programs.
    Tcx,
    /// A direct-action filter on the clsact qdisc, for older kernels.
    Clsact,
}

/// Options for [`SourceFilter::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Most verbose aya-log level the programs emit; `None` compiles logging out at load time
    /// (the program checks a read-only global, so disabled logging costs one branch).
    pub log_level: Option<aya_log::Level>,
    /// Policy dataplane only: a bpffs directory (e.g. `/sys/fs/bpf/calico`) where the maps and
    /// the TCX attachments are pinned, so that they outlive the process: a restarted agent
    /// adopts them and traffic keeps its verdicts (and its tracked flows) meanwhile.
    pub pin_path: Option<std::path::PathBuf>,
    /// Policy dataplane only: maps whose size differs from the object's default, by name
    /// (e.g. `POLICY_VERDICTS`), as FelixConfiguration's `bpfMapSize*` would set them.
    pub map_sizes: Vec<(&'static str, u32)>,
    /// Policy dataplane only: the most conntrack entries one interface may hold (`Some(0)`:
    /// no limit; `None`: a quarter of the table), so that one workload's flood cannot evict
    /// every other workload's flows.
    pub conntrack_per_interface: Option<u32>,
}

/// Packet counters summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterCounters {
    pub passed: u64,
    pub dropped: u64,
}

/// A loaded source filter. Dropping it detaches every attachment it made and frees its maps.
pub struct SourceFilter {
    ebpf: Ebpf,
    deny_v4: LpmTrie<MapData, Ipv4KeyData, SourceDenyEntry>,
    deny_v6: LpmTrie<MapData, Ipv6KeyData, SourceDenyEntry>,
    stats: PerCpuArray<MapData, u64>,
    attachments: Vec<Attachment>,
}

struct Attachment {
    interface: String,
    direction: Direction,
    link: SchedClassifierLinkId,
}

impl SourceFilter {
    /// Loads the program and its maps into the kernel (nothing is attached yet).
    ///
    /// Returns the filter and, when logging is enabled, the logger whose records must be pumped
    /// (see [`crate::spawn_log_pump`]) for them to appear.
    pub fn load(options: &LoadOptions) -> Result<(Self, Option<ProgramLogger>), DataplaneError> {
        let level: u8 = options.log_level.map_or(0, |l| l as u8);
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(SOURCE_FILTER_OBJECT)
            .map_err(DataplaneError::Load)?;
        let logger = match options.log_level {
            Some(_) => Some(EbpfLogger::init(&mut ebpf).map_err(DataplaneError::Logger)?),
            None => None,
        };

        let program: &mut SchedClassifier = program_mut(&mut ebpf)?;
        program.load().map_err(|source| DataplaneError::Program {
            program: SOURCE_FILTER_PROG,
            action: "load",
            source,
        })?;

        let deny_v4 = take(&mut ebpf, SRC_DENY_V4_MAP)?;
        let deny_v6 = take(&mut ebpf, SRC_DENY_V6_MAP)?;
        let stats = take(&mut ebpf, FILTER_STATS_MAP)?;
        Ok((
            Self {
                ebpf,
                deny_v4,
                deny_v6,
                stats,
                attachments: Vec::new(),
            },
            logger,
        ))
    }

    /// Attaches the filter to `interface` (a name in the calling thread's network namespace):
    /// as a TCX link where the kernel has TCX (6.6+), on a clsact qdisc otherwise.
    pub fn attach(
        &mut self,
        interface: &str,
        direction: Direction,
    ) -> Result<AttachMode, DataplaneError> {
        let mode = if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        };
        self.attach_as(interface, direction, mode)?;
        Ok(mode)
    }

    /// Attaches the filter to `interface` in the given `mode` (clsact works on every kernel; TCX
    /// needs 6.6+).
    pub fn attach_as(
        &mut self,
        interface: &str,
        direction: Direction,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        let options = match mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            AttachMode::Clsact => {
                ensure_clsact(interface)?;
                TcAttachOptions::Netlink(Default::default())
            }
        };
        let link = program_mut(&mut self.ebpf)?
            .attach_with_options(interface, direction.into(), options)
            .map_err(|source| DataplaneError::Program {
                program: SOURCE_FILTER_PROG,
                action: "attach",
                source,
            })?;
        tracing::info!(interface, ?direction, ?mode, "source filter attached");
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            direction,
            link,
        });
        Ok(())
    }

    /// Detaches the filter from `interface` in `direction`.
    pub fn detach(&mut self, interface: &str, direction: Direction) -> Result<(), DataplaneError> {
        let index = self
            .attachments
            .iter()
            .position(|a| a.interface == interface && a.direction == direction)
            .ok_or_else(|| DataplaneError::NotAttached {
                what: SOURCE_FILTER_PROG,
                interface: interface.to_owned(),
            })?;
        let attachment = self.attachments.swap_remove(index);
        program_mut(&mut self.ebpf)?
            .detach(attachment.link)
            .map_err(|source| DataplaneError::Program {
                program: SOURCE_FILTER_PROG,
                action: "detach",
                source,
            })
    }

    /// Drops packets whose source lies in `net` from now on. Host bits of `net` are ignored.
    pub fn deny(&mut self, net: IpNet, rule_id: u32) -> Result<(), DataplaneError> {
        let entry = SourceDenyEntry {
            rule_id,
            reserved: 0,
        };
        match net.trunc() {
            IpNet::V4(n) => self
                .deny_v4
                .insert(
                    &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                    entry,
                    0,
                )
                .map_err(map_err(SRC_DENY_V4_MAP, "insert")),
            IpNet::V6(n) => self
                .deny_v6
                .insert(
                    &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                    entry,
                    0,
                )
                .map_err(map_err(SRC_DENY_V6_MAP, "insert")),
        }
    }

    /// Stops denying `net`. Removing a prefix that is not denied is not an error.
    pub fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        let result = match net.trunc() {
            IpNet::V4(n) => self
                .deny_v4
                .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets()))
                .map_err(map_err(SRC_DENY_V4_MAP, "remove")),
            IpNet::V6(n) => self
                .deny_v6
                .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets()))
                .map_err(map_err(SRC_DENY_V6_MAP, "remove")),
        };
        match result {
            Err(DataplaneError::Map {
                source: aya::maps::MapError::KeyNotFound,
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// The deny entry the program would match for a packet from `source`, by longest prefix.
    pub fn lookup(&self, source: IpAddr) -> Result<Option<SourceDenyEntry>, DataplaneError> {
        let found = match source {
            IpAddr::V4(a) => self
                .deny_v4
                .get(&Key::new(32, a.octets()), 0)
                .map_err(map_err(SRC_DENY_V4_MAP, "lookup")),
            IpAddr::V6(a) => self
                .deny_v6
                .get(&Key::new(128, a.octets()), 0)
                .map_err(map_err(SRC_DENY_V6_MAP, "lookup")),
        };
        match found {
            Ok(entry) => Ok(Some(entry)),
            Err(DataplaneError::Map {
                source: aya::maps::MapError::KeyNotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Packets passed and dropped so far, summed over CPUs.
    pub fn counters(&self) -> Result<FilterCounters, DataplaneError> {
        let sum = |stat: FilterStat| -> Result<u64, DataplaneError> {
            let per_cpu = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(map_err(FILTER_STATS_MAP, "read"))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(FilterCounters {
            passed: sum(FilterStat::Passed)?,
            dropped: sum(FilterStat::Dropped)?,
        })
    }

    /// The kernel's id for the loaded program (as `bpftool prog` shows it).
    pub fn program_id(&mut self) -> Result<u32, DataplaneError> {
        let program = program_mut(&mut self.ebpf)?;
        program
            .info()
            .map(|info| info.id())
            .map_err(|source| DataplaneError::Program {
                program: SOURCE_FILTER_PROG,
                action: "info",
                source,
            })
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    classifier(ebpf, SOURCE_FILTER_PROG)
}

/// Names of the programs attached through TCX to `interface` (in the calling thread's network
/// namespace) in `direction`, in run order. Debian's bpftool 7.1 predates TCX and does not list
/// them under `bpftool net`, so this asks the kernel directly.
pub fn tcx_programs(interface: &str, direction: Direction) -> Result<Vec<String>, DataplaneError> {
    let (_revision, programs) =
        SchedClassifier::query_tcx(interface, direction.into()).map_err(|source| {
            DataplaneError::Program {
                program: "tcx query",
                action: "query",
                source,
            }
        })?;
    Ok(programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("<unnamed>").to_owned())
        .collect())
}
