//! Printing resources: yaml, json, tables (`ps`, `wide`) and `custom-columns=`.

use anyhow::{bail, Result};
use calico_model::{list_to_json, list_to_yaml, to_json, to_yaml, Kind, Resource};
use serde_json::Value;

/// How `get` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Yaml,
    Json,
    Columns(Vec<String>),
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ps" | "" => Ok(Format::Table),
            "wide" => Ok(Format::Wide),
            "yaml" => Ok(Format::Yaml),
            "json" => Ok(Format::Json),
            _ => match s.strip_prefix("custom-columns=") {
                Some(cols) if !cols.is_empty() => Ok(Format::Columns(
                    cols.split(',')
                        .map(|c| c.trim().to_ascii_uppercase())
                        .collect(),
                )),
                _ => Err(format!(
                    "unknown output format `{s}` (use ps, wide, yaml, json or custom-columns=A,B)"
                )),
            },
        }
    }
}

/// A table column: header and where its value is in the object's JSON.
struct Column {
    header: &'static str,
    path: &'static str,
    wide_only: bool,
}

const fn col(header: &'static str, path: &'static str) -> Column {
    Column {
        header,
        path,
        wide_only: false,
    }
}

const fn wide(header: &'static str, path: &'static str) -> Column {
    Column {
        header,
        path,
        wide_only: true,
    }
}

fn columns(kind: Kind) -> Vec<Column> {
    let mut cols = vec![col("NAME", "metadata.name")];
    cols.extend(match kind {
        Kind::IPPool => vec![
            col("CIDR", "spec.cidr"),
            col("SELECTOR", "spec.nodeSelector"),
            wide("NAT", "spec.natOutgoing"),
            wide("IPIPMODE", "spec.ipipMode"),
            wide("VXLANMODE", "spec.vxlanMode"),
            wide("DISABLED", "spec.disabled"),
            wide("DISABLEBGPEXPORT", "spec.disableBGPExport"),
        ],
        Kind::NetworkPolicy | Kind::GlobalNetworkPolicy => vec![
            wide("TIER", "spec.tier"),
            wide("ORDER", "spec.order"),
            wide("SELECTOR", "spec.selector"),
        ],
        Kind::StagedNetworkPolicy | Kind::StagedGlobalNetworkPolicy => vec![
            col("ACTION", "spec.stagedAction"),
            wide("TIER", "spec.tier"),
            wide("ORDER", "spec.order"),
            wide("SELECTOR", "spec.selector"),
        ],
        Kind::StagedKubernetesNetworkPolicy => vec![col("ACTION", "spec.stagedAction")],
        Kind::Tier => vec![col("ORDER", "spec.order")],
        Kind::Node => vec![
            wide("ASN", "spec.bgp.asNumber"),
            wide("IPV4", "spec.bgp.ipv4Address"),
            wide("IPV6", "spec.bgp.ipv6Address"),
        ],
        Kind::WorkloadEndpoint => vec![
            col("WORKLOAD", "spec.workload"),
            col("NODE", "spec.node"),
            col("NETWORKS", "spec.ipNetworks"),
            col("INTERFACE", "spec.interfaceName"),
            wide("PROFILES", "spec.profiles"),
        ],
        Kind::HostEndpoint => vec![
            col("NODE", "spec.node"),
            wide("INTERFACE", "spec.interfaceName"),
            wide("IPS", "spec.expectedIPs"),
            wide("PROFILES", "spec.profiles"),
        ],
        Kind::BGPPeer => vec![
            col("PEERIP", "spec.peerIP"),
            col("NODE", "spec.node"),
            col("ASN", "spec.asNumber"),
        ],
        Kind::BGPConfiguration => vec![
            col("LOGSEVERITY", "spec.logSeverityScreen"),
            col("MESHENABLED", "spec.nodeToNodeMeshEnabled"),
            col("ASNUMBER", "spec.asNumber"),
        ],
        Kind::NetworkSet | Kind::GlobalNetworkSet => vec![wide("NETS", "spec.nets")],
        Kind::IPReservation => vec![col("CIDRS", "spec.reservedCIDRs")],
        Kind::IPAMBlock => vec![col("CIDR", "spec.cidr"), col("AFFINITY", "spec.affinity")],
        Kind::BlockAffinity => vec![
            col("NODE", "spec.node"),
            col("CIDR", "spec.cidr"),
            col("STATE", "spec.state"),
        ],
        _ => vec![],
    });
    cols
}

fn lookup(value: &Value, path: &str) -> String {
    let mut v = value;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// How `get` was asked: for one named object (printed bare in yaml/json) or for a list (a
/// `<Kind>List`, however many objects it holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    One,
    List,
}

/// Renders `resources` of `kind`; `show_namespace` adds a NAMESPACE column first.
pub fn render(
    kind: Kind,
    resources: &[Resource],
    format: &Format,
    show_namespace: bool,
    request: Request,
) -> Result<String> {
    match (format, request) {
        (Format::Yaml, Request::One) => return Ok(to_yaml(resources)),
        (Format::Json, Request::One) => return Ok(to_json(resources)),
        (Format::Yaml, Request::List) => return Ok(list_to_yaml(kind, resources)),
        (Format::Json, Request::List) => return Ok(list_to_json(kind, resources)),
        _ => {}
    }
    let all = columns(kind);
    let mut selected: Vec<&Column> = match format {
        Format::Table => all.iter().filter(|c| !c.wide_only).collect(),
        Format::Wide => all.iter().collect(),
        Format::Columns(names) => {
            let mut picked = Vec::new();
            for name in names {
                match all.iter().find(|c| c.header == name) {
                    Some(c) => picked.push(c),
                    None => bail!(
                        "custom-columns: {kind} has no column `{name}` (columns: {})",
                        all.iter().map(|c| c.header).collect::<Vec<_>>().join(", ")
                    ),
                }
            }
            picked
        }
        Format::Yaml | Format::Json => unreachable!("handled above"),
    };
    let namespace_column = col("NAMESPACE", "metadata.namespace");
    if show_namespace && kind.is_namespaced() && !matches!(format, Format::Columns(_)) {
        selected.insert(0, &namespace_column);
    }
    let rows: Vec<Vec<String>> = resources
        .iter()
        .map(|r| {
            let value = serde_json::to_value(r).unwrap_or_default();
            selected.iter().map(|c| lookup(&value, c.path)).collect()
        })
        .collect();
    Ok(table(
        &selected.iter().map(|c| c.header).collect::<Vec<_>>(),
        &rows,
    ))
}

/// Left-aligned columns separated by three spaces, headers first.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Upstream's bordered table.
pub fn boxed(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let rule = format!(
        "+{}+\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    let line = |cells: Vec<&str>| {
        format!(
            "|{}|\n",
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!(" {c:<w$} "))
                .collect::<Vec<_>>()
                .join("|")
        )
    };
    let mut out = rule.clone() + &line(headers.to_vec()) + &rule;
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out + &rule
}
