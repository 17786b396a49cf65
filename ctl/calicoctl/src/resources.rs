//! create, apply, replace, delete, get, patch, label, version.

use std::{collections::BTreeSet, path::Path, process::ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use calico_datastore::{BatchWrite, Datastore, DatastoreError};
use calico_model::{validate, Kind, Resource};

use crate::{
    config, dryrun,
    input::{self, describe},
    output::{self, Format},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Apply,
    Replace,
    Delete,
}

impl Action {
    fn verb(self) -> (&'static str, &'static str) {
        match self {
            Action::Create => ("create", "created"),
            Action::Apply => ("apply", "applied"),
            Action::Replace => ("replace", "replaced"),
            Action::Delete => ("delete", "deleted"),
        }
    }
}

pub async fn connect(config_path: Option<&Path>) -> Result<Datastore> {
    let cfg = config::load(config_path)?;
    Datastore::connect(&cfg)
        .await
        .map_err(|e| anyhow!("cannot reach the datastore: {e}"))
}

pub fn parse_kind(name: &str) -> Result<Kind> {
    Kind::from_name(name).ok_or_else(|| {
        anyhow!(
            "unknown resource type `{name}` (known: {})",
            Kind::ALL
                .iter()
                .map(|k| k.plural())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Writes every resource of `-f` input; reports each failure and a summary.
pub async fn write(
    config_path: Option<&Path>,
    action: Action,
    path: &str,
    namespace: Option<&str>,
    skip: bool,
    dry_run: bool,
) -> Result<ExitCode> {
    // Everything is read and validated before anything is written.
    let docs = input::load(path, namespace)?;
    let store = connect(config_path).await?;
    let (verb, done) = action.verb();
    let mut succeeded = 0;
    let mut failures = Vec::new();
    let kinds: BTreeSet<Kind> = docs.iter().map(|d| d.resource.kind()).collect();
    if action != Action::Delete && kinds.contains(&Kind::IPPool) {
        check_pool_overlaps(&store, &docs).await?;
    }
    if dry_run {
        let resources: Vec<(String, Resource)> = docs
            .iter()
            .map(|d| (d.source.clone(), d.resource.clone()))
            .collect();
        return dryrun::preview(&store, action, &resources, skip).await;
    }
    let noun = match kinds.iter().next() {
        Some(k) if kinds.len() == 1 => format!("'{k}' resource(s)"),
        _ => "resource(s)".to_owned(),
    };
    // Create, apply and replace go in whole or not at all (one transaction where it fits);
    // duplicate names in one file are refused.
    let batch = match action {
        Action::Create => Some(BatchWrite::Create),
        Action::Apply => Some(BatchWrite::Apply),
        Action::Replace => Some(BatchWrite::Replace),
        Action::Delete => None,
    };
    if let Some(how) = batch {
        let resources: Vec<_> = docs.iter().map(|d| d.resource.clone()).collect();
        return match store.write_batch(how, &resources, skip).await {
            Ok(_) => {
                println!("Successfully {done} {} {noun}", docs.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(failures) => {
                for f in &failures {
                    let doc = &docs[f.index.min(docs.len() - 1)];
                    let r = &doc.resource;
                    eprintln!(
                        "Failed to {verb} {} '{}' ({}): {}",
                        r.kind(),
                        describe(r),
                        doc.source,
                        f.error
                    );
                }
                eprintln!(
                    "Nothing was {done}: {} of {} {noun} cannot be written as they are",
                    failures.len(),
                    docs.len()
                );
                Ok(ExitCode::FAILURE)
            }
        };
    }
    for doc in &docs {
        let r = doc.resource.clone();
        let (kind, what) = (r.kind(), describe(&r));
        let result = match action {
            Action::Create => store.create(r).await.map(drop),
            Action::Apply => store.apply(r).await.map(drop),
            Action::Replace => store.update(r).await.map(drop),
            Action::Delete => {
                let rv = r.metadata().resource_version.clone();
                store
                    .delete(kind, r.namespace(), r.name(), rv.as_deref())
                    .await
                    .map(drop)
            }
        };
        match result {
            Ok(()) => succeeded += 1,
            Err(DatastoreError::AlreadyExists { .. }) if skip && action == Action::Create => {
                succeeded += 1
            }
            Err(DatastoreError::NotFound { .. }) if skip && action == Action::Delete => {
                succeeded += 1
            }
            Err(e) => failures.push(format!(
                "Failed to {verb} {kind} '{what}' ({}): {e}",
                doc.source
            )),
        }
    }
    if failures.is_empty() {
        println!("Successfully {done} {succeeded} {noun}");
        return Ok(ExitCode::SUCCESS);
    }
    for f in &failures {
        eprintln!("{f}");
    }
    if succeeded > 0 {
        eprintln!(
            "Partial success: {done} {succeeded} of {} {noun}; {} failed",
            docs.len(),
            failures.len()
        );
    } else {
        eprintln!("Failed to {verb} any of {} {noun}", docs.len());
    }
    Ok(ExitCode::FAILURE)
}

/// Pools may not overlap (each other, or the pools already stored under other names);
/// nothing is written when they do.
async fn check_pool_overlaps(store: &Datastore, docs: &[input::Sourced]) -> Result<()> {
    let cidr = |r: &Resource| match r {
        Resource::IPPool(p) => p
            .spec
            .cidr
            .parse::<ipnet::IpNet>()
            .ok()
            .map(|c| (p.metadata.name.clone(), c)),
        _ => None,
    };
    let incoming: Vec<(String, ipnet::IpNet)> =
        docs.iter().filter_map(|d| cidr(&d.resource)).collect();
    let (stored, _) = store
        .list(Kind::IPPool, None)
        .await
        .map_err(|e| anyhow!("reading the existing IP pools: {e}"))?;
    let mut all = incoming.clone();
    all.extend(
        stored
            .iter()
            .filter_map(cidr)
            .filter(|(name, _)| !incoming.iter().any(|(n, _)| n == name)),
    );
    let problems = calico_model::pool_overlaps(&all);
    if !problems.is_empty() {
        bail!("nothing was written: {}", problems.join("; "));
    }
    Ok(())
}

fn namespace_for(kind: Kind, namespace: Option<&str>) -> Option<String> {
    kind.is_namespaced()
        .then(|| namespace.unwrap_or("default").to_owned())
}

fn shown(kind: Kind, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{kind}({ns}/{name})"),
        None => format!("{kind}({name})"),
    }
}

pub async fn delete_named(
    config_path: Option<&Path>,
    kind: &str,
    names: &[String],
    namespace: Option<&str>,
    skip_not_exists: bool,
    dry_run: bool,
) -> Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let store = connect(config_path).await?;
    let ns = namespace_for(kind, namespace);
    if dry_run {
        return dryrun::preview_delete(&store, kind, ns.as_deref(), names, skip_not_exists).await;
    }
    let mut failed = false;
    let mut deleted = 0;
    for name in names {
        match store.delete(kind, ns.as_deref(), name, None).await {
            Ok(_) => deleted += 1,
            Err(e @ DatastoreError::DeletedUnreadable { .. }) => {
                eprintln!("warning: {e}");
                deleted += 1;
            }
            Err(DatastoreError::NotFound { .. }) if skip_not_exists => deleted += 1,
            Err(DatastoreError::NotFound { .. }) => {
                failed = true;
                eprintln!(
                    "resource does not exist: {}",
                    shown(kind, ns.as_deref(), name)
                );
            }
            Err(e) => {
                failed = true;
                eprintln!("Failed to delete {}: {e}", shown(kind, ns.as_deref(), name));
            }
        }
    }
    if deleted > 0 {
        println!("Successfully deleted {deleted} '{kind}' resource(s)");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn get(
    config_path: Option<&Path>,
    kind: &str,
    names: &[String],
    format: &Format,
    namespace: Option<&str>,
    all_namespaces: bool,
) -> Result<ExitCode> {
    let kind = parse_kind(kind)?;
    if all_namespaces && !names.is_empty() {
        bail!("-A/--all-namespaces lists every object; it cannot be combined with names");
    }
    let store = connect(config_path).await?;
    let ns = namespace_for(kind, namespace);
    let mut found = Vec::new();
    let mut missing = false;
    if names.is_empty() {
        let scope = if all_namespaces { None } else { ns.as_deref() };
        // A value that cannot be read is named, and hides none of the others.
        let (each, _) = store.list_each(kind, scope).await?;
        let mut list = Vec::new();
        for item in each {
            match item {
                Ok(resource) => list.push(resource),
                Err(e) => {
                    missing = true;
                    eprintln!("{e}");
                }
            }
        }
        list.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        found = list;
    } else {
        for name in names {
            match store.get(kind, ns.as_deref(), name).await {
                Ok(r) => found.push(r),
                Err(DatastoreError::NotFound { .. }) => {
                    missing = true;
                    eprintln!(
                        "resource does not exist: {}",
                        shown(kind, ns.as_deref(), name)
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    // One name asks for an object; no name or several ask for a list (even of one or none).
    let request = if names.len() == 1 {
        output::Request::One
    } else {
        output::Request::List
    };
    if !found.is_empty() || request == output::Request::List {
        print!(
            "{}",
            output::render(kind, &found, format, all_namespaces, request)?
        );
    }
    Ok(if missing {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let map = target.as_object_mut().expect("made an object above");
            for (key, value) in fields {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

pub async fn patch(
    config_path: Option<&Path>,
    kind: &str,
    name: &str,
    patch: &str,
    namespace: Option<&str>,
) -> Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let patch: serde_json::Value = serde_json::from_str(patch).map_err(|e| {
        anyhow!(
            "--patch is not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        )
    })?;
    let store = connect(config_path).await?;
    let ns = namespace_for(kind, namespace);
    let current = store
        .get(kind, ns.as_deref(), name)
        .await
        .map_err(|e| anyhow!("cannot patch: {e}"))?;
    let version = current.metadata().resource_version.clone();
    let mut value = serde_json::to_value(&current)?;
    merge_patch(&mut value, &patch);
    let mut patched = Resource::deserialize_as(kind, value).map_err(|e| {
        anyhow!(
            "the patched {kind} is not valid: {}: {}",
            e.path(),
            e.inner()
        )
    })?;
    if patched.name() != name || patched.namespace() != ns.as_deref() {
        bail!("a patch cannot change metadata.name or metadata.namespace");
    }
    // The write is conditional on the version the patch was applied to.
    patched.metadata_mut().resource_version = version;
    validate(&patched).map_err(|e| anyhow!("the patched {kind} is not valid: {e}"))?;
    store.update(patched).await?;
    println!("Successfully patched 1 '{kind}' resource");
    Ok(ExitCode::SUCCESS)
}

pub async fn label(
    config_path: Option<&Path>,
    kind: &str,
    name: &str,
    label: &str,
    overwrite: bool,
    remove: bool,
    namespace: Option<&str>,
) -> Result<ExitCode> {
    let kind = parse_kind(kind)?;
    let (key, value) = match (label.split_once('='), label.strip_suffix('-')) {
        (Some((k, v)), _) if !remove => (k.to_owned(), Some(v.to_owned())),
        (None, Some(k)) => (k.to_owned(), None),
        (None, None) if remove => (label.to_owned(), None),
        _ => bail!(
            "label must be key=value to set, or key- (or key --remove) to remove; got `{label}`"
        ),
    };
    let store = connect(config_path).await?;
    let ns = namespace_for(kind, namespace);
    let mut resource = store
        .get(kind, ns.as_deref(), name)
        .await
        .map_err(|e| anyhow!("cannot label: {e}"))?;
    let labels = &mut resource.metadata_mut().labels;
    let plural = kind.plural();
    match value {
        Some(value) => {
            if let Some(existing) = labels.get(&key) {
                if existing != &value && !overwrite {
                    bail!("label `{key}` is already `{existing}` on {plural} {name}: use --overwrite to change it");
                }
            }
            labels.insert(key.clone(), value);
            validate(&resource).map_err(|e| anyhow!("cannot set label: {e}"))?;
            store.update(resource).await?;
            println!("Successfully set label {key} on {plural} {name}");
        }
        None => {
            if labels.remove(&key).is_none() {
                bail!("{plural} {name} has no label `{key}`");
            }
            store.update(resource).await?;
            println!("Successfully removed label {key} from {plural} {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn version(config_path: Option<&Path>) -> Result<ExitCode> {
    println!("Client Version:    v{}", env!("CARGO_PKG_VERSION"));
    println!("Release:           calico-ebpf (Rust)");
    let cluster = async {
        let store = connect(config_path).await?;
        let info = store.get(Kind::ClusterInformation, None, "default").await?;
        let spec = info.spec_json();
        Ok::<_, anyhow::Error>((
            spec["calicoVersion"]
                .as_str()
                .unwrap_or("unknown")
                .to_owned(),
            spec["clusterType"].as_str().unwrap_or("unknown").to_owned(),
        ))
    };
    match cluster.await {
        Ok((version, kind)) => {
            println!("Cluster Version:   {version}");
            println!("Cluster Type:      {kind}");
        }
        Err(e) => println!("Unable to retrieve Cluster Version or Type: {e:#}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn convert(path: &str, format: &Format) -> Result<ExitCode> {
    let mut converted = Vec::new();
    for (source, text) in input::read(path)? {
        let policies = calico_model::k8s::network_policies_from_text(&text)
            .with_context(|| format!("{source}: cannot convert"))?;
        converted.extend(policies);
    }
    match format {
        Format::Json => print!("{}", calico_model::to_json(&converted)),
        Format::Yaml => print!("{}", calico_model::to_yaml(&converted)),
        other => bail!("convert prints yaml or json, not {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}
