//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is not built here (it needs a nightly-only build of `core` and bpf-linker); instead
//! the build fails with the command to run when the object is missing or older than its sources,
//! so a stale program is never embedded silently.

use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// Where `cargo xtask build-ebpf` leaves the objects: cargo's outputs with their DWARF stripped
/// (BTF kept), rewritten only when cargo rebuilt them, so an unchanged rebuild does not force
/// userspace to rebuild.
const OBJECT_DIR: &str = "target/bpf/bpfel-unknown-none/release";
/// The objects, each embedded as `OUT_DIR/<name>.o`.
const OBJECTS: &[&str] = &["calico_tc", "calico_source_filter"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.join("../..");
    println!("cargo::rerun-if-env-changed=CALICO_BPF_OBJECT_DIR");
    let dir = env::var_os("CALICO_BPF_OBJECT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(OBJECT_DIR));
    let sources = [
        root.join("ebpf/programs/src"),
        root.join("ebpf/programs/Cargo.toml"),
        root.join("ebpf/common/src"),
    ];
    for source in &sources {
        println!("cargo::rerun-if-changed={}", source.display());
    }
    for name in OBJECTS {
        let object = dir.join(format!("{name}.o"));
        println!("cargo::rerun-if-changed={}", object.display());
        let object_mtime = match fs::metadata(&object).and_then(|m| m.modified()) {
            Ok(mtime) => mtime,
            Err(err) => {
                println!(
                    "cargo::error=eBPF object {} is missing ({err}): run `cargo xtask build-ebpf` first",
                    object.display()
                );
                return;
            }
        };
        if let Some((newer, _)) = sources
            .iter()
            .filter_map(|s| newest_mtime(s))
            .filter(|(_, mtime)| *mtime > object_mtime)
            .max_by_key(|(_, mtime)| *mtime)
        {
            println!(
                "cargo::error=eBPF object {} is older than its source {}: run `cargo xtask build-ebpf`",
                object.display(),
                newer.display()
            );
            return;
        }
        let out =
            PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join(format!("{name}.o"));
        fs::copy(&object, &out).expect("copy eBPF object into OUT_DIR");
    }
}

/// The most recently modified file at or below `path`.
fn newest_mtime(path: &Path) -> Option<(PathBuf, SystemTime)> {
    let meta = fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((path.to_path_buf(), meta.modified().ok()?));
    }
    fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| newest_mtime(&entry.path()))
        .max_by_key(|(_, mtime)| *mtime)
}
