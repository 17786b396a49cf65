//! Building the eBPF programs: a separate cargo project built for `bpfel-unknown-none` with a
//! freshly built `core` (hence RUSTC_BOOTSTRAP) and linked by bpf-linker.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::{cmd::cargo, cmd::Cmd, step};

const TARGET: &str = "bpfel-unknown-none";
/// Output directory, shared with the userspace build's `target/` but apart from host artifacts.
const TARGET_DIR: &str = "target/bpf";
/// The program binaries the crate defines; each becomes one ELF object.
const OBJECTS: &[&str] = &["calico_tc", "calico_source_filter"];

/// Builds the programs in release mode and writes each object's DWARF-stripped copy
/// (`<name>.o`, BTF kept: the kernel and aya need only that), which userspace embeds. Returns
/// the path of the policy object.
pub(crate) fn run(root: &Path) -> Result<PathBuf> {
    step("cargo xtask build-ebpf");
    bpf_cargo(root, &["build", "--release"]).run()?;
    let dir = root.join(TARGET_DIR).join(TARGET).join("release");
    let mut stripped = Vec::new();
    for object in OBJECTS {
        let built = dir.join(object);
        ensure!(
            built.is_file(),
            "build-ebpf produced no {}",
            built.display()
        );
        let out = dir.join(format!("{object}.o"));
        // Only when cargo rebuilt it: an unchanged copy keeps its mtime, and userspace its build.
        if modified(&out).is_none() || modified(&built) > modified(&out) {
            Cmd::new("llvm-objcopy")
                .args(["--strip-debug"])
                .arg_path(&built)
                .arg_path(&out)
                .run()?;
        }
        // Cargo rebuilt it as needed; an object whose own sources did not change is current
        // all the same, and says so to the userspace build's staleness check (which cannot
        // tell which sources belong to which object).
        if modified(&out) < newest_source(root) {
            std::fs::File::options()
                .write(true)
                .open(&out)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                .with_context(|| format!("touching {}", out.display()))?;
        }
        stripped.push(out);
    }
    Ok(stripped.swap_remove(0))
}

/// The newest modification time among the eBPF crates' sources.
fn newest_source(root: &Path) -> Option<std::time::SystemTime> {
    ["ebpf/programs/src", "ebpf/common/src"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).into_iter().flatten())
        .filter_map(|entry| modified(&entry.ok()?.path()))
        .max()
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Clippy over the eBPF crate, for the BPF target.
pub(crate) fn clippy(root: &Path) -> Result<()> {
    bpf_cargo(root, &["clippy", "--release"])
        .args(["--", "-D", "warnings"])
        .run()
}

/// Runs a target-independent cargo subcommand (e.g. fmt) in the eBPF crate.
pub(crate) fn cargo_in_programs(root: &Path, args: &[&str]) -> Result<()> {
    cargo(&root.join("ebpf/programs")).args(args).run()
}

fn bpf_cargo(root: &Path, args: &[&str]) -> Cmd {
    cargo(&root.join("ebpf/programs"))
        .args(args)
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg_path(&root.join(TARGET_DIR))
        // build-std is unstable; the stable toolchain allows it with this switch.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF lets the kernel (and bpftool) show map and program types.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\u{1f}-Clink-arg=--btf",
        )
}
