use aya::{programs::SchedClassifier, Ebpf};

use nix::errno::Errno;

use crate::DataplaneError;

/// The policy classifiers' eBPF object, embedded at build time (see build.rs for where it comes
/// from).
pub static TC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/calico_tc.o"));

/// The source filter's own object: loading it creates only its maps.
pub static SOURCE_FILTER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/calico_source_filter.o"));

pub(crate) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Program {
        program: name,
        action: "lookup in object",
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: name,
            action: "type check",
            source,
        })
}

pub(crate) fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DataplaneError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::MapType {
        map: name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    M::try_from(map).map_err(|source| DataplaneError::MapType { map: name, source })
}

/// Names the map and the action of a map error.
pub(crate) fn map_err(
    map: &'static str,
    action: &'static str,
) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map {
        map,
        action,
        source,
    }
}

/// Adds the clsact qdisc that pre-TCX attachment needs; one already there (another program's,
/// or an earlier run's) is shared.
pub(crate) fn ensure_clsact(interface: &str) -> Result<(), DataplaneError> {
    match aya::programs::tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if e.raw_os_error().map(Errno::from_raw) == Some(Errno::EEXIST) =>
        {
            Ok(())
        }
        Err(source) => Err(DataplaneError::Interface {
            interface: interface.to_owned(),
            action: "adding the clsact qdisc",
            source,
        }),
    }
}

/// Whether a map error says the key was not there: aya reports a failed lookup as
/// `KeyNotFound`, a failed delete as the syscall's ENOENT.
pub(crate) fn key_missing(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => {
            s.io_error.raw_os_error().map(Errno::from_raw) == Some(Errno::ENOENT)
        }
        _ => false,
    }
}
