//! `--dry-run` on create, apply, replace and delete: everything is read and validated as for a
//! real run, then compared with what the datastore holds, and what would change is shown.
//! Nothing is written.

use std::process::ExitCode;

use anyhow::Result;
use calico_datastore::{Datastore, DatastoreError};
use calico_model::{Kind, Resource};
use serde_json::Value;

use crate::{input::describe, resources::Action};

/// What one document would do.
enum Outcome {
    Create,
    Update(Vec<String>),
    Unchanged,
    Delete,
    Fail(String),
}

/// The object as compared: without what the datastore manages itself.
fn comparable(resource: &Resource) -> Value {
    let mut v = serde_json::to_value(resource).unwrap_or_default();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for managed in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
            meta.remove(managed);
        }
    }
    v
}

/// Field paths (`spec.ingress`, `metadata.labels.env`) whose values differ.
fn changed_paths(old: &Value, new: &Value, at: &str, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => changed_paths(x, y, &path, out),
                    _ => out.push(path),
                }
            }
        }
        (a, b) if a != b => out.push(at.to_owned()),
        _ => {}
    }
}

async fn outcome(
    store: &Datastore,
    action: Action,
    resource: &Resource,
    skip: bool,
) -> Result<Outcome> {
    let stored = match store
        .get(resource.kind(), resource.namespace(), resource.name())
        .await
    {
        Ok(r) => Some(r),
        Err(DatastoreError::NotFound { .. }) => None,
        Err(e) => return Ok(Outcome::Fail(e.to_string())),
    };
    Ok(match (action, stored) {
        (Action::Create, None) | (Action::Apply, None) => Outcome::Create,
        (Action::Create, Some(_)) if skip => Outcome::Unchanged,
        (Action::Create, Some(_)) => Outcome::Fail("already exists".into()),
        (Action::Replace, None) => Outcome::Fail("does not exist".into()),
        (Action::Apply | Action::Replace, Some(old)) => {
            let mut paths = Vec::new();
            changed_paths(&comparable(&old), &comparable(resource), "", &mut paths);
            if paths.is_empty() {
                Outcome::Unchanged
            } else {
                Outcome::Update(paths)
            }
        }
        (Action::Delete, Some(_)) => Outcome::Delete,
        (Action::Delete, None) if skip => Outcome::Unchanged,
        (Action::Delete, None) => Outcome::Fail("does not exist".into()),
    })
}

/// Shows what `action` would do with `resources` (each with where it came from).
pub async fn preview(
    store: &Datastore,
    action: Action,
    resources: &[(String, Resource)],
    skip: bool,
) -> Result<ExitCode> {
    let (mut created, mut updated, mut unchanged, mut deleted, mut failed) = (0, 0, 0, 0, 0);
    for (source, resource) in resources {
        let what = format!("{} '{}' ({source})", resource.kind(), describe(resource));
        match outcome(store, action, resource, skip).await? {
            Outcome::Create => {
                created += 1;
                println!("would create {what}");
            }
            Outcome::Update(paths) => {
                updated += 1;
                println!("would update {what}: {}", paths.join(", "));
            }
            Outcome::Unchanged => {
                unchanged += 1;
                println!("unchanged {what}");
            }
            Outcome::Delete => {
                deleted += 1;
                println!("would delete {what}");
            }
            Outcome::Fail(why) => {
                failed += 1;
                println!("would fail {what}: {why}");
            }
        }
    }
    println!(
        "Dry run, nothing written: {created} to create, {updated} to update, {deleted} to delete, {unchanged} unchanged, {failed} would fail"
    );
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `delete KIND NAME... --dry-run`.
pub async fn preview_delete(
    store: &Datastore,
    kind: Kind,
    namespace: Option<&str>,
    names: &[String],
    skip: bool,
) -> Result<ExitCode> {
    let mut resources = Vec::new();
    let mut missing = 0;
    for name in names {
        match store.get(kind, namespace, name).await {
            Ok(r) => resources.push(("datastore".to_owned(), r)),
            Err(DatastoreError::NotFound { .. }) if skip => {}
            Err(e) => {
                missing += 1;
                println!("would fail {kind} '{name}': {e}");
            }
        }
    }
    let code = preview(store, Action::Delete, &resources, skip).await?;
    Ok(if missing > 0 { ExitCode::FAILURE } else { code })
}
