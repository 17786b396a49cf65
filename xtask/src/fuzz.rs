//! `cargo xtask fuzz`: every fuzz target of `fuzz/` for a bounded time each, starting from the
//! committed seed corpus. Any panic fails the task and leaves the input that caused it under
//! `fuzz/artifacts/<target>/`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{cmd::cargo, step};

/// The targets, each with the input it takes.
pub(crate) const TARGETS: &[(&str, &str)] = &[
    (
        "cni_invocation",
        "CNI environment + network config on stdin",
    ),
    ("calicoctl_documents", "calicoctl -f documents (YAML/JSON)"),
    ("docker_request", "Docker driver call + JSON body"),
    ("selector_parse", "selector expressions"),
];

/// Flags for both build and run, so `run` reuses what `build` made: release with debug
/// assertions (overflow checks). No sanitizer: the targets are safe Rust, and the sanitizer
/// build would double the time for no finding it could make.
const FLAGS: &[&str] = &["-O", "--debug-assertions", "--sanitizer", "none"];

pub(crate) fn run(root: &Path, seconds: u32, only: &[String]) -> Result<()> {
    let targets: Vec<&str> = if only.is_empty() {
        TARGETS.iter().map(|(t, _)| *t).collect()
    } else {
        for t in only {
            if !TARGETS.iter().any(|(known, _)| known == t) {
                bail!(
                    "unknown fuzz target `{t}` (known: {})",
                    TARGETS
                        .iter()
                        .map(|(t, _)| *t)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        only.iter().map(String::as_str).collect()
    };
    step("building the fuzz targets (cargo fuzz build)");
    cargo(root)
        .args(["fuzz", "build"])
        .args(FLAGS)
        .env("RUSTC_BOOTSTRAP", "1")
        .run()?;
    step(&format!("fuzzing, {seconds} s per target"));
    println!(
        "{:<22} {:<42} {:>12} {:>9}",
        "target", "input", "executions", "exec/s"
    );
    for target in targets {
        let (runs, elapsed) = fuzz_one(root, target, seconds)?;
        let input = TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map_or("", |(_, i)| *i);
        println!(
            "{target:<22} {input:<42} {runs:>12} {:>9.0}",
            runs as f64 / elapsed.max(0.001)
        );
    }
    println!("fuzz: no target panicked");
    Ok(())
}

/// One target for `seconds`: new inputs go to a scratch corpus beside the build, so the
/// committed seeds stay as they are. Returns (executions, seconds taken).
fn fuzz_one(root: &Path, target: &str, seconds: u32) -> Result<(u64, f64)> {
    let fuzz = root.join("fuzz");
    let scratch = fuzz.join("target").join("scratch-corpus").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    for dir in [&scratch, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = Instant::now();
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run"])
        .args(FLAGS)
        .arg(target)
        .arg(&scratch)
        .arg(fuzz.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A single input that takes this long is a finding too (quadratic parsing).
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        bail!(
            "fuzz target {target} failed ({}); the input is under {}:\n{}",
            out.status,
            artifacts.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // libFuzzer's last word: "Done 3601963 runs in 21 second(s)".
    let runs = log
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("Done ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("fuzz target {target} printed no run count:\n{log}"))?;
    Ok((runs, started.elapsed().as_secs_f64()))
}
