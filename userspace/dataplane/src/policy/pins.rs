//! Pinned maps outlive the process, and so the release that made them: before a load reuses
//! a pin, its layout (map type, key and value size, capacity) is checked against the object
//! being loaded, and a layout version kept beside the pins (a `layout-v<N>` directory: bpffs
//! holds no plain files) covers what sizes cannot show.
//!
//! * Same layout: reused as it is. A capacity nobody asked to change (not in the load's map
//!   sizes) counts as the same: a restart without its configuration keeps the pinned size.
//! * Conntrack with a new capacity, or with the shorter value of an earlier release (its value
//!   only grows at the end, so an old value is a prefix of the new one): migrated (its entries
//!   copied into the new map after the load, as many as fit, new fields zero), so tracked
//!   flows survive a resize and an upgrade.
//! * Anything else that differs, or a different layout version: the pin is removed and the
//!   load creates the map afresh (the agent reinstalls every table; conntrack is kept across
//!   a version change when its own layout did not change).

use std::{collections::HashMap as StdHashMap, path::Path};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use calico_bpf_common::{CtKey, CtValue, CONNTRACK_MAP};

use crate::DataplaneError;

/// The conntrack value of layouts up to 5 (before the forwarding cache): `CtValue`'s first
/// fields.
const CT_VALUE_V5_SIZE: u32 = 24;

/// Bump when a pinned map's meaning changes in a way its sizes do not show.
pub(super) const LAYOUT_VERSION: u32 = 5;
const VERSION_PREFIX: &str = "layout-v";

/// Maps earlier layouts pinned that this one no longer has (v3's per-program peer tables,
/// replaced by nets tables and shared IP sets): their pins go.
const RETIRED_MAPS: [&str; 1] = ["POLICY_PEERS"];

/// A map's layout as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl Layout {
    fn of_pin(path: &Path) -> Option<Self> {
        let info = MapInfo::from_pin(path).ok()?;
        Some(Self {
            map_type: info.map_type().ok()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        })
    }

    fn same_shape(&self, other: &Self) -> bool {
        (self.map_type, self.key_size, self.value_size)
            == (other.map_type, other.key_size, other.value_size)
    }
}

/// What to do with one existing pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    Reuse,
    /// Keep it open (the pin goes), copy its entries into the new map after the load.
    Migrate,
    Recreate,
}

/// The decision for map `name` whose pin has layout `found`, when the object wants `wanted`;
/// `sized` when the load asks for a capacity for it.
pub(super) fn decide(
    name: &str,
    found: &Layout,
    wanted: &Layout,
    same_version: bool,
    sized: bool,
) -> Decision {
    let conntrack = name == CONNTRACK_MAP;
    let older_conntrack = conntrack
        && (found.map_type, found.key_size) == (wanted.map_type, wanted.key_size)
        && found.value_size == CT_VALUE_V5_SIZE
        && wanted.value_size > found.value_size;
    if older_conntrack {
        Decision::Migrate
    } else if !found.same_shape(wanted) {
        Decision::Recreate
    } else if sized && found.max_entries != wanted.max_entries {
        if conntrack {
            Decision::Migrate
        } else {
            Decision::Recreate
        }
    } else if same_version || conntrack {
        Decision::Reuse
    } else {
        Decision::Recreate
    }
}

/// The layouts the object asks for, capacities overridden by `sizes`.
pub(super) fn wanted_layouts(
    object: &[u8],
    sizes: &[(&'static str, u32)],
) -> Result<StdHashMap<String, Layout>, DataplaneError> {
    let parsed = aya_obj::Object::parse(object)
        .map_err(|e| DataplaneError::Layout(format!("parsing the eBPF object: {e}")))?;
    Ok(parsed
        .maps
        .iter()
        .map(|(name, map)| {
            let max_entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, s)| *s);
            (
                name.clone(),
                Layout {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                },
            )
        })
        .collect())
}

/// Checks every pin under `dir` that the load would reuse; removes what does not fit.
/// Returns the maps to migrate, opened before their pins went (bpffs cannot rename), by name.
pub(super) fn prepare(
    dir: &Path,
    names: &[&'static str],
    wanted: &StdHashMap<String, Layout>,
    sized: &[&str],
) -> Result<Vec<(&'static str, MapData)>, DataplaneError> {
    let marker = dir.join(format!("{VERSION_PREFIX}{LAYOUT_VERSION}"));
    let same_version = marker.is_dir();
    let mut migrating = Vec::new();
    for name in names {
        let pin = dir.join(name);
        let Some(found) = Layout::of_pin(&pin) else {
            continue;
        };
        let Some(want) = wanted.get(*name) else {
            continue;
        };
        let decision = decide(name, &found, want, same_version, sized.contains(name));
        match decision {
            Decision::Reuse => continue,
            Decision::Migrate => {
                let old = MapData::from_pin(&pin).map_err(|source| DataplaneError::Map {
                    map: name,
                    action: "open the previous layout's map",
                    source,
                })?;
                unpin(&pin)?;
                migrating.push((*name, old));
            }
            Decision::Recreate => unpin(&pin)?,
        }
        tracing::warn!(map = name, ?found, wanted = ?want, same_version, ?decision, "pinned map layout differs from this release's");
    }
    for name in RETIRED_MAPS {
        let pin = dir.join(name);
        if pin.exists() {
            unpin(&pin)?;
            tracing::info!(
                map = name,
                "removed the pin of a map this release no longer has"
            );
        }
    }
    // The pins now follow this release's layout: only its marker stays.
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(VERSION_PREFIX) && entry.path() != marker {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
    std::fs::create_dir_all(&marker).map_err(|source| DataplaneError::Pin {
        path: marker.clone(),
        action: "mark the layout version",
        source,
    })?;
    Ok(migrating)
}

fn unpin(pin: &Path) -> Result<(), DataplaneError> {
    std::fs::remove_file(pin).map_err(|source| DataplaneError::Pin {
        path: pin.to_path_buf(),
        action: "remove (layout changed)",
        source,
    })
}

/// Copies the tracked flows of the previous layout's conntrack map into `into` (as many as
/// fit); the old map goes when it is dropped. Returns how many were copied.
pub(super) fn migrate_conntrack(
    old: MapData,
    into: &mut HashMap<MapData, CtKey, CtValue>,
) -> Result<usize, DataplaneError> {
    let open_err = |source| DataplaneError::Map {
        map: CONNTRACK_MAP,
        action: "open the previous layout's map",
        source,
    };
    let value_size = old.info().map(|i| i.value_size()).unwrap_or(0);
    let old = Map::from_map_data(old).map_err(open_err)?;
    if value_size == CT_VALUE_V5_SIZE {
        let old = HashMap::<MapData, CtKey, [u8; CT_VALUE_V5_SIZE as usize]>::try_from(old)
            .map_err(open_err)?;
        let entries = old.iter().filter_map(Result::ok);
        Ok(copy_flows(
            entries.map(|(k, v5)| (k, ct_value_from_v5(v5))),
            into,
        ))
    } else {
        let old = HashMap::<MapData, CtKey, CtValue>::try_from(old).map_err(open_err)?;
        Ok(copy_flows(old.iter().filter_map(Result::ok), into))
    }
}

/// Inserts `flows` into `into` until it is full; returns how many went in.
fn copy_flows(
    flows: impl Iterator<Item = (CtKey, CtValue)>,
    into: &mut HashMap<MapData, CtKey, CtValue>,
) -> usize {
    flows
        .take_while(|(key, value)| into.insert(key, value, 0).is_ok())
        .count()
}

/// A layout-5 conntrack value, as this release's (no forwarding cached).
fn ct_value_from_v5(v5: [u8; CT_VALUE_V5_SIZE as usize]) -> CtValue {
    let u64_at = |i: usize| u64::from_ne_bytes(v5[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_ne_bytes(v5[i..i + 4].try_into().expect("4 bytes"));
    CtValue {
        created_ns: u64_at(0),
        last_seen_ns: u64_at(8),
        flags: u32_at(16),
        rule: u32_at(20),
        ..CtValue::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_5_conntrack_value_keeps_its_fields() {
        let mut v5 = [0u8; CT_VALUE_V5_SIZE as usize];
        v5[..8].copy_from_slice(&7u64.to_ne_bytes());
        v5[8..16].copy_from_slice(&9u64.to_ne_bytes());
        v5[16..20].copy_from_slice(&3u32.to_ne_bytes());
        v5[20..].copy_from_slice(&42u32.to_ne_bytes());
        let v = ct_value_from_v5(v5);
        assert_eq!(
            (v.created_ns, v.last_seen_ns, v.flags, v.rule),
            (7, 9, 3, 42)
        );
        assert_eq!((v.fwd_ns, v.fwd_ifindex), (0, 0));
    }

    const HASH: u32 = 1;
    const LRU: u32 = 9;

    fn layout(map_type: u32, key: u32, value: u32, max: u32) -> Layout {
        Layout {
            map_type,
            key_size: key,
            value_size: value,
            max_entries: max,
        }
    }

    #[test]
    fn decisions() {
        let eps = layout(HASH, 8, 8, 16384);
        assert_eq!(
            decide("POLICY_EPS", &eps, &eps, true, false),
            Decision::Reuse
        );
        assert_eq!(
            decide("POLICY_EPS", &eps, &eps, false, false),
            Decision::Recreate
        );
        let other_key = layout(HASH, 4, 8, 16384);
        assert_eq!(
            decide("POLICY_EPS", &other_key, &eps, true, false),
            Decision::Recreate
        );
        let bigger = layout(HASH, 8, 8, 65536);
        assert_eq!(
            decide("POLICY_EPS", &eps, &bigger, true, true),
            Decision::Recreate
        );
        // Nobody asked for another size: the pinned one stays.
        assert_eq!(
            decide("POLICY_EPS", &eps, &bigger, true, false),
            Decision::Reuse
        );

        let ct = layout(LRU, 48, 16, 1024);
        let ct_bigger = layout(LRU, 48, 16, 512 * 1024);
        assert_eq!(
            decide(CONNTRACK_MAP, &ct, &ct_bigger, true, true),
            Decision::Migrate
        );
        assert_eq!(
            decide(CONNTRACK_MAP, &ct, &ct_bigger, false, true),
            Decision::Migrate
        );
        assert_eq!(
            decide(CONNTRACK_MAP, &ct, &ct_bigger, true, false),
            Decision::Reuse
        );
        assert_eq!(
            decide(CONNTRACK_MAP, &ct, &ct, false, false),
            Decision::Reuse
        );
        // An earlier release's shorter value: migrated, whatever the version marker says.
        let ct_v5 = layout(LRU, 44, CT_VALUE_V5_SIZE, 1024);
        let ct_now = layout(LRU, 44, 48, 1024);
        assert_eq!(
            decide(CONNTRACK_MAP, &ct_v5, &ct_now, false, false),
            Decision::Migrate
        );
        assert_eq!(
            decide(CONNTRACK_MAP, &ct_now, &ct_v5, false, false),
            Decision::Recreate
        );
        assert_eq!(
            decide("POLICY_EPS", &ct_v5, &ct_now, false, false),
            Decision::Recreate
        );
        let ct_new_key = layout(LRU, 52, 16, 1024);
        assert_eq!(
            decide(CONNTRACK_MAP, &ct, &ct_new_key, true, false),
            Decision::Recreate
        );
    }
}
