//! Attaching the classifiers (TCX on 6.6+, clsact before), pinning the links, and adopting a
//! previous run's pinned links in place.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc,
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, TcAttachType,
    },
    util::KernelVersion,
};
use calico_bpf_common::{POLICY_EGRESS_PROG, POLICY_INGRESS_PROG};

use super::{hook_name, Attachment, Hook, PolicyDataplane};
use crate::{
    object::{classifier, ensure_clsact},
    AttachMode, DataplaneError,
};

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
}
