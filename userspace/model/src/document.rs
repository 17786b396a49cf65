//! Reading and writing resource documents: YAML (one or many documents, `---`-separated) or JSON,
//! single objects or `kind: <Kind>List` with `items`.

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::{Kind, Resource, API_VERSION};

/// Why a document could not be read. Line and column are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// Not well-formed YAML/JSON.
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed, but not a resource: missing or wrong type meta, unknown fields, wrong types.
    #[error("document starting at line {line}{}: {}{message}",
        object.as_ref().map(|o| format!(" ({o})")).unwrap_or_default(),
        if path.is_empty() || path == "." { String::new() } else { format!("{path}: ") })]
    Schema {
        /// Line where the document starts.
        line: usize,
        /// `Kind namespace/name` when known.
        object: Option<String>,
        /// Field path, e.g. `spec.ingress[0].action`.
        path: String,
        message: String,
    },
}

/// Reads every resource in `text` (YAML or JSON). Empty documents are skipped; a list expands to
/// its items. Fails on the first document that is not a valid resource.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, DocumentError> {
    check_nesting(text)?;
    let starts = document_start_lines(text);
    let mut resources = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let line = starts.get(index).copied().unwrap_or(1);
        let value = Value::deserialize(document).map_err(|e| syntax_error(&e))?;
        if value.is_null() {
            continue;
        }
        read_value(value, line, &mut resources)?;
    }
    resources.iter_mut().for_each(normalise);
    Ok(resources)
}

/// The form upstream's clients store: an IPPool's CIDR as its network (`10.0.0.5/24` is
/// `10.0.0.0/24`), so that every reader agrees on what the pool holds.
fn normalise(resource: &mut Resource) {
    if let Resource::IPPool(pool) = resource {
        if let Ok(net) = pool.spec.cidr.parse::<ipnet::IpNet>() {
            let network = net.trunc().to_string();
            if network != pool.spec.cidr {
                pool.spec.cidr = network;
            }
        }
    }
}

fn read_value(value: Value, line: usize, out: &mut Vec<Resource>) -> Result<(), DocumentError> {
    let schema = |path: &str, object: Option<String>, message: String| DocumentError::Schema {
        line,
        object,
        path: path.to_owned(),
        message,
    };
    let Value::Mapping(map) = &value else {
        return Err(schema("", None, "a resource must be a mapping".into()));
    };
    let field = |name: &str| map.get(name).and_then(Value::as_str).map(str::to_owned);
    let kind_name = field("kind").ok_or_else(|| schema("kind", None, "missing".into()))?;
    match field("apiVersion") {
        Some(v) if v == API_VERSION => {}
        Some(v) => {
            return Err(schema(
                "apiVersion",
                None,
                format!("`{v}` is not supported (expected `{API_VERSION}`)"),
            ))
        }
        None => {
            return Err(schema(
                "apiVersion",
                None,
                format!("missing (expected `{API_VERSION}`)"),
            ))
        }
    }

    if let Some(kind) = Kind::from_list_kind(&kind_name) {
        let items = match map.get("items") {
            Some(Value::Sequence(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(schema("items", None, "must be a list".into())),
        };
        for (i, mut item) in items.into_iter().enumerate() {
            // Items of a list may leave their type meta to the list.
            if let Value::Mapping(m) = &mut item {
                m.entry("apiVersion".into())
                    .or_insert_with(|| API_VERSION.into());
                m.entry("kind".into())
                    .or_insert_with(|| kind.as_str().into());
            }
            read_object(kind, item, line, out).map_err(|e| match e {
                DocumentError::Schema {
                    line,
                    object,
                    path,
                    message,
                } => DocumentError::Schema {
                    line,
                    object,
                    path: format!(
                        "items[{i}]{}",
                        if path.is_empty() {
                            String::new()
                        } else {
                            format!(".{path}")
                        }
                    ),
                    message,
                },
                other => other,
            })?;
        }
        return Ok(());
    }

    let kind = Kind::ALL
        .iter()
        .copied()
        .find(|k| k.is_named(&kind_name))
        .ok_or_else(|| {
            schema(
                "kind",
                None,
                format!(
                    "unknown kind `{kind_name}` (known: {})",
                    Kind::ALL
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
    read_object(kind, value, line, out)
}

fn read_object(
    kind: Kind,
    value: Value,
    line: usize,
    out: &mut Vec<Resource>,
) -> Result<(), DocumentError> {
    let object = describe(kind, &value);
    match Resource::deserialize_as(kind, value) {
        Ok(resource) => {
            out.push(resource);
            Ok(())
        }
        Err(err) => {
            let path = err.path().to_string();
            Err(DocumentError::Schema {
                line,
                object: Some(object),
                path,
                message: clean_message(&err.into_inner().to_string()),
            })
        }
    }
}

/// `Kind namespace/name` (or `Kind name`) from the raw document, for error messages.
fn describe(kind: Kind, value: &Value) -> String {
    let meta = value.get("metadata");
    let get = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    match (get("namespace"), get("name")) {
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
        _ => format!("{kind} (unnamed)"),
    }
}

/// serde_yaml_ng appends its own position (meaningless for a detached value); drop it.
fn clean_message(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn syntax_error(err: &serde_yaml_ng::Error) -> DocumentError {
    let (line, column) = err
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    DocumentError::Syntax {
        line,
        column,
        message: clean_message(&err.to_string()),
    }
}

/// Deepest nesting a document may have. Calico's resources nest about ten levels; the YAML
/// parser's own limit (128) applies only after it has read the whole document, which takes
/// quadratic time on deep nesting.
pub const MAX_NESTING: usize = 100;

/// Refuses text nested deeper than [`MAX_NESTING`] in one linear pass, before the parser sees
/// it: flow collections (`[`, `{` outside quotes and comments) and compact block sequences
/// (`- - - x`) count a level each.
fn check_nesting(text: &str) -> Result<(), DocumentError> {
    let too_deep = |line: usize, column: usize| DocumentError::Syntax {
        line,
        column,
        message: format!("nested deeper than {MAX_NESTING} levels"),
    };
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    for (index, line) in text.lines().enumerate() {
        let mut chars = line.char_indices().peekable();
        let mut at_line_start = quote.is_none();
        let mut compact = 0usize;
        let mut previous = ' ';
        // Last character outside quotes and blanks: a quote opens a scalar only where one can
        // start, so an apostrophe in plain text (`it's`) hides nothing from the count.
        let mut significant = ' ';
        while let Some((column, c)) = chars.next() {
            match quote {
                Some('"') if c == '\\' => {
                    chars.next();
                }
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    ' ' | '\t' if at_line_start => {}
                    '-' if at_line_start && chars.peek().is_some_and(|(_, n)| *n == ' ') => {
                        compact += 1;
                        chars.next();
                        if flow + compact > MAX_NESTING {
                            return Err(too_deep(index + 1, column + 1));
                        }
                    }
                    '#' if previous == ' ' || previous == '\t' || column == 0 => break,
                    '"' | '\''
                        if at_line_start
                            || matches!(significant, ':' | '-' | '[' | '{' | ',' | '?') =>
                    {
                        at_line_start = false;
                        quote = Some(c);
                    }
                    '[' | '{' => {
                        at_line_start = false;
                        flow += 1;
                        if flow + compact > MAX_NESTING {
                            return Err(too_deep(index + 1, column + 1));
                        }
                    }
                    ']' | '}' => {
                        at_line_start = false;
                        flow = flow.saturating_sub(1);
                    }
                    _ => at_line_start = false,
                },
            }
            if quote.is_none() && !matches!(c, ' ' | '\t') {
                significant = c;
            }
            previous = c;
        }
        // (A quoted scalar may span lines: `quote` carries over.)
    }
    Ok(())
}

/// 1-based line on which each `---`-separated document starts.
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    let mut first_content_seen = false;
    for (i, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ");
        if is_separator {
            if first_content_seen {
                starts.push(i + 2);
            } else {
                starts[0] = i + 2;
            }
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            first_content_seen = true;
        }
    }
    starts
}

/// Writes resources as YAML: one object as itself, several as a `<Kind>List` (or a `List` when
/// kinds differ), as `calicoctl get -o yaml` does.
pub fn to_yaml(resources: &[Resource]) -> String {
    serde_yaml_ng::to_string(&as_document(resources)).unwrap_or_default()
}

/// Writes resources as pretty JSON, shaped as [`to_yaml`].
pub fn to_json(resources: &[Resource]) -> String {
    serde_json::to_string_pretty(&as_document(resources)).unwrap_or_default() + "\n"
}

/// Writes resources of `kind` as a `<Kind>List` whatever their number (none, one or many), as
/// `calicoctl get <kind> -o yaml` answers a list request.
pub fn list_to_yaml(kind: Kind, resources: &[Resource]) -> String {
    serde_yaml_ng::to_string(&as_list(&format!("{kind}List"), resources)).unwrap_or_default()
}

/// [`list_to_yaml`] in pretty JSON.
pub fn list_to_json(kind: Kind, resources: &[Resource]) -> String {
    serde_json::to_string_pretty(&as_list(&format!("{kind}List"), resources)).unwrap_or_default()
        + "\n"
}

fn as_document(resources: &[Resource]) -> serde_json::Value {
    if let [one] = resources {
        return serde_json::to_value(one).unwrap_or_default();
    }
    let kinds: std::collections::BTreeSet<Kind> = resources.iter().map(Resource::kind).collect();
    let list_kind = match kinds.iter().next() {
        Some(kind) if kinds.len() == 1 => format!("{kind}List"),
        _ => "List".to_owned(),
    };
    as_list(&list_kind, resources)
}

fn as_list(list_kind: &str, resources: &[Resource]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": list_kind,
        "items": resources,
        "metadata": {},
    })
}
