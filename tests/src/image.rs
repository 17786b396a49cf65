//! A local container image: a busybox-static root filesystem as a tar, for `podman import` /
//! `docker import` (nothing is downloaded).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Result};

/// Writes `<dir>/rootfs.tar` holding /bin/busybox and the applets tests use; returns its path.
pub fn busybox_rootfs_tar(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
    for tool in ["sh", "ping", "ip", "sleep", "nc"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool))?;
    }
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar of the busybox rootfs failed");
    Ok(tar)
}
