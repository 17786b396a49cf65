//! The `projectcalico.org/v3` resource model: every kind with Calico's exact field names, read
//! from and written to YAML or JSON, and validated with Calico's rules. Pure: no I/O.
//!
//! * [`Resource`] is one object of any kind; [`Kind`] knows each kind's names, plural (the etcd
//!   key segment) and whether it is namespaced.
//! * [`parse_documents`] reads multi-document YAML or JSON, including `kind: XList` with `items`,
//!   with syntax errors at line:column and schema errors (unknown fields, wrong types) at a field
//!   path.
//! * [`validate`] checks a resource and reports every problem with its field path, e.g.
//!   `spec.ingress[2].source.ports[0]: port range 90:80 is reversed`.

mod document;
mod meta;
mod numorstring;
mod resource;
mod validate;

pub mod k8s;
pub mod spec;

pub use document::{list_to_json, list_to_yaml, parse_documents, to_json, to_yaml, DocumentError};
pub use meta::ObjectMeta;
pub use numorstring::{AsNumber, Order, Port, Protocol};
pub use resource::{Kind, Object, Resource, API_VERSION};
pub use validate::{
    inert_fields, parse_go_duration, pool_overlaps, validate, ValidationError, ValidationErrors,
};
