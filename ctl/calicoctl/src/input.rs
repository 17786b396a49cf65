//! Reading resources from `-f FILE|DIR|-`: every document of every file is read and checked
//! before anything is written, and every problem is reported with its file and position.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use calico_model::{parse_documents, validate, DocumentError, Resource};

/// A resource and where it came from (for messages).
pub struct Sourced {
    pub source: String,
    pub resource: Resource,
}

/// Reads `-f` input: a file, every `.yaml`/`.yml`/`.json` file of a directory (sorted), or
/// stdin for `-`.
pub fn read(path: &str) -> Result<Vec<(String, String)>> {
    if path == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        return Ok(vec![("<stdin>".to_owned(), text)]);
    }
    let p = Path::new(path);
    let meta = std::fs::metadata(p).with_context(|| format!("{path}: cannot read"))?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("{path}: cannot list directory"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{path}: directory holds no .yaml, .yml or .json file");
        }
        files
    } else {
        vec![p.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("{}: cannot read", f.display()))?;
            Ok((f.display().to_string(), text))
        })
        .collect()
}

/// Parses, namespaces and validates every document; returns them all, or every problem found.
pub fn load(path: &str, namespace: Option<&str>) -> Result<Vec<Sourced>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (source, text) in read(path)? {
        match parse_documents(&text) {
            Err(e @ DocumentError::Syntax { .. }) => problems.push(format!("{source}: {e}")),
            Err(e) => problems.push(format!("{source}: {e}")),
            Ok(resources) => {
                if resources.is_empty() {
                    problems.push(format!("{source}: no resources found"));
                }
                for mut resource in resources {
                    if let Err(e) = set_namespace(&mut resource, namespace) {
                        problems.push(format!("{source}: {e}"));
                        continue;
                    }
                    if let Err(errors) = validate(&resource) {
                        for e in errors.0 {
                            problems.push(format!(
                                "{source}: {} {}: {e}",
                                resource.kind(),
                                describe(&resource)
                            ));
                        }
                        continue;
                    }
                    for field in calico_model::inert_fields(&resource) {
                        eprintln!(
                            "warning: {source}: {} {}: {field} is stored, but has no effect in this dataplane",
                            resource.kind(),
                            describe(&resource)
                        );
                    }
                    out.push(Sourced {
                        source: source.clone(),
                        resource,
                    });
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "nothing was applied: {} problem(s) in the input:\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(out)
}

/// Namespaced kinds take `--namespace` (default `default`) when the document has none; a
/// document's own namespace must agree with an explicit `--namespace`.
pub fn set_namespace(resource: &mut Resource, namespace: Option<&str>) -> Result<()> {
    let kind = resource.kind();
    let meta = resource.metadata_mut();
    if !kind.is_namespaced() {
        return Ok(());
    }
    match (&meta.namespace, namespace) {
        (Some(own), Some(flag)) if own != flag => bail!(
            "{kind} {}: namespace `{own}` in the document does not match --namespace `{flag}`",
            meta.name
        ),
        (Some(_), _) => {}
        (None, flag) => meta.namespace = Some(flag.unwrap_or("default").to_owned()),
    }
    Ok(())
}

/// `namespace/name` or `name`.
pub fn describe(resource: &Resource) -> String {
    match resource.namespace() {
        Some(ns) if resource.kind().is_namespaced() => format!("{ns}/{}", resource.name()),
        _ => resource.name().to_owned(),
    }
}
