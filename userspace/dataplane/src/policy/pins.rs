//! Pinned maps outlive the process, and so the release that made them: before a load reuses
//! a pin, its layout (map type, key and value size, capacity) is checked against the object
//! being loaded, and a layout version kept beside the pins (a `layout-v<N>` directory: bpffs
//! holds no plain files) covers what sizes cannot show.
//!
//! * Same layout: reused as it is. A capacity nobody asked to change (not in the load's map
//!   sizes) counts as the same: a restart without its configuration keeps the pinned size.
//! * Conntrack with a new capacity only: migrated (its entries copied into the new map after
//!   the load, as many as fit), so tracked flows survive a resize.
//! * Anything else that differs, or a different layout version: the pin is removed and the
//!   load creates the map afresh (the agent reinstalls every table; conntrack is kept across
//!   a version change when its own layout did not change).

use std::{collections::HashMap as StdHashMap, path::Path};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use calico_bpf_common::{CtKey, CtValue, CONNTRACK_MAP};

use crate::DataplaneError;

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
    if !found.same_shape(wanted) {
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
    let old = Map::from_map_data(old)
        .and_then(HashMap::<MapData, CtKey, CtValue>::try_from)
        .map_err(|source| DataplaneError::Map {
            map: CONNTRACK_MAP,
            action: "open the previous layout's map",
            source,
        })?;
    let mut copied = 0;
    for entry in old.iter().filter_map(Result::ok) {
        if into.insert(entry.0, entry.1, 0).is_err() {
            break;
        }
        copied += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let ct_new_key = layout(LRU, 52, 16, 1024);
        assert_eq!(
            decide(CONNTRACK_MAP, &ct, &ct_new_key, true, false),
            Decision::Recreate
        );
    }
}
