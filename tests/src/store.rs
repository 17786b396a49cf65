//! The datastore as a (synchronous) test writes to it: a real etcd through calico-datastore.

use anyhow::Result;
use calico_datastore::{Datastore, EtcdConfig};
use calico_model::{parse_documents, Kind};

use crate::Etcd;

pub struct Store {
    pub rt: tokio::runtime::Runtime,
    pub ds: Datastore,
}

impl Store {
    pub fn connect(etcd: &Etcd) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ds = rt.block_on(Datastore::connect(&EtcdConfig::with_endpoints([
            etcd.endpoint()
        ])))?;
        Ok(Self { rt, ds })
    }

    /// Applies every document of `yaml` (as `calicoctl apply` does).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        for r in parse_documents(yaml)? {
            self.rt.block_on(self.ds.apply(r))?;
        }
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Result<()> {
        self.rt
            .block_on(self.ds.delete(kind, namespace, name, None))?;
        Ok(())
    }
}
