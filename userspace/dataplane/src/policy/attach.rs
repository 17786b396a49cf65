//! Attaching the classifiers, pinning the links, and adopting a previous run's attachments in
//! place.
//!
//! Workload interfaces get clsact filters (netlink), host interfaces TCX links (6.6+). A new
//! TCX attachment waits for a full RCU grace period while holding RTNL (about 12 ms here, two
//! per interface), so 1,000 workloads took 25 s to attach; a clsact filter costs ~10 µs. The
//! filters stay in the kernel when the agent exits (they hold the program, the maps are
//! pinned), and a restart replaces them in place at the same priority and handle.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};
use calico_bpf_common::{POLICY_EGRESS_PROG, POLICY_INGRESS_PROG};
use nix::errno::Errno;

use super::{hook_name, Attachment, Hook, PolicyDataplane};
use crate::{
    object::{classifier, ensure_clsact},
    AttachMode, DataplaneError,
};

/// Where the policy filters sit among a workload interface's clsact filters: one fixed place,
/// so a restart finds and replaces its predecessor's.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

fn filter_options() -> TcAttachOptions {
    TcAttachOptions::Netlink(NlOptions {
        priority: FILTER_PRIORITY,
        handle: FILTER_HANDLE,
        classid: None,
    })
}

/// Attaches `program` as the policy filter of `interface` at `attach_type`, replacing one that
/// is there already (a previous run's) in one netlink request, without a gap.
fn attach_filter(
    program: &mut SchedClassifier,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<SchedClassifierLink, ProgramError> {
    let id = match program.attach_with_options(interface, attach_type, filter_options()) {
        Ok(id) => id,
        Err(ProgramError::TcError(tc::TcError::NetlinkError(e)))
            if e.raw_os_error().map(Errno::from_raw) == Some(Errno::EEXIST) =>
        {
            let existing = SchedClassifierLink::attached(
                interface,
                attach_type,
                FILTER_PRIORITY,
                FILTER_HANDLE,
                None,
            )
            .map_err(|e| ProgramError::TcError(tc::TcError::IoError(e)))?;
            program.attach_to_link(existing)?
        }
        Err(e) => return Err(e),
    };
    program.take_link(id)
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

impl PolicyDataplane {
    /// Attaches both classifiers to workload interface `interface` (in the calling thread's
    /// network namespace) as clsact filters, replacing a previous run's in place. With a pin
    /// path they stay in the kernel when this process ends; without one they are detached
    /// when the dataplane is dropped.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        self.attach_as(interface, false)
    }

    /// Attaches to a host interface (for a HostEndpoint): TCX links on 6.6+, pinned under
    /// `<pin path>/links/` and replacing a previous run's there without a gap (the new program
    /// is attached first, then the old attachment released). There the endpoint is on the other
    /// side: what the interface receives goes *to* the endpoint (the host), so each classifier
    /// sits on the opposite hook from a workload veth's. Policy keys are the same: the
    /// endpoint's ingress policy under [`Hook::Egress`], its egress policy under
    /// [`Hook::Ingress`].
    pub fn attach_host(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        self.attach_as(interface, true)
    }

    fn attach_as(&mut self, interface: &str, host: bool) -> Result<AttachMode, DataplaneError> {
        // Host interfaces only: workload interfaces get filters whatever the kernel (see the
        // module comment).
        let tcx = host && KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            ensure_clsact(interface)?;
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
        if !tcx {
            for (name, attach_type, hook) in [
                (at_ingress, TcAttachType::Ingress, Hook::Ingress),
                (at_egress, TcAttachType::Egress, Hook::Egress),
            ] {
                let link = attach_filter(classifier(&mut self.ebpf, name)?, interface, attach_type)
                    .map_err(|source| DataplaneError::Program {
                        program: name,
                        action: "attach",
                        source,
                    })?;
                let attachment = match &self.pin_path {
                    Some(dir) => {
                        // Kept in the kernel past this process, like a pinned link: the
                        // handle is let go without detaching (it holds no fd).
                        std::mem::forget(link);
                        // A TCX link an older release pinned here would run first: it goes
                        // now that the filter is in.
                        release_pin(&link_pin(dir, ifindex, hook));
                        Attachment::Filter {
                            interface: interface.to_owned(),
                            attach_type,
                        }
                    }
                    None => Attachment::Owned(link),
                };
                self.links.insert((ifindex, hook), attachment);
            }
            return Ok(AttachMode::Clsact);
        }
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
    /// interface that is going away or no longer managed), in the calling thread's network
    /// namespace. Unknown indexes are fine.
    pub fn forget_interface(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for hook in [Hook::Ingress, Hook::Egress] {
            match self.links.remove(&(ifindex, hook)) {
                Some(Attachment::Pinned(path)) => release_pin(&path),
                Some(Attachment::Owned(_)) => {}
                Some(Attachment::Filter {
                    interface,
                    attach_type,
                }) => {
                    // Gone with the interface, usually; if it is still there (by that index),
                    // detached.
                    let same = nix::net::if_::if_nametoindex(interface.as_str()) == Ok(ifindex);
                    if let (true, Ok(link)) = (
                        same,
                        SchedClassifierLink::attached(
                            &interface,
                            attach_type,
                            FILTER_PRIORITY,
                            FILTER_HANDLE,
                            None,
                        ),
                    ) {
                        drop(link);
                    }
                }
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
}
