//! Checks on the external programs that tests, benchmarks and the demo run (listed with their
//! Debian packages in `setup::TOOLS`, which setup installs). `cargo xtask test` proves two things
//! before any test runs:
//!
//! * every program the sources run (`Command::new("…")`, `NetNs::exec("…")`, …) is listed here,
//!   so a new dependency cannot slip in unnoticed because a developer machine happens to have it;
//! * every listed program resolves on `PATH` to a file that its package installed, so CI fails
//!   at once when setup does not install one (or something outside the package shadows it).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::Cmd,
    setup::{Tool, TOOLS},
};

/// Both checks; the error lists every problem found, not just the first.
pub(crate) fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let used = programs_in_sources(root)?;
    for (program, file) in &used {
        if !TOOLS.iter().any(|t| t.program == program) {
            problems.push(format!(
                "{file} runs `{program}`, which TOOLS in xtask/src/setup.rs does not list (add it with \
                 its Debian package so setup installs it)"
            ));
        }
    }
    for tool in TOOLS {
        if let Err(e) = installed_by_package(tool) {
            problems.push(format!("{} ({}): {e:#}", tool.program, tool.used_by));
        }
    }
    if !problems.is_empty() {
        bail!(
            "external programs are not all installed by setup:\n  {}",
            problems.join("\n  ")
        );
    }
    println!(
        "tools: {} programs listed, {} distinct ones run by the sources, each installed by its package",
        TOOLS.len(),
        used.iter().map(|(p, _)| p).collect::<BTreeSet<_>>().len()
    );
    Ok(())
}

/// The program resolves on PATH to a file that `dpkg` says belongs to the listed package.
/// A program installed by hand, or shadowed by another copy earlier on PATH, fails: CI on a new
/// machine would not have it.
fn installed_by_package(tool: &Tool) -> Result<()> {
    let path = which(tool.program).with_context(|| {
        format!(
            "not on PATH; Debian package `{}` should provide it",
            tool.package
        )
    })?;
    let owners: BTreeSet<String> = dpkg_names(&path)
        .iter()
        .filter_map(|candidate| {
            Cmd::new("dpkg-query")
                .args(["-S"])
                .arg_path(candidate)
                .output()
                .ok()
        })
        .flat_map(|out| {
            out.lines()
                .filter_map(|l| l.split_once(": ").map(|(pkgs, _)| pkgs.to_owned()))
                .collect::<Vec<_>>()
        })
        .flat_map(|pkgs| {
            pkgs.split(", ")
                .map(|p| p.split(':').next().unwrap_or(p).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    if owners.contains(tool.package) {
        return Ok(());
    }
    if owners.is_empty() {
        bail!(
            "{} is installed by no Debian package (by hand?); `{}` should provide it",
            path.display(),
            tool.package
        );
    }
    bail!(
        "{} belongs to {owners:?}, not to `{}`",
        path.display(),
        tool.package
    )
}

/// The names dpkg may know a file by: as found, resolved, and (Debian 12 merges /usr) with and
/// without the /usr prefix.
fn dpkg_names(path: &Path) -> Vec<PathBuf> {
    let mut names = vec![path.to_path_buf()];
    if let Ok(real) = fs::canonicalize(path) {
        names.push(real);
    }
    for name in names.clone() {
        match name.strip_prefix("/usr") {
            Ok(rest) => names.push(Path::new("/").join(rest)),
            Err(_) => names.push(Path::new("/usr").join(name.strip_prefix("/").unwrap_or(&name))),
        }
    }
    names
}

/// The first `program` on PATH (a path with a slash is taken as it is).
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Directories whose Rust sources run programs on behalf of tests, benchmarks, the demo or the
/// product; xtask itself (which installs them) is left out.
const SOURCE_DIRS: &[&str] = &["tests", "userspace", "cni", "ctl"];

/// The ways the sources start a program by name: the program is the string literal that
/// follows (after any whitespace, as rustfmt may break the line there).
const CALL_SHAPES: &[&str] = &[
    "Command::new(",
    ".exec(",
    ".exec_ok(",
    ".spawn_in(",
    "command_works(",
];

/// (program, file) for every program the sources start by a literal name.
fn programs_in_sources(root: &Path) -> Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for dir in SOURCE_DIRS {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files)?;
        for file in files {
            let text =
                fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let shown = file
                .strip_prefix(root)
                .unwrap_or(&file)
                .display()
                .to_string();
            for program in programs_in(&text) {
                found.push((program, shown.clone()));
            }
        }
    }
    Ok(found)
}

fn programs_in(text: &str) -> Vec<String> {
    let mut programs = Vec::new();
    for shape in CALL_SHAPES {
        for (at, _) in text.match_indices(shape) {
            let rest = text[at + shape.len()..].trim_start();
            if let Some(literal) = rest.strip_prefix('"') {
                if let Some(end) = literal.find('"') {
                    programs.push(literal[..end].to_owned());
                }
            }
        }
    }
    programs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_every_call_shape() {
        let text = r#"
            Command::new("ip").args(["link"]);
            ns.exec("ping", &["-c", "1"]);
            ns.exec_ok(
                "sysctl",
                &["-qw"],
            );
            ns.spawn_in("nc", &["-lk"]);
            command_works("etcd", &["--version"]);
            Command::new(env!("CARGO_BIN_EXE_calicoctl"));
            Command::new("/usr/bin/docker");
        "#;
        assert_eq!(
            programs_in(text),
            ["ip", "/usr/bin/docker", "ping", "sysctl", "nc", "etcd"]
        );
    }

    #[test]
    fn every_program_is_listed_once_and_every_package_installed() {
        let mut names = BTreeSet::new();
        for t in TOOLS {
            assert!(names.insert(t.program), "{} listed twice", t.program);
            assert!(crate::setup::packages().contains(&t.package));
        }
    }

    #[test]
    fn the_workspace_runs_only_listed_programs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let used = programs_in_sources(root).unwrap();
        assert!(
            used.iter().any(|(p, _)| p == "ip"),
            "the scan found nothing"
        );
        for (program, file) in used {
            assert!(
                TOOLS.iter().any(|t| t.program == program),
                "{file} runs `{program}`, not listed in TOOLS"
            );
        }
    }
}
